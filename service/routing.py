"""Which Triton model(s) answer a request: a model, the Triton ensemble, or a per-request
ensemble that the gateway fans out and averages itself."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import InvalidRequest, UnknownModel
from .metrics import CUSTOM_ENSEMBLE, UNKNOWN_MODEL
from .settings import Settings

ENSEMBLE_ALIAS = "ensemble"


@dataclass(frozen=True)
class Plan:
    """What to call and how to combine it.

    ``name`` is what the answer says served it; ``label`` the bounded metric label.
    """

    name: str
    label: str
    targets: tuple[str, ...]
    coefficients: tuple[float, ...] = (1.0,)  # of a per-request ensemble, summing to one

    @property
    def custom(self) -> bool:
        return len(self.targets) > 1


def known_models(settings: Settings) -> list[str]:
    return (
        [*settings.models, ENSEMBLE_ALIAS]
        if settings.ensemble_model in settings.models
        else list(settings.models)
    )


def metric_label(settings: Settings, requested: str | None) -> str:
    """The model label for a request not yet resolved: the name if it is known, else
    ``unknown``, so that clients cannot blow up the metrics' cardinality."""
    if requested is None:
        return settings.default_model
    if requested == ENSEMBLE_ALIAS and settings.ensemble_model in settings.models:
        return settings.ensemble_model
    return requested if requested in settings.models else UNKNOWN_MODEL


def _resolve_one(settings: Settings, name: str) -> str:
    if name == ENSEMBLE_ALIAS and settings.ensemble_model in settings.models:
        return settings.ensemble_model
    if name in settings.models:
        return name
    known = ", ".join(known_models(settings))
    raise UnknownModel(f"unknown model {name!r}; known models: {known}", known=known_models(settings))


def resolve(
    settings: Settings,
    model: str | None,
    models: list[str] | None = None,
    weights: list[float] | None = None,
) -> Plan:
    """The plan for a request's ``model`` / ``models`` / ``weights`` options."""
    if models:
        if model is not None:
            raise InvalidRequest("give either model or models, not both")
        names = [_resolve_one(settings, m) for m in models]
        if len(set(names)) != len(names) or len(names) < 2:
            raise InvalidRequest("models needs two or more distinct models")
        if settings.ensemble_model in names:
            raise InvalidRequest(f"{settings.ensemble_model} cannot be a member of a per-request ensemble")
        if weights is None:
            weights = [1.0] * len(names)
        if len(weights) != len(names):
            raise InvalidRequest(f"{len(names)} models but {len(weights)} weights")
        total = float(sum(weights))
        # NaN passes every comparison, and infinities make NaN or all-zero weights: refuse both.
        if not math.isfinite(total) or any(w < 0 for w in weights) or total <= 0:
            raise InvalidRequest("weights must be finite, non-negative and not all zero")
        return Plan(
            name=f"{ENSEMBLE_ALIAS}({','.join(names)})",
            label=CUSTOM_ENSEMBLE,
            targets=tuple(names),
            coefficients=tuple(float(w) / total for w in weights),
        )
    if weights is not None:
        raise InvalidRequest("weights needs models")
    name = _resolve_one(settings, model if model is not None else settings.default_model)
    return Plan(name=name, label=name, targets=(name,))
