"""No build context carries a secret or a virtual environment (issue 25, item 8).

Every image is built from the repository's root. Which ignore file applies depends on the
builder: BuildKit reads `deploy/<name>.Dockerfile.dockerignore` beside the Dockerfile and
nothing else; the classic builder and docker-compose 1.x (docker-py) read only the root
`.dockerignore`. So each Dockerfile has two effective ignore files, and each must keep out
`.venv*`, `build/`, `.env` and `secrets/` (at the root and deeper) while letting through
every file the Dockerfile copies.

No Docker engine runs here, so the files are read by a matcher written to Docker's rules
(moby's patternmatcher: root-anchored patterns cleaned like paths, `*` and `?` within one
path segment, `**` across segments, `!` exceptions, the last matching line wins, and a
pattern that matches a directory matches everything under it). Its own cases below hold
it to those rules.
"""

from __future__ import annotations

import posixpath
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from .promql_tools import DEPLOY, ROOT

ROOT_IGNORE = ROOT / ".dockerignore"
DOCKERFILES = sorted(DEPLOY.glob("*.Dockerfile"))

#: What no build context may hold: virtual environments, build outputs, the operator's
#: settings and secrets, at the root and inside folders a Dockerfile copies whole.
FORBIDDEN = (
    ".venv/bin/python",
    ".venv/lib/python3.11/site-packages/torch/__init__.py",
    ".venv-compat/bin/python",
    "build/backends/libtriton_pytorch.so",
    "build/compat/model_repository/inception_v4/1/model.pt",
    ".env",
    ".env.local",
    "secrets/grafana_admin_password",
    "secrets/.gitignore",
    "service/.env",
    "service/.venv/bin/python",
    "inception/build/x.o",
    "inception/secrets/token",
    "inception/data/weights.safetensors",
    "deploy/requirements/.env",
)


@dataclass(frozen=True)
class Pattern:
    text: str
    regex: re.Pattern[str]
    exception: bool


def _translate(pattern: str) -> str:
    """A cleaned, root-anchored Docker pattern as a regular expression of a slash path."""
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):  # `**/`: any number of whole segments, none too
                out.append("(?:.*/)?")
                i += 1
            else:
                out.append(".*")
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                raise ValueError(f"unclosed [ in {pattern!r}")
            out.append(pattern[i : end + 1])  # Go's classes: `[a-c]`, `[^a]`, as a regex reads them
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "^" + "".join(out) + "$"


def parse(text: str) -> list[Pattern]:
    patterns = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        if exception:
            line = line[1:].strip()
        cleaned = posixpath.normpath(line).lstrip("/")  # Docker cleans each pattern like a path
        if cleaned in ("", "."):
            continue
        patterns.append(Pattern(line, re.compile(_translate(cleaned)), exception))
    return patterns


