"""The README's settings table is the `Settings` class, rendered: every field, its
environment name, its default and its description, so the documentation cannot drift
from the code. When a setting changes, the failure prints the table to paste."""

from __future__ import annotations

import json
import re

import pytest
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from service.settings import Settings

from ...helpers import ROOT

START = "<!-- settings table: generated from service/settings.py, checked by tests -->"
END = "<!-- end of settings table -->"


#: Defaults that depend on the machine or the installation: the table states their rule.
COMPUTED = {
    "buffer_budget_bytes": "a quarter of a worker's memory",
    "memory_budget_bytes": "85 % of a worker's memory, less its size at start",
    "labels_path": "the labels shipped in `inception/data/`",
}


def _default(name: str, info: FieldInfo) -> str:
    if name in COMPUTED:
        return COMPUTED[name]
    value = info.default
    if value is PydanticUndefined and info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "(empty)"
    if isinstance(value, bool):
        return json.dumps(value)
    if value is None:
        return "(unset)"
    return str(value)


def settings_table() -> str:
    prefix = str(Settings.model_config.get("env_prefix", ""))
    rows = ["| setting | default | what it is for |", "| --- | --- | --- |"]
    for name, info in Settings.model_fields.items():
        description = (info.description or "").replace("|", "\\|")
        default = _default(name, info)
        shown = default if name in COMPUTED else f"`{default}`"
        rows.append(f"| `{prefix}{name.upper()}` | {shown} | {description} |")
    return "\n".join(rows)


def documented_table() -> str | None:
    text = (ROOT / "README.md").read_text()
    match = re.search(re.escape(START) + r"\n(.*?)\n" + re.escape(END), text, re.S)
    return match.group(1).strip() if match else None


def test_every_setting_has_a_description() -> None:
    missing = [name for name, info in Settings.model_fields.items() if not info.description]
    assert not missing, f"settings without a description (the README's table shows it): {missing}"


def test_the_readme_documents_every_setting_as_the_code_declares_it() -> None:
    expected = settings_table()
    documented = documented_table()
    assert documented is not None, f"README.md has no settings table between {START!r} and {END!r}"
    assert documented == expected, (
        "README.md's settings table differs from service/settings.py; paste this between the markers:\n"
        + expected
    )


def test_the_table_renders_the_environment_names_settings_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    names = re.findall(r"^\| `(\w+)`", settings_table(), re.M)
    assert len(names) == len(Settings.model_fields)
    # A documented name really sets its field: read one back through the environment.
    env_name = next(n for n in names if n.endswith("_TRITON_TIMEOUT_S"))
    monkeypatch.setenv(env_name, "1234.5")
    assert Settings().triton_timeout_s == 1234.5
