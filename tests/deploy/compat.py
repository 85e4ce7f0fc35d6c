"""`make compat`: compose's model path, on this machine.

Compose exports the repository with the torch that deploy/models.Dockerfile pins (the
PyTorch of the NGC Triton image, whose libtorch backend serves the files); every other
test exports and serves with the development torch. This prepares the other path, once
per pin (each step is skipped when its inputs are unchanged):

1. `.venv-compat`: that torch (PyPI's build, the CPU one's index being unreachable here;
   with the CUDA libraries its import loads, and without PyTorch's triton compiler, which
   nothing here imports), and the models image's own lock (deploy/requirements/models.txt,
   hash-checked, as the image installs it);
2. `build/compat/model_repository`: the repository exported by that torch, all networks;
3. `build/backends-compat`: Triton's PyTorch backend built against that torch's libtorch.

tests/deploy/test_compat.py then serves the export through the embedded tritonserver with
that backend and checks the answers against the same torch in-process.

    python -m tests.deploy.compat      # what `make compat` runs before the test
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "models.Dockerfile"
LOCK = ROOT / "deploy" / "requirements" / "models.txt"
VENV = ROOT / ".venv-compat"
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".compat.json"
REPOSITORY = ROOT / "build" / "compat" / "model_repository"
BACKENDS = ROOT / "build" / "backends-compat"
#: Requirements of PyPI's torch wheel that `import torch` does not need.
NOT_IMPORTED = ("triton",)


def pinned_torch() -> str:
    """The torch the models image installs (ARG TORCH_VERSION)."""
    match = re.search(r"^ARG TORCH_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M)
    if match is None:
        raise SystemExit(f"{DOCKERFILE} pins no TORCH_VERSION")
    return match.group(1)


def torch_root() -> Path:
    return next(VENV.glob("lib/python3*/site-packages/torch"))


def log(message: str) -> None:
    print(f"[compat] {message}", flush=True)


def run(*command: str | Path, cwd: Path = ROOT, env: dict[str, str] | None = None) -> None:
    subprocess.run([str(c) for c in command], check=True, cwd=cwd, env=env)


def environment(version: str) -> None:
    """The second environment, unless its stamp says it holds this torch and this lock."""
    wanted = {"torch": version, "lock": hashlib.sha256(LOCK.read_bytes()).hexdigest()}
    if STAMP.is_file() and json.loads(STAMP.read_text()) == wanted:
        log(f"{VENV.name}: torch {version} and the models lock, as before")
        return
    start = time.monotonic()
    if not PYTHON.exists():
        run(sys.executable, "-m", "venv", VENV)
    pip = (PYTHON, "-m", "pip", "install", "-q", "--disable-pip-version-check")
    run(*pip, "--no-deps", f"torch=={version}")
    # The libraries torch's own metadata pins for this platform (this interpreter's markers:
    # the same Python and machine).
    from packaging.requirements import Requirement

    requires = subprocess.run(
        [PYTHON, "-c", "import importlib.metadata as m; print('\\n'.join(m.requires('torch') or []))"],
        check=True, capture_output=True, text=True,
    ).stdout.splitlines()  # fmt: skip
    libraries = []
    for line in requires:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        if requirement.name in NOT_IMPORTED or not str(requirement.specifier).startswith("=="):
            continue
        libraries.append(f"{requirement.name}{requirement.specifier}")
    if libraries:
        run(*pip, "--no-deps", *libraries)
    run(*pip, "--no-deps", "--require-hashes", "-r", LOCK)
    run(PYTHON, "-c", "import torch, numpy, safetensors; torch.ones(1)")
    STAMP.write_text(json.dumps(wanted) + "\n")
    log(f"{VENV.name}: torch {version} and {len(libraries)} libraries in {time.monotonic() - start:.0f} s")


def export() -> None:
    """The exporter under that torch (it skips networks whose inputs, torch included, are
    unchanged); random weights, as every test's export."""
    start = time.monotonic()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(Path.home())}
    run(PYTHON, "-m", "inception.export", "--repository", REPOSITORY, "--hub", "never", env=env)
    log(f"export: {time.monotonic() - start:.0f} s")


#: A header that Triton r24.10's PyTorch backend includes (src/libtorch_utils.h) and that
#: PyPI's torch 2.5.1 wheel does not ship (the NGC image's source build of libtorch does).
#: The backend calls nothing declared there; the shim declares the four functions of that
#: interface which libtorch_cpu.so of the wheel exports (checked: `nm -D`), so that the
#: include resolves to declarations that match the library.
FUSER_HEADER = Path("include/torch/csrc/jit/codegen/fuser/interface.h")
FUSER_SHIM = """#pragma once
// Written by tests/deploy/compat.py: PyPI's torch wheel lacks this header, which Triton's
// PyTorch backend includes. The declarations match symbols libtorch_cpu.so exports.
#include <torch/csrc/Export.h>

namespace torch {
namespace jit {
TORCH_API bool canFuseOnCPU();
TORCH_API bool canFuseOnGPU();
TORCH_API void overrideCanFuseOnCPU(bool value);
TORCH_API void overrideCanFuseOnGPU(bool value);
} // namespace jit
} // namespace torch
"""


def fuser_header(root: Path) -> None:
    """The shim, where the wheel has no such header, once its symbols are found."""
    header = root / FUSER_HEADER
    if header.exists():
        return
    exported = subprocess.run(
        ["nm", "-DC", str(root / "lib" / "libtorch_cpu.so")], check=True, capture_output=True, text=True
    ).stdout
    for name in (
        "canFuseOnCPU()",
        "canFuseOnGPU()",
        "overrideCanFuseOnCPU(bool)",
        "overrideCanFuseOnGPU(bool)",
    ):
        if f"torch::jit::{name}" not in exported:
            raise SystemExit(f"libtorch_cpu.so exports no torch::jit::{name}: the shim would not match")
    header.parent.mkdir(parents=True, exist_ok=True)
    header.write_text(FUSER_SHIM)
    log(f"wrote {header.relative_to(root)}: the wheel lacks it (see FUSER_HEADER)")


def backend() -> None:
    """Triton's PyTorch backend against that torch's libtorch (cached by its inputs)."""
    start = time.monotonic()
    fuser_header(torch_root())
    run(sys.executable, "-m", "embedded.backend", "--torch-root", torch_root(), "--backends", BACKENDS)
    log(f"backend: {time.monotonic() - start:.0f} s")


def main() -> int:
    version = pinned_torch()
    log(f"deploy/models.Dockerfile pins torch {version}")
    environment(version)
    export()
    backend()
    return 0


if __name__ == "__main__":
    sys.exit(main())
