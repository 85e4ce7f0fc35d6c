"""`python -m embedded.backend`: build Triton's PyTorch backend for the embedded tritonserver.

The tritonserver inside the `nvidia-pytriton` wheel ships no PyTorch backend, so the CPU
stack compiles `libtriton_pytorch.so` from Triton's own sources, pinned to the commits of
the r24.10 release (the one that wheel's tritonserver 2.51 belongs to), against the
libtorch inside this environment's torch wheel. libtorch's C++ API is not stable across
versions, which is why the backend is built against the very torch that runs beside it
rather than taken from elsewhere.

The result lands in `build/backends/<fingerprint>/pytorch/`, the fingerprint covering the
source archives, the torch version and its ABI, the compiler and the flags; `current`
points at the latest build. A second run with the same inputs builds nothing. Imports no
torch: it reads what it needs from the wheel's files.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS_DIR = ROOT / "build" / "backends"
CURRENT = BACKENDS_DIR / "current"
LIBRARY = Path("pytorch") / "libtriton_pytorch.so"
DEFAULT_SOURCES = ROOT.parent / "shared" / "triton-src"
DOWNLOAD_CACHE = ROOT / "build" / "triton-src"
ARCHIVE_URL = "https://github.com/triton-inference-server/{repo}/archive/{commit}.tar.gz"

# The r24.10 branch of each repository: the release of tritonserver 2.51.
PINNED_COMMITS = {
    "pytorch_backend": "e97a90061f7399b25368e2cb1f6d5c40f8cbae4e",
    "backend": "ac03a5d97403dec841ad46d0439e93db12c9268f",
    "core": "bfec7c61dc0939433f64f14e89b1973073eac8ba",
    "common": "578491fc3944f77d16a6a38e3d7691c485c47ba0",
}

# What the build needs from the system, how to check for it, and where it comes from.
DEBIAN_PACKAGES = "cmake g++ make rapidjson-dev googletest patchelf"
GOOGLETEST_SOURCE = Path("/usr/src/googletest")
RAPIDJSON_HEADER = Path("/usr/include/rapidjson/document.h")


class BuildError(RuntimeError):
    """A missing tool, source or library, with what to do about it."""


@dataclass(frozen=True)
class Torch:
    version: str
    root: Path
    cxx11_abi: str

    @property
    def lib(self) -> Path:
        return self.root / "lib"

    @property
    def includes(self) -> list[Path]:
        return [self.root / "include", self.root / "include" / "torch" / "csrc" / "api" / "include"]


def find_torch() -> Torch:
    """Locates the torch wheel and its C++ ABI from its files, without importing it."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("torch is not installed in this environment: run `make venv` (it installs torch)")
    root = Path(next(iter(spec.submodule_search_locations)))
    c10 = root / "lib" / "libc10.so"
    if not (root / "lib" / "libtorch.so").is_file() or not c10.is_file():
        raise BuildError(f"the torch at {root} carries no libtorch (lib/libtorch.so, lib/libc10.so)")
    # Older wheels state their ABI in TorchConfig.cmake; newer ones build only the C++11
    # ABI and say nothing, but their mangled names show it.
    config = root / "share" / "cmake" / "Torch" / "TorchConfig.cmake"
    match = re.search(r"_GLIBCXX_USE_CXX11_ABI=(\d)", config.read_text()) if config.is_file() else None
    abi = match.group(1) if match else ("1" if b"__cxx11" in c10.read_bytes() else "0")
    return Torch(importlib.metadata.version("torch"), root, abi)


