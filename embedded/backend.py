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

`--gpu` builds the same backend with `TRITON_ENABLE_GPU=ON` for another machine, against
the headers and libraries of a torch wheel unpacked anywhere (`--torch-root`, the wheel's
`torch/` folder; nothing is installed or imported), with nvcc from `--cuda-root`, and a
RUNPATH naming where that machine keeps torch (`--runpath`). `make gpu-kit` uses it
(`bench/gpu/kit.py` says why the GPU backend is built here rather than on the GPU
machine). Two things differ from the CPU build: the `backend` repository's CUDA kernel
lists architectures that CUDA 13 no longer knows (53-72), so the extracted copy gets the
list trimmed (`--cuda-architectures`), and the result goes to its own backends folder so
that the CPU build's `current` is never replaced by a library this machine cannot load.
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
# GPU builds for another machine: never the CPU stack's `current`.
GPU_BACKENDS_DIR = ROOT / "build" / "backends-gpu"
CURRENT = BACKENDS_DIR / "current"
LIBRARY = Path("pytorch") / "libtriton_pytorch.so"
DOWNLOAD_CACHE = ROOT / "build" / "triton-src"
# Where the pinned archives are looked for first: the folder TRITON_SRC_DIR names (a CI
# machine that cannot download keeps them there), else the download cache.
SOURCES_ENV = "TRITON_SRC_DIR"
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

# The GPU build: CUDA 13 compiles for Turing (7.5) and newer only; the `backend`
# repository's kernel still lists 5.3-7.2, which nvcc 13 refuses.
DEFAULT_CUDA_ROOT = Path("/usr/local/cuda-13.0")
DEFAULT_CUDA_ARCHITECTURES = "75-real;80-real;86-real;89-real;90-real"
_KERNEL_ARCHITECTURES = re.compile(
    r'(set_target_properties\(kernel_library_new PROPERTIES CUDA_ARCHITECTURES )"[^"]*"'
)


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


@dataclass(frozen=True)
class Gpu:
    """What a `TRITON_ENABLE_GPU=ON` build needs beyond the CPU one."""

    cuda_root: Path = DEFAULT_CUDA_ROOT
    architectures: str = DEFAULT_CUDA_ARCHITECTURES

    @property
    def nvcc(self) -> Path:
        return self.cuda_root / "bin" / "nvcc"


def _installed_torch_root() -> Path:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("torch is not installed in this environment: run `make venv` (it installs torch)")
    return Path(next(iter(spec.submodule_search_locations)))


def _unpacked_torch_version(root: Path) -> str:
    """`__version__` from an unpacked wheel's `torch/version.py`, read, not imported."""
    version_file = root / "version.py"
    match = (
        re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", version_file.read_text(), re.M)
        if (version_file.is_file())
        else None
    )
    if match is None:
        raise BuildError(f"{root} is not a torch package folder: no __version__ in {version_file}")
    return match.group(1)


def find_torch(root: Path | None = None) -> Torch:
    """Locates a torch and its C++ ABI from its files, without importing it: this
    environment's, or the unpacked wheel at `root` (the folder that holds `lib/`,
    `include/` and `version.py`)."""
    if root is None:
        root = _installed_torch_root()
        version = importlib.metadata.version("torch")
    else:
        root = root.resolve()
        version = _unpacked_torch_version(root)
    c10 = root / "lib" / "libc10.so"
    if not (root / "lib" / "libtorch.so").is_file() or not c10.is_file():
        raise BuildError(f"the torch at {root} carries no libtorch (lib/libtorch.so, lib/libc10.so)")
    # Older wheels state their ABI in TorchConfig.cmake; newer ones build only the C++11
    # ABI and say nothing, but their mangled names show it.
    config = root / "share" / "cmake" / "Torch" / "TorchConfig.cmake"
    match = re.search(r"_GLIBCXX_USE_CXX11_ABI=(\d)", config.read_text()) if config.is_file() else None
    abi = match.group(1) if match else ("1" if b"__cxx11" in c10.read_bytes() else "0")
    return Torch(version, root, abi)