def excluded(patterns: list[Pattern], path: str) -> bool:
    """Whether Docker leaves `path` (relative, with slashes) out of the context: the last
    pattern that matches it, or one of its parent directories, decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    decision = False
    for pattern in patterns:
        if any(pattern.regex.match(candidate) for candidate in candidates):
            decision = not pattern.exception
    return decision


@pytest.mark.parametrize(
    ("ignore", "path", "left_out"),
    [
        ("*", "service/app.py", True),
        ("*\n!service/**", "service/app.py", False),
        ("*\n!service/", "service/routes/page.py", False),
        ("*\n!service/\nservice/secret.txt", "service/secret.txt", True),
        ("*.pyc", "x.pyc", True),
        ("*.pyc", "service/x.pyc", False),  # root-anchored: one segment only
        ("**/*.pyc", "service/routes/x.pyc", True),
        ("**/*.pyc", "x.pyc", True),  # `**/` also matches no folder at all
        ("build/", "build/lib/x.so", True),
        ("/secrets", "secrets/key", True),
        ("secrets", "deploy/secrets/key", False),
        ("**/secrets", "deploy/secrets/key", True),
        (".venv*", ".venv-compat/bin/python", True),
        ("# .env", ".env", False),
        ("a?c", "abc", True),
        ("a?c", "a/c", False),
        ("[^b]x", "ax", True),
        ("[^b]x", "bx", False),
        ("*\n!inception/**\n**/*.pt", "inception/model.pt", True),
        ("**/*.pt\n!inception/**", "inception/model.pt", False),  # the last match wins
    ],
)
def test_the_matcher_follows_docker_s_rules(ignore: str, path: str, left_out: bool) -> None:
    assert excluded(parse(ignore), path) is left_out


def effective_ignores(dockerfile: Path) -> dict[str, Path]:
    """The ignore file each builder reads for `dockerfile` with the root as its context."""
    return {"BuildKit": Path(f"{dockerfile}.dockerignore"), "classic builder and docker-py": ROOT_IGNORE}


def build_commands() -> list[tuple[str, str]]:
    """(Dockerfile, context) of each `docker build -f deploy/...` the README and the
    Dockerfiles' headers tell the reader to run (continued lines joined)."""
    texts = [(ROOT / "README.md").read_text(), *(path.read_text() for path in DOCKERFILES)]
    commands = []
    for text in texts:
        joined = re.sub(r"\\\n[#\s]*", " ", text)
        for match in re.finditer(r"docker (?:buildx )?build -f (deploy/\S+\.Dockerfile)\b([^\n]*)", joined):
            commands.append((match.group(1), match.group(2).split()[-1]))
    return commands


def test_every_image_is_built_from_the_root_by_a_dockerfile_of_deploy() -> None:
    """The premise of the other tests: one context, the repository's root, whose ignore
    files are the ones checked here."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    builds = [
        (s["build"]["dockerfile"], s["build"]["context"])
        for s in compose["services"].values()
        if "build" in s
    ]
    builds += build_commands()
    assert {(ROOT / dockerfile).resolve() for dockerfile, _ in builds} == set(DOCKERFILES), builds
    for dockerfile, context in builds:
        assert (ROOT / context).resolve() == ROOT, f"{dockerfile} is built from {context}"
    assert ROOT_IGNORE.is_file(), "no root .dockerignore: a classic build sends .venv, build/ and secrets/"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
@pytest.mark.parametrize("builder", ["BuildKit", "classic builder and docker-py"])
def test_no_secret_or_environment_reaches_a_build_context(dockerfile: Path, builder: str) -> None:
    ignore = effective_ignores(dockerfile)[builder]
    assert ignore.is_file(), f"{ignore.name} is missing"
    patterns = parse(ignore.read_text())
    sent = [path for path in FORBIDDEN if not excluded(patterns, path)]
    assert not sent, f"{ignore.relative_to(ROOT)} sends {sent} to the build of {dockerfile.name}"


def copied_files(dockerfile: Path) -> list[str]:
    """The tracked files each COPY (from the context) of `dockerfile` reads."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    files = []
    for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile.read_text(), re.M):
        sources = [part for part in line.split() if not part.startswith("--")][:-1]
        for source in sources:
            source = source.rstrip("/")
            under = [path for path in tracked if path == source or path.startswith(f"{source}/")]
            assert under, f"{dockerfile.name}: COPY {source} names no tracked file"
            files += [path for path in under if "__pycache__" not in path]
    return files


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
@pytest.mark.parametrize("builder", ["BuildKit", "classic builder and docker-py"])
def test_every_copied_file_reaches_the_build(dockerfile: Path, builder: str) -> None:
    """Closed by default, yet whole: what a Dockerfile copies gets through either file."""
    patterns = parse(effective_ignores(dockerfile)[builder].read_text())
    missing = [path for path in copied_files(dockerfile) if excluded(patterns, path)]
    assert not missing, f"{builder}: {dockerfile.name} copies {missing}, which its ignore file leaves out"


def test_the_root_ignore_is_closed_by_default() -> None:
    """A new file at the root (a dump, a key, a notebook) stays out unless named."""
    patterns = parse(ROOT_IGNORE.read_text())
    for path in (
        "notes.txt",
        "id_rsa",
        ".git/config",
        "model_repository/inception_v4/1/model.pt",
        "bench/x.py",
    ):
        assert excluded(patterns, path), path
