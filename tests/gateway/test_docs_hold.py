"""The README and docs/architecture.md hold to the code where they restate it, so that they
cannot drift again (issue 26, item 7: 8 of 20 sampled claims had gone stale, module lists
and error codes among them, each left behind by a change that never read the docs).

What is checked, each against the code rather than against a copy of it:

- the README's module bullet ("`service/`: the gateway, its modules ...") and the service
  row of the architecture's Layout table name every module and package of ``service/``,
  and nothing that does not exist;
- the README's table of error codes lists every (status, code) an ``ApiError`` of
  ``service/errors.py`` answers, each with its status, and no other; the architecture's
  "HTTP API" paragraph names only real codes, each with its status;
- wherever either document writes a status beside a code (``429 `over_share```), the pair
  is real, and every ``service/...`` path it names exists.

Each section is found by a stable marker; a missing marker fails saying which. Each check is
a function of the text, run on the real documents and, once, on a doctored text, to show
that it catches a name left out and a name that does not exist.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import errors

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "service"
README = ROOT / "README.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

#: The first words of the README's bullet of the service's modules.
README_MODULES = "- `service/`: the gateway, its modules in the order a request walks them:"
#: The architecture's Layout table, and its row of the service.
LAYOUT = "## Layout"
LAYOUT_SERVICE_ROW = "| `service/` |"
#: The README's table of error codes lies between these.
ERRORS_START = "<!-- error codes: every ApiError of service/errors.py, checked by tests -->"
ERRORS_END = "<!-- end of error codes -->"
ERRORS_HEADER = ("| status | code | when |", "| --- | --- | --- |")
#: The architecture's paragraph on the HTTP API, which names some codes.
HTTP_API = "**HTTP API**"

#: Codes a client never receives, so the README does not list them, each with the reason.
#: None today: every ApiError is answered to someone (the base class's ``internal_error``
#: is the answer to a bug). The framework's other HTTP errors, mapped in
#: ``install_error_handlers`` as ``http_error`` with their own status, are no ApiError
#: subclass and are not collected.
UNLISTED: dict[str, str] = {}

TOKEN = re.compile(r"`([^`\n]+)`")
#: A status written beside a code: ``429 `over_share```, ``**503 `over_capacity`**``.
STATUS_CODE = re.compile(r"\b([1-5]\d\d)\**,?\s+\**`([a-z][a-z0-9_]*)`")
#: A path of the service written anywhere in a document.
SERVICE_PATH = re.compile(r"(?<![\w./-])service/[\w./]*")
ERROR_ROW = re.compile(r"\| (\d{3}) \| `([a-z][a-z0-9_]*)` \| ([^|]+) \|")


class MissingMarker(AssertionError):
    """A section the checks read is not where its marker says: the document was restructured,
    and the test must follow it rather than pass on nothing."""


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# --- the modules -----------------------------------------------------------------------------


def service_modules(service: Path = SERVICE) -> set[str]:
    """Every module and package of the service, relative to it: ``app.py``, ``policy/``,
    ``policy/clients.py``; an ``__init__.py`` stands for its package."""
    names = set()
    for path in service.rglob("*.py"):
        relative = path.relative_to(service)
        if path.name == "__init__.py":
            if relative.parent != Path():
                names.add(relative.parent.as_posix() + "/")
        else:
            names.add(relative.as_posix())
    return names


def closing(text: str, start: int) -> int:
    """The index of the parenthesis that closes the one at ``start``."""
    depth = 0
    for index in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return index
    raise MissingMarker(f"unbalanced parenthesis in: {text[start : start + 80]!r}")


def named_modules(text: str, suffix: str, prefix: str = "") -> Iterator[str]:
    """The modules ``text`` names, relative to the service, in backticks, each as
    ``name{suffix}`` (``app.py`` in the README, ``app`` in the Layout table) or ``pkg/``. The
    parenthesis right after a package holds its modules (``policy/`` (``clients.py``, ...)),
    so that a submodule reads as it is spelt in prose; other tokens are not modules."""
    module = re.compile(r"[a-z_][a-z0-9_]*(/[a-z_][a-z0-9_]*)*" + re.escape(suffix))
    position = 0
    while match := TOKEN.search(text, position):
        token, position = match.group(1), match.end()
        if token == "service/":  # the subject, not one of its parts
            continue
        if re.fullmatch(r"[a-z_][a-z0-9_]*/", token):
            yield prefix + token
            after = len(text[position:]) - len(text[position:].lstrip())
            if text[position + after : position + after + 1] == "(":
                end = closing(text, position + after)
                yield from named_modules(text[position + after + 1 : end], suffix, prefix + token)
                position = end + 1
        elif module.fullmatch(token):
            name = token.removeprefix("service/")
            yield prefix + (name if name.endswith(".py") else name + ".py")


def module_problems(
    text: str, suffix: str, where: str, service: Path = SERVICE, root: Path = ROOT
) -> list[str]:
    """What ``text`` gets wrong about the service's modules: each one it does not name, and
    each name that is none. A name whose first folder is not the service's, but the
    repository's (``inception/contract.py``), is a reference outside the service: it must
    exist, and does not count as a module."""
    modules = service_modules(service)
    named = set(named_modules(text, suffix))
    problems = [f"{where} does not name `{m}`" for m in sorted(modules - named)]
    for name in sorted(named - modules):
        first = name.split("/", 1)[0]
        if (service / name).exists():  # a folder of the service that is no package: static/
            continue
        if "/" in name.rstrip("/") and not (service / first).exists() and (root / name).exists():
            continue
        problems.append(f"{where} names `{name}`, which is no module of service/")
    return problems


def readme_module_bullet(text: str) -> str:
    """The README's bullet of the service's modules: from its marker to the next bullet or
    blank line."""
    start = text.find(README_MODULES)
    if start < 0:
        raise MissingMarker(f"README.md has no line starting {README_MODULES!r}")
    lines = text[start:].splitlines()
    bullet = [lines[0]]
    for line in lines[1:]:
        if not line.strip() or line.startswith("- "):
            break
        bullet.append(line)
    return "\n".join(bullet)


def layout_service_cell(text: str) -> str:
    """The "what it is" cell of the service's row in the architecture's Layout table (the
    "may import" cell names packages, not modules)."""
    layout = re.search("^" + re.escape(LAYOUT) + "$", text, re.M)
    if layout is None:
        raise MissingMarker(f"docs/architecture.md has no heading {LAYOUT!r}")
    row = next(
        (line for line in text[layout.end() :].splitlines() if line.startswith(LAYOUT_SERVICE_ROW)), None
    )
    if row is None:
        raise MissingMarker(f"docs/architecture.md's Layout has no row starting {LAYOUT_SERVICE_ROW!r}")
    cells = [cell.strip() for cell in row.strip().strip("|").split(" | ")]
    if len(cells) != 3:
        raise MissingMarker(f"the Layout's service row has {len(cells)} cells, not 3: {row[:80]!r}")
    return cells[1]


def test_the_readme_names_every_module_of_the_service_and_no_other() -> None:
    problems = module_problems(readme_module_bullet(read(README)), ".py", "README.md's service bullet")
    assert problems == [], "\n".join(problems)


def test_the_architecture_layout_names_every_module_of_the_service_and_no_other() -> None:
    problems = module_problems(layout_service_cell(read(ARCHITECTURE)), "", "the architecture's Layout")
    assert problems == [], "\n".join(problems)


def test_the_module_check_catches_a_module_left_out_and_one_that_is_none() -> None:
    bullet = readme_module_bullet(read(README))
    assert "`admission.py` (" in bullet and "`clients.py`" in bullet
    doctored = bullet.replace("`admission.py` (", "`pacing.py` (").replace("`clients.py`", "`client.py`")
    problems = module_problems(doctored, ".py", "doctored")
    assert problems == [
        "doctored does not name `admission.py`",
        "doctored does not name `policy/clients.py`",
        "doctored names `pacing.py`, which is no module of service/",
        "doctored names `policy/client.py`, which is no module of service/",
    ]
    cell = layout_service_cell(read(ARCHITECTURE))
    doctored = cell.replace("`routes/` (`classify`, ", "`routes/` (`pipeline`, ")
    assert module_problems(doctored, "", "doctored") == [
        "doctored does not name `routes/classify.py`",
        "doctored names `routes/pipeline.py`, which is no module of service/",
    ]
    assert module_problems("`inception/contract.py`, `inception/nothing.py`", ".py", "x")[-1] == (
        "x names `inception/nothing.py`, which is no module of service/"
    )


# --- the error codes -------------------------------------------------------------------------


def api_errors() -> set[tuple[int, str]]:
    """Every (status, code) an ``ApiError`` answers: the base class and its subclasses, walked
    to the leaves (``ClientOverloaded`` answers ``overloaded`` as its parent does)."""
    found: set[tuple[int, str]] = set()
    todo: list[type[errors.ApiError]] = [errors.ApiError]
    while todo:
        cls = todo.pop()
        found.add((cls.status, cls.code))
        todo += cls.__subclasses__()
    return found


def readme_error_rows(text: str) -> list[tuple[int, str]]:
    """The (status, code) rows of the README's error table; a line between the markers that
    is no row fails, so that a row spelt otherwise is not skipped."""
    start, end = text.find(ERRORS_START), text.find(ERRORS_END)
    if start < 0 or end < start:
        missing = ERRORS_START if start < 0 else ERRORS_END
        raise MissingMarker(f"README.md has no error table: marker {missing!r} missing or out of order")
    lines = text[start + len(ERRORS_START) : end].strip().splitlines()
    if tuple(lines[:2]) != ERRORS_HEADER:
        raise MissingMarker(f"README.md's error table does not start with {ERRORS_HEADER!r}")
    rows = []
    for line in lines[2:]:
        match = ERROR_ROW.fullmatch(line.strip())
        if match is None:
            raise MissingMarker(f"README.md's error table has a line that is no row: {line!r}")
        rows.append((int(match.group(1)), match.group(2)))
    return rows


def error_table_problems(rows: list[tuple[int, str]], known: set[tuple[int, str]]) -> list[str]:
    """What the rows get wrong: each (status, code) missing but those in :data:`UNLISTED`,
    each listed twice, each that no ApiError answers (a code that is none, or a wrong status)."""
    statuses = {code: sorted(s for s, c in known if c == code) for _, code in known}
    problems = [
        f"missing: {status} `{code}`" for status, code in sorted(known - set(rows)) if code not in UNLISTED
    ]
    problems += [
        f"listed twice: {status} `{code}`"
        for status, code in sorted(set(rows))
        if rows.count((status, code)) > 1
    ]
    for status, code in sorted(set(rows) - known):
        if code in statuses:
            problems.append(
                f"`{code}` listed as {status}; service/errors.py answers it with {statuses[code]}"
            )
        else:
            problems.append(f"`{code}` ({status}) is no code of service/errors.py")
    problems += [
        f"`{code}` is listed but UNLISTED says why it is not" for _, code in rows if code in UNLISTED
    ]
    return problems


def status_code_problems(text: str, known: set[tuple[int, str]], where: str) -> list[str]:
    """Each status written beside a code (``429 `over_share```) that no ApiError answers."""
    codes = {code for _, code in known}
    return [
        f"{where}: {status} `{code}` "
        + ("has another status in service/errors.py" if code in codes else "is no code of service/errors.py")
        for status, code in ((int(s), c) for s, c in STATUS_CODE.findall(text))
        if (status, code) not in known
    ]


def http_api_paragraph(text: str) -> str:
    start = re.search("^" + re.escape(HTTP_API), text, re.M)
    if start is None:
        raise MissingMarker(f"docs/architecture.md has no paragraph starting {HTTP_API!r}")
    return text[start.start() :].split("\n\n", 1)[0]


def paragraph_code_problems(paragraph: str, known: set[tuple[int, str]]) -> list[str]:
    """The architecture's HTTP API paragraph names codes with their statuses: a real pair
    each, and no code written without its status, where a reader could not tell which. It
    names some codes, not all (the README's table is the list, as the paragraph says)."""
    problems = status_code_problems(paragraph, known, "HTTP API")
    paired = {code for _, code in STATUS_CODE.findall(paragraph)}
    codes = {code for _, code in known}
    problems += [
        f"HTTP API: `{token}` written without its status"
        for token in TOKEN.findall(paragraph)
        if token in codes and token not in paired
    ]
    return problems


def test_the_readme_lists_every_error_code_with_its_status_and_no_other() -> None:
    problems = error_table_problems(readme_error_rows(read(README)), api_errors())
    assert problems == [], "README.md's error table differs from service/errors.py:\n" + "\n".join(problems)


def test_the_architecture_names_real_codes_with_their_statuses() -> None:
    problems = paragraph_code_problems(http_api_paragraph(read(ARCHITECTURE)), api_errors())
    assert problems == [], "\n".join(problems)


def test_every_status_written_beside_a_code_is_the_codes() -> None:
    known = api_errors()
    problems = status_code_problems(read(README), known, "README.md")
    problems += status_code_problems(read(ARCHITECTURE), known, "docs/architecture.md")
    assert problems == [], "\n".join(problems)


def test_the_error_checks_catch_a_code_left_out_one_that_is_none_and_a_wrong_status() -> None:
    known = api_errors()
    assert (500, "internal_error") in known and (429, "overloaded") in known
    rows = readme_error_rows(read(README))
    doctored = [row for row in rows if row != (431, "headers_too_large")]
    doctored += [(429, "pacing"), (503, "over_share"), (400, "bad_http")]
    assert error_table_problems(doctored, known) == [
        "missing: 431 `headers_too_large`",
        "listed twice: 400 `bad_http`",
        "`pacing` (429) is no code of service/errors.py",
        "`over_share` listed as 503; service/errors.py answers it with [429]",
    ]
    paragraph = http_api_paragraph(read(ARCHITECTURE)).replace("503 `over_capacity`", "429 `over_capacity`")
    paragraph += " Also 503 `queue_full`, and `not_ready`."
    assert paragraph_code_problems(paragraph, known) == [
        "HTTP API: 429 `over_capacity` has another status in service/errors.py",
        "HTTP API: 503 `queue_full` is no code of service/errors.py",
        "HTTP API: `not_ready` written without its status",
    ]
    with pytest.raises(MissingMarker, match="no row"):
        readme_error_rows(read(README).replace("| 401 | `unauthorized` |", "| 401 | unauthorized |"))
    with pytest.raises(MissingMarker, match=re.escape(ERRORS_END)):
        readme_error_rows(read(README).replace(ERRORS_END, ""))


# --- paths -----------------------------------------------------------------------------------


def missing_service_paths(text: str, where: str, root: Path = ROOT) -> list[str]:
    """Each ``service/...`` path the text names that does not exist (``service/pacing.py``)."""
    paths = sorted({match.rstrip(".") for match in SERVICE_PATH.findall(text)})
    return [f"{where} names {path}, which does not exist" for path in paths if not (root / path).exists()]


def test_every_service_path_the_docs_name_exists() -> None:
    problems = missing_service_paths(read(README), "README.md")
    problems += missing_service_paths(read(ARCHITECTURE), "docs/architecture.md")
    assert problems == [], "\n".join(problems)


def test_the_path_check_catches_a_path_that_is_gone() -> None:
    text = "Pacing (`service/pacing.py`) beside service/policy/ledger.py. See service/errors.py."
    assert missing_service_paths(text, "doctored") == [
        "doctored names service/pacing.py, which does not exist"
    ]


def test_a_missing_marker_fails_saying_which() -> None:
    with pytest.raises(MissingMarker, match=re.escape(README_MODULES)):
        readme_module_bullet("# A README\n\n- `service/`: the gateway.\n")
    with pytest.raises(MissingMarker, match=re.escape(LAYOUT)):
        layout_service_cell("# Architecture\n")
    with pytest.raises(MissingMarker, match=re.escape(LAYOUT_SERVICE_ROW)):
        layout_service_cell("## Layout\n\n| path | what it is | may import |\n")
    with pytest.raises(MissingMarker, match=re.escape(HTTP_API)):
        http_api_paragraph("# Architecture\n")