def python_include() -> Path:
    """Python's headers (torch's headers include Python.h): this interpreter's own, else
    Debian's python3.11-dev."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (Path(sysconfig.get_paths()["include"]), Path(f"/usr/include/python{version}")):
        if (candidate / "Python.h").is_file():
            return candidate
    raise BuildError(f"no Python.h for Python {version}: apt-get install python{version}-dev")


def check_tools(gpu: Gpu | None = None) -> dict[str, str]:
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
    if gpu is not None:
        if not os.access(gpu.nvcc, os.X_OK):
            raise BuildError(
                f"no nvcc at {gpu.nvcc}: the GPU build needs the CUDA toolkit whose major version "
                "matches the torch it links (pass --cuda-root)"
            )
        out = subprocess.run([str(gpu.nvcc), "--version"], capture_output=True, text=True, check=True).stdout
        versions["nvcc"] = out.strip().splitlines()[-1]
    return versions


def archive_name(repo: str, commit: str) -> str:
    return f"{repo}-{commit}.tar.gz"


def default_sources() -> Path:
    """The folder TRITON_SRC_DIR names, else the download cache."""
    named = os.environ.get(SOURCES_ENV)
    return Path(named) if named else DOWNLOAD_CACHE


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


def cmake_flags(torch: Torch, python_h: Path, sources: dict[str, Path], gpu: Gpu | None = None) -> list[str]:
    """The build against the wheel's libtorch, every dependency from local sources; CPU-only
    unless `gpu` is given."""
    torch_includes = ";".join(str(p) for p in torch.includes)
    gpu_flags = (
        [
            "-DTRITON_ENABLE_GPU=ON",
            f"-DCMAKE_CUDA_COMPILER={gpu.nvcc}",
            f"-DCUDAToolkit_ROOT={gpu.cuda_root}",
            # Recorded for the fingerprint; the kernel's own list is trimmed in its source.
            f"-DCMAKE_CUDA_ARCHITECTURES={gpu.architectures}",
        ]
        if gpu is not None
        else ["-DTRITON_ENABLE_GPU=OFF"]
    )
    return [
        "-DCMAKE_BUILD_TYPE=Release",
        *gpu_flags,
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


def runpath(torch: Torch, libraries: Sequence[str] | None = None) -> str:
    """$ORIGIN, then where torch's libraries are: by default the torch built against
    (whose own RUNPATHs find its CUDA libraries), or the folders given, e.g. another
    machine's torch/lib and nvidia/cu13/lib."""
    return ":".join(["$ORIGIN", *(libraries if libraries is not None else [str(torch.lib)])])