def python_include() -> Path:
    """Python's headers (torch's headers include Python.h): this interpreter's own, else
    Debian's python3.11-dev."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (Path(sysconfig.get_paths()["include"]), Path(f"/usr/include/python{version}")):
        if (candidate / "Python.h").is_file():
            return candidate
    raise BuildError(f"no Python.h for Python {version}: apt-get install python{version}-dev")


def check_tools() -> dict[str, str]:
    """Every tool the build runs, by name, with the version the fingerprint records."""
    missing = [tool for tool in ("cmake", "g++", "make", "patchelf") if shutil.which(tool) is None]
    if not RAPIDJSON_HEADER.is_file():
        missing.append(f"rapidjson headers ({RAPIDJSON_HEADER})")
    if not (GOOGLETEST_SOURCE / "CMakeLists.txt").is_file():
        missing.append(f"googletest sources ({GOOGLETEST_SOURCE})")
    if missing:
        raise BuildError(
            f"missing to build the PyTorch backend: {', '.join(missing)}. "
            f"Install them with: apt-get install {DEBIAN_PACKAGES} (`make` does this on Debian)"
        )
    versions = {}
    for tool in ("cmake", "g++"):
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=True).stdout
        versions[tool] = out.splitlines()[0]
    return versions


def archive_name(repo: str, commit: str) -> str:
    return f"{repo}-{commit}.tar.gz"


def locate_sources(sources: Path, download: bool) -> dict[str, Path]:
    """Each pinned archive: the local copy when `sources` has it, else one downloaded once
    into build/triton-src."""
    found = {}
    for repo, commit in PINNED_COMMITS.items():
        name = archive_name(repo, commit)
        for candidate in (sources / name, DOWNLOAD_CACHE / name):
            if candidate.is_file():
                found[repo] = candidate
                break
        else:
            url = ARCHIVE_URL.format(repo=repo, commit=commit)
            if not download:
                raise BuildError(
                    f"source archive {name} is not in {sources} nor {DOWNLOAD_CACHE}, and downloads are "
                    f"off: fetch {url} into one of them"
                )
            found[repo] = fetch(url, DOWNLOAD_CACHE / name)
    return found


def fetch(url: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"[backend] downloading {url}", flush=True)
    tmp = dest.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, tmp.open("wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BuildError(
            f"could not download {url} ({exc}). Put the archive at {dest} or pass --sources DIR "
            "with the four pinned archives"
        ) from exc
    tmp.replace(dest)
    return dest


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cmake_flags(torch: Torch, python_h: Path, sources: dict[str, Path]) -> list[str]:
    """CPU-only build against the wheel's libtorch, every dependency from local sources."""
    torch_includes = ";".join(str(p) for p in torch.includes)
    return [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DTRITON_ENABLE_GPU=OFF",
        "-DTRITON_ENABLE_NVTX=OFF",
        "-DTRITON_PYTORCH_ENABLE_TORCHVISION=OFF",
        "-DTRITON_PYTORCH_ENABLE_TORCHTRT=OFF",
        "-DTRITON_MIN_CXX_STANDARD=20",  # torch 2.14's headers require C++20
        f"-DTRITON_PYTORCH_INCLUDE_PATHS={torch_includes}",
        f"-DTRITON_PYTORCH_LIB_PATHS={torch.lib}",
        f"-DCMAKE_CXX_FLAGS=-D_GLIBCXX_USE_CXX11_ABI={torch.cxx11_abi}",
        f"-DPython3_INCLUDE_DIR={python_h}",
        "-DFETCHCONTENT_FULLY_DISCONNECTED=ON",
        f"-DFETCHCONTENT_SOURCE_DIR_REPO-COMMON={sources['common']}",
        f"-DFETCHCONTENT_SOURCE_DIR_REPO-CORE={sources['core']}",
        f"-DFETCHCONTENT_SOURCE_DIR_REPO-BACKEND={sources['backend']}",
        f"-DFETCHCONTENT_SOURCE_DIR_GOOGLETEST={GOOGLETEST_SOURCE}",
    ]


def runpath(torch: Torch) -> str:
    """$ORIGIN, then torch's libraries (whose own RUNPATHs find their CUDA libraries)."""
    return ":".join(["$ORIGIN", str(torch.lib)])


