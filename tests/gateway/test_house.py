"""The house's own rules, held by the suite: a module of the gateway a newcomer can hold in
mind is at most 300 lines, or says in its docstring why it is longer (a line that starts
"Over 300 lines"), so that growth is a decision someone wrote down rather than drift."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MOST_LINES = 300


def too_long(text: str) -> bool:
    """Over :data:`MOST_LINES` lines with no reason given in the module's docstring."""
    if len(text.splitlines()) <= MOST_LINES:
        return False
    docstring = ast.get_docstring(ast.parse(text)) or ""
    return not any(line.strip().lower().startswith("over 300 lines") for line in docstring.splitlines())


def test_no_gateway_module_is_over_300_lines_without_a_reason() -> None:
    long = [
        f"{path.relative_to(ROOT)}: {len(path.read_text().splitlines())} lines"
        for path in sorted((ROOT / "service").rglob("*.py"))
        if too_long(path.read_text(encoding="utf-8"))
    ]
    assert long == [], "split these by subject, or say in the docstring why not:\n" + "\n".join(long)


def test_the_rule_reads_the_length_and_the_reason() -> None:
    body = "x = 1\n" * 300
    assert too_long('"""A module."""\n' + body)
    assert not too_long('"""A module.\n\nOver 300 lines: one state machine."""\n' + body)
    assert not too_long('"""A module."""\n' + "x = 1\n" * 299)