def fingerprint(
    archives: dict[str, Path],
    torch: Torch,
    tools: dict[str, str],
    flags: Sequence[str],
    rpath: str | None = None,
) -> str:
    parts = {
        "archives": {repo: sha256_file(path) for repo, path in sorted(archives.items())},
        "torch": [torch.version, str(torch.root), torch.cxx11_abi],
        "tools": tools,
        # Paths of the extracted sources differ per build folder; the rest of the flags count.
        "flags": [f for f in flags if "FETCHCONTENT_SOURCE_DIR_REPO" not in f],
        "runpath": rpath if rpath is not None else runpath(torch),
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


def trim_cuda_architectures(backend_root: Path, architectures: str) -> None:
    """Sets the architectures of the `backend` repository's CUDA kernel in the extracted
    copy; fails loudly if the line is not where r24.10 has it."""
    cmakelists = backend_root / "CMakeLists.txt"
    text = cmakelists.read_text()
    patched, count = _KERNEL_ARCHITECTURES.subn(rf'\g<1>"{architectures}"', text)
    if count != 1:
        raise BuildError(f"{cmakelists}: the kernel's CUDA_ARCHITECTURES line was not found once ({count})")
    cmakelists.write_text(patched)


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


def build(
    sources: Path,
    jobs: int,
    download: bool,
    backends: Path = BACKENDS_DIR,
    *,
    torch_root: Path | None = None,
    gpu: Gpu | None = None,
    libraries: Sequence[str] | None = None,
) -> Path:
    """Builds (or finds already built) the backend; returns its backend directory.

    `torch_root`: an unpacked torch wheel to build against instead of this environment's;
    `gpu`: build with `TRITON_ENABLE_GPU=ON`; `libraries`: the RUNPATH after `$ORIGIN`
    (default: the torch built against)."""
    torch = find_torch(torch_root)
    tools = check_tools(gpu)
    python_h = python_include()
    archives = locate_sources(sources, download)
    placeholder = {repo: Path(f"<{repo}>") for repo in PINNED_COMMITS}
    rpath = runpath(torch, libraries)
    key = fingerprint(archives, torch, tools, cmake_flags(torch, python_h, placeholder, gpu), rpath)
    target = backends / key
    current = backends / CURRENT.name
    kind = "GPU" if gpu is not None else "CPU"
    if (target / LIBRARY).is_file():
        print(f"[backend] up to date: {target / LIBRARY} ({kind}, torch {torch.version})", flush=True)
    else:
        start = time.monotonic()
        backends.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"build-{key}-", dir=backends))
        log = work / "build.log"
        print(
            f"[backend] building the {kind} libtriton_pytorch.so against torch {torch.version} (log {log})",
            flush=True,
        )
        roots = extract(archives, work / "src")
        if gpu is not None:
            trim_cuda_architectures(roots["backend"], gpu.architectures)
        build_dir = work / "cmake"
        build_dir.mkdir()
        flags = cmake_flags(torch, python_h, roots, gpu)
        run(["cmake", *flags, str(roots["pytorch_backend"])], build_dir, log)
        run(["cmake", "--build", ".", "--target", "triton-pytorch-backend", "-j", str(jobs)], build_dir, log)
        built = build_dir / "libtriton_pytorch.so"
        if not built.is_file():
            raise BuildError(f"the build produced no {built}; see {log}")
        # The wheel ships libtritonserver renamed; the backend's TRITONSERVER_* symbols
        # resolve from the server that loads it, so the link-time dependency goes.
        run(["patchelf", "--remove-needed", "libtritonserver.so", str(built)], build_dir, log)
        run(["patchelf", "--set-rpath", rpath, str(built)], build_dir, log)
        staged = work / "out"
        (staged / LIBRARY.parent).mkdir(parents=True)
        shutil.copy2(built, staged / LIBRARY)
        record = {
            "torch": torch.version,
            "gpu": gpu is not None,
            "cuda_architectures": gpu.architectures if gpu is not None else None,
            "runpath": rpath,
            "commits": PINNED_COMMITS,
            "tools": tools,
            "fingerprint": key,
        }
        (staged / "build.json").write_text(json.dumps(record, indent=2) + "\n")
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
        default=default_sources(),
        help=f"folder with the pinned <repo>-<commit>.tar.gz archives (default: ${SOURCES_ENV} when set); "
        f"an archive not there is taken from, or downloaded once into, {DOWNLOAD_CACHE.relative_to(ROOT)}",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--offline", action="store_true", help="never download a missing archive")
    parser.add_argument(
        "--backends",
        type=Path,
        default=None,
        help="where builds go (default build/backends; build/backends-gpu with --gpu)",
    )
    parser.add_argument("--gpu", action="store_true", help="build with TRITON_ENABLE_GPU=ON (needs nvcc)")
    parser.add_argument(
        "--torch-root",
        type=Path,
        default=None,
        help="an unpacked torch wheel's torch/ folder to build against (default: this environment's torch)",
    )
    parser.add_argument("--cuda-root", type=Path, default=DEFAULT_CUDA_ROOT, help="the CUDA toolkit (--gpu)")
    parser.add_argument(
        "--cuda-architectures",
        default=DEFAULT_CUDA_ARCHITECTURES,
        help="CMake CUDA_ARCHITECTURES of the backend's kernel (--gpu)",
    )
    parser.add_argument(
        "--runpath",
        action="append",
        default=None,
        metavar="DIR",
        help="a folder the library finds torch's (and CUDA's) libraries in, after $ORIGIN; repeat for "
        "several (default: the lib/ of the torch built against)",
    )
    args = parser.parse_args(argv)
    gpu = Gpu(args.cuda_root, args.cuda_architectures) if args.gpu else None
    backends = args.backends or (GPU_BACKENDS_DIR if args.gpu else BACKENDS_DIR)
    try:
        build(
            args.sources,
            args.jobs,
            download=not args.offline,
            backends=backends,
            torch_root=args.torch_root,
            gpu=gpu,
            libraries=args.runpath,
        )
    except BuildError as exc:
        print(f"[backend] error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
