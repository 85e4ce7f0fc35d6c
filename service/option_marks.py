"""What the declaration of an option carries beside its type (service/options.py): how a
list travels as text, and how the option bears on the answer's probabilities. Both are
required of every option that needs them, checked when the forms and the cache's key are
derived at import, so that a new option cannot be declared without saying either."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic.fields import FieldInfo


@dataclass(frozen=True)
class CommaSeparated:
    """How a list option travels as text, where a query parameter or a form field holds one
    string: comma-separated, matching ``pattern`` when given. Every list option says so in
    its annotation, or deriving the text forms fails at import."""

    example: str
    pattern: str | None = None
    item_chars: int = 32  # the longest item, so that the text form is bounded as the list is


@dataclass(frozen=True)
class Bearing:
    """How an option bears on an answer's probabilities, which the answer cache keeps
    (service/cache.py): every option says which in its annotation, or the module fails at
    import, so that an option that changes probabilities cannot be left out of the key.

    - ``routed``: it chooses the models and their coefficients, and the cache keys on the
      resolved route (aliases of one model share entries);
    - ``computed``: it changes how the probabilities are computed: keyed as it is;
    - ``presented``: it only shapes the answer cut from them (``top_k``): not keyed."""

    kind: Literal["routed", "computed", "presented"]


ROUTED, COMPUTED, PRESENTED = Bearing("routed"), Bearing("computed"), Bearing("presented")


def bearing(name: str, field: FieldInfo) -> Bearing:
    """The option's :class:`Bearing`; exactly one is declared, or this raises."""
    found = [m for m in field.metadata if isinstance(m, Bearing)]
    if len(found) != 1:
        raise TypeError(f"the option {name!r} must declare one Bearing (ROUTED, COMPUTED or PRESENTED)")
    return found[0]
