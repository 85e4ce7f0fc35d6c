"""Installs the GPU kit (`bench/gpu/kit.py`) on the machine it was carried to, with no
network: the first stage of `python -m bench.gpu.stack`.

Imports nothing outside the standard library but the kit's names (`layout.py`), because it
runs before the kit's packages are there. What it produces, and where each path comes from:

- the tritonserver, unpacked from the kit's `tritonserver.tar.xz` into the run's work
  folder (its bundled libraries beside it, found by the binary's own RPATH; the folder
  also goes first on `LD_LIBRARY_PATH`, as `embedded/tritonserver.py` does for the wheel);
- the Python packages, installed from the kit's `wheels/` into `<work>/site` with
  `pip install --target`, only those the machine's own packages do not already satisfy
  (pip's resolver decides, offline, with `--dry-run --report`); `<work>/site` and the
  repository root (the project's own code, which travels with the working tree) make the
  `PYTHONPATH` of this process and of every child (gateway, load clients);
- the library path of the PyTorch backend: this machine's torch (`torch/lib`, located
  without importing torch) and the CUDA libraries of its `nvidia/*/lib` folders, put on
  `LD_LIBRARY_PATH` ahead of the RUNPATH the kit's backend was built with, so a torch
  installed somewhere else than the image's recipe says is still the one loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.gpu.layout import MANIFEST, SERVER_BINARY, SERVER_LIBS


class KitInstallError(RuntimeError):
    """The kit is missing, damaged, or cannot be installed here."""


def read_manifest(kit: Path) -> dict[str, Any]:
    path = kit / MANIFEST
    if not path.is_file():
        raise KitInstallError(f"no {MANIFEST} in {kit}: build the kit with `make gpu-kit` and carry it")
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


def verify(kit: Path, manifest: Mapping[str, Any]) -> list[str]:
    """Each file the manifest lists, at its size and sha256: the problems found."""
    problems = []
    for relative, expected in manifest["files"].items():
        path = kit / relative
        if not path.is_file():
            problems.append(f"{relative}: missing")
            continue
        if path.stat().st_size != expected["bytes"]:
            problems.append(f"{relative}: {path.stat().st_size} bytes, expected {expected['bytes']}")
            continue
        with path.open("rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != expected["sha256"]:
                problems.append(f"{relative}: sha256 differs")
    return problems


@dataclass(frozen=True)
class Server:
    """An unpacked tritonserver: `home` holds `bin/tritonserver` as the wheel's
    `pytriton/tritonserver` does; `libs` its bundled libraries."""

    home: Path
    libs: Path

    @property
    def binary(self) -> Path:
        return self.home / "bin" / "tritonserver"


def unpack_server(kit: Path, manifest: Mapping[str, Any], work: Path) -> Server:
    piece = manifest["pieces"].get("tritonserver")
    if piece is None:
        raise KitInstallError("the kit carries no tritonserver (built without the `server` part)")
    dest = work / "server"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with tarfile.open(kit / piece["path"]) as tar:
        tar.extractall(dest, filter="data")
    top = dest / piece["top"]
    server = Server(top / SERVER_BINARY.parent.parent, top / SERVER_LIBS)
    if not os.access(server.binary, os.X_OK):
        raise KitInstallError(f"the kit's archive holds no executable {SERVER_BINARY}")
    return server


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(filename: str) -> str:
    return normalise(filename.split("-")[0])


def _pip(python: str, args: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    # No index, no configured find-links or constraints: only the kit's wheels.
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run(
        [python, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def install_wheels(
    kit: Path, manifest: Mapping[str, Any], target: Path, python: str = sys.executable, timeout: float = 120
) -> dict[str, Any]:
    """Installs into `target` the kit's wheels that this Python's packages do not already
    satisfy. Returns what was installed, and how it was decided."""
    piece = manifest["pieces"].get("wheels")
    target.mkdir(parents=True, exist_ok=True)
    if piece is None:
        return {"installed": [], "decided_by": "nothing carried"}
    wheels_dir = kit / piece["path"]
    wheels = {wheel_name(w.name): w for w in sorted(wheels_dir.glob("*.whl"))}
    requirements = kit / piece["requirements"]
    report = target.parent / "pip-report.json"
    dry = _pip(
        python,
        [
            *("install", "--dry-run", "--no-index", "--quiet"),
            *("--find-links", str(wheels_dir), "--report", str(report), "-r", str(requirements)),
        ],
        timeout,
    )
    result: dict[str, Any] = {}
    if dry.returncode == 0 and report.is_file():
        chosen = [item["metadata"]["name"] for item in json.loads(report.read_text()).get("install", [])]
        selected = [wheels[normalise(n)] for n in chosen]
        result["decided_by"] = "pip's resolver against this machine's packages"
    else:
        # The machine's packages conflict with what the kit can offer: take every wheel.
        selected = list(wheels.values())
        result["decided_by"] = "all carried wheels (the resolver failed)"
        result["resolver_error"] = (dry.stderr or dry.stdout).strip()[-2000:]
    if selected:
        done = _pip(
            python,
            ["install", "--no-index", "--no-deps", "--quiet", "--target", str(target), *map(str, selected)],
            timeout,
        )
        if done.returncode != 0:
            raise KitInstallError(f"pip could not install the kit's wheels: {done.stderr.strip()[-2000:]}")
    result["installed"] = sorted(w.name for w in selected)
    return result


def torch_libraries() -> list[str]:
    """This machine's torch/lib, then the CUDA libraries its wheel depends on (the
    `nvidia/cu13/lib` folder first, then any other `nvidia/*/lib`), located without
    importing torch. Empty where torch is not installed."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return []
    torch_dir = Path(next(iter(spec.submodule_search_locations)))
    folders = [torch_dir / "lib"]
    nvidia = torch_dir.parent / "nvidia"
    if nvidia.is_dir():
        folders.append(nvidia / "cu13" / "lib")
        folders += sorted(p for p in nvidia.glob("*/lib") if p.is_dir())
    seen: list[str] = []
    for folder in folders:
        if folder.is_dir() and str(folder) not in seen:
            seen.append(str(folder))
    return seen


@dataclass
class Environment:
    """The paths that the run adds for itself and its children."""

    pythonpath: list[str] = field(default_factory=list)
    ld_library_path: list[str] = field(default_factory=list)

    def apply(self, base: Mapping[str, str]) -> dict[str, str]:
        env = dict(base)
        for key, paths in (("PYTHONPATH", self.pythonpath), ("LD_LIBRARY_PATH", self.ld_library_path)):
            env[key] = os.pathsep.join([*paths, *(p for p in env.get(key, "").split(os.pathsep) if p)])
        return env

    def activate(self) -> None:
        """This process imports from the installed packages and the project first."""
        for path in reversed(self.pythonpath):
            if path not in sys.path:
                sys.path.insert(0, path)
        importlib.invalidate_caches()


def import_check(env: Mapping[str, str], modules: Sequence[str], timeout: float = 60) -> dict[str, str]:
    """Imports each module in a fresh interpreter with `env`: module -> "ok" or the error."""
    results = {}
    for module in modules:
        done = subprocess.run(
            [sys.executable, "-c", f"import {module}"],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        results[module] = (
            "ok" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["failed"])[-1]
        )
    return results