def fingerprint(archives: dict[str, Path], torch: Torch, tools: dict[str, str], flags: Sequence[str]) -> str:
    parts = {
        "archives": {repo: sha256_file(path) for repo, path in sorted(archives.items())},
        "torch": [torch.version, str(torch.root), torch.cxx11_abi],
        "tools": tools,
        # Paths of the extracted sources differ per build folder; the rest of the flags count.
        "flags": [f for f in flags if "FETCHCONTENT_SOURCE_DIR_REPO" not in f],
        "runpath": runpath(torch),
        "builder": sha256_file(Path(__file__)),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def extract(archives: dict[str, Path], dest: Path) -> dict[str, Path]:
    """Unpacks each archive, which must hold one top folder `<repo>-<commit>/`."""
    roots = {}
    for repo, archive in archives.items():
        top = f"{repo}-{PINNED_COMMITS[repo]}"
        with tarfile.open(archive) as tar:
            names = tar.getnames()
            if not names or any(n != top and not n.startswith(top + "/") for n in names):
                raise BuildError(f"{archive} is not the archive of {repo} at {PINNED_COMMITS[repo]}")
            tar.extractall(dest, filter="data")
        roots[repo] = dest / top
    return roots


def run(command: Sequence[str], cwd: Path, log: Path) -> None:
    with log.open("ab") as out:
        out.write(f"$ {' '.join(command)}\n".encode())
        out.flush()
        code = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise BuildError(f"`{' '.join(command[:3])} ...` failed with code {code}; log {log}:\n{tail}")


def installed_library(backends: Path = BACKENDS_DIR) -> Path | None:
    library = backends / CURRENT.name / LIBRARY
    return library if library.is_file() else None


def build(sources: Path, jobs: int, download: bool, backends: Path = BACKENDS_DIR) -> Path:
    """Builds (or finds already built) the backend; returns its backend directory."""
    torch = find_torch()
    tools = check_tools()
    python_h = python_include()
    archives = locate_sources(sources, download)
    placeholder = {repo: Path(f"<{repo}>") for repo in PINNED_COMMITS}
    key = fingerprint(archives, torch, tools, cmake_flags(torch, python_h, placeholder))
    target = backends / key
    current = backends / CURRENT.name
    if (target / LIBRARY).is_file():
        print(f"[backend] up to date: {target / LIBRARY} (torch {torch.version})", flush=True)
    else:
        start = time.monotonic()
        backends.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"build-{key}-", dir=backends))
        log = work / "build.log"
        print(
            f"[backend] building libtriton_pytorch.so against torch {torch.version} (log {log})", flush=True
        )
        roots = extract(archives, work / "src")
        build_dir = work / "cmake"
        build_dir.mkdir()
        flags = cmake_flags(torch, python_h, roots)
        run(["cmake", *flags, str(roots["pytorch_backend"])], build_dir, log)
        run(["cmake", "--build", ".", "--target", "triton-pytorch-backend", "-j", str(jobs)], build_dir, log)
        built = build_dir / "libtriton_pytorch.so"
        if not built.is_file():
            raise BuildError(f"the build produced no {built}; see {log}")
        # The wheel ships libtritonserver renamed; the backend's TRITONSERVER_* symbols
        # resolve from the server that loads it, so the link-time dependency goes.
        run(["patchelf", "--remove-needed", "libtritonserver.so", str(built)], build_dir, log)
        run(["patchelf", "--set-rpath", runpath(torch), str(built)], build_dir, log)
        staged = work / "out"
        (staged / LIBRARY.parent).mkdir(parents=True)
        shutil.copy2(built, staged / LIBRARY)
        (staged / "build.json").write_text(
            json.dumps(
                {"torch": torch.version, "commits": PINNED_COMMITS, "tools": tools, "fingerprint": key},
                indent=2,
            )
            + "\n"
        )
        shutil.rmtree(target, ignore_errors=True)
        staged.replace(target)  # appears whole or not at all
        shutil.rmtree(work, ignore_errors=True)
        print(f"[backend] built {target / LIBRARY} in {time.monotonic() - start:.0f} s", flush=True)
    tmp_link = backends / f".current-{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(key, target_is_directory=True)
    tmp_link.replace(current)
    return current


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedded.backend", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sources",
        type=Path,
        default=Path(os.environ.get("TRITON_SRC_DIR", DEFAULT_SOURCES)),
        help="folder with the pinned <repo>-<commit>.tar.gz archives (default ../shared/triton-src)",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--offline", action="store_true", help="never download a missing archive")
    parser.add_argument("--backends", type=Path, default=BACKENDS_DIR)
    args = parser.parse_args(argv)
    try:
        build(args.sources, args.jobs, download=not args.offline, backends=args.backends)
    except BuildError as exc:
        print(f"[backend] error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
