"""`make gpu-kit` (`python -m bench.gpu.kit --out build/gpu-kit`): everything a lent GPU
machine lacks to run the whole stack offline, in one folder of at most 60 MiB.

The GPU machine has Python 3.12, torch 2.11.0+cu130, nvcc 13, cmake and ninja, and no
tritonserver, fastapi, pydantic or tritonclient; it cannot fetch anything, and what reaches
it is the working tree plus a few carried folders, 64 MiB in all. So the kit holds:

- `tritonserver.tar.xz`: the tritonserver 2.51 of the `nvidia-pytriton` wheel (a GPU build
  with the CUDA 12.6 runtime bundled), trimmed to the binary and the bundled libraries it
  needs, found by following ELF `NEEDED` entries from the binary through the wheel's
  `nvidia_pytriton.libs` (the Python backend, its per-version stubs and its libpython,
  and the local cache plugin are left out: we serve `pytorch_libtorch` models and the
  ensemble, which is built into the server). The wheel's layout is kept, so the binary's
  own RPATH (`$ORIGIN/../../../nvidia_pytriton.libs`) finds its libraries;
- `backend/pytorch/libtriton_pytorch.so`: Triton's PyTorch backend with
  `TRITON_ENABLE_GPU=ON`, built HERE by `embedded/backend.py` with the nvcc 13 of this
  machine against the headers and libraries of the PyPI torch 2.11.0 cp312 wheel (the
  same version, CUDA major and cuDNN as the GPU machine's torch 2.11.0+cu130), its
  RUNPATH naming where that machine keeps torch and its CUDA 13 libraries (`DEVICE_RUNPATH`;
  the device command puts the paths it finds there on `LD_LIBRARY_PATH` first, which a
  RUNPATH yields to). Why here and not there: the machine is lent for 15 minutes in all,
  and a build there (the sources, rapidjson and googletest headers and patchelf carried,
  about two minutes of configure and compile) would spend those minutes and could only be
  debugged there; built here, it is built and checked (NEEDED, RUNPATH, the CUDA runtime
  it links) before any GPU time is spent, and nvcc 13 here matches the CUDA 13 of that
  torch;
- `wheels/`: cp312 manylinux wheels of what the gateway and tritonclient need that the
  machine lacks (`CARRIED`), at the versions installed in this project's `.venv`, i.e.
  the versions the tests here run, and `requirements.txt` naming the top-level ones;
- `photos/`: real photos from scikit-image's and matplotlib's packages, re-encoded as
  JPEG (quality 90) at ImageNet's typical 500x375 and at larger sizes;
- `manifest.json`: every file's size and sha256, and what each piece is.

The builder fails, loudly, when the folder would exceed the limit. The downloads (the torch
wheel, about 530 MB, and the small wheels) and the unpacked torch are cached in
`build/gpu-kit-cache/`, outside the kit.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.gpu.layout import (
    BACKEND_DIR,
    MANIFEST,
    PHOTOS_DIR,
    REQUIREMENTS,
    SERVER_ARCHIVE,
    SERVER_BINARY,
    SERVER_LIBS,
    SERVER_TOP,
    WHEELS_DIR,
)
from embedded import backend

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "build" / "gpu-kit"
DEFAULT_CACHE = ROOT / "build" / "gpu-kit-cache"
LIMIT_BYTES = 60 * 2**20
PARTS = ("server", "backend", "wheels", "photos")

# The GPU machine, as its image is described (Python 3.12 in /opt/torch/.venv, torch
# 2.11.0+cu130 from PyPI, whose CUDA 13 libraries live in nvidia/cu13/lib beside it).
DEVICE_PYTHON = "3.12"
DEVICE_TORCH = "2.11.0"
DEVICE_SITE_PACKAGES = "/opt/torch/.venv/lib/python3.12/site-packages"
DEVICE_RUNPATH = (f"{DEVICE_SITE_PACKAGES}/torch/lib", f"{DEVICE_SITE_PACKAGES}/nvidia/cu13/lib")
DEVICE_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

# The Python packages of the GPU machine's image (as the lending machine's package list
# read on 2026-11-17), by normalised name. Only these are trusted to be there.
_DEVICE_PACKAGE_NAMES = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
    jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
    lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
    ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
    pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
    protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
    pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
    scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
    torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
    treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
    werkzeug wheel wrapt xarray xxhash yarl zipp"""
DEVICE_PACKAGES = frozenset(_DEVICE_PACKAGE_NAMES.split())

# What the device command runs beyond torch: the gateway (`pyproject.toml`'s gateway extra
# less what it does not use there) and its HTTP parser. Extras as they are installed.
TOP_LEVEL = (
    "fastapi",
    "uvicorn",
    "httptools",  # uvicorn's fast HTTP parser (its `standard` extra): 16 workers need it
    "tritonclient[grpc]",
    "pydantic",
    "pydantic-settings",
    "python-multipart",
    "prometheus-client",
    "pillow",
    "numpy",
)
# Carried: everything those need that the machine lacks, and the few it has whose version
# our pins demand (tritonclient wants grpcio >= 1.81 and protobuf 6; pydantic and anyio a
# recent typing-extensions). The device command installs from these only what its own
# packages do not already satisfy.
CARRIED = (
    "fastapi",
    "starlette",
    "annotated-doc",
    "opentelemetry-api",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "anyio",
    "pydantic-settings",
    "python-dotenv",
    "uvicorn",
    "httptools",
    "python-multipart",
    "tritonclient",
    "python-rapidjson",
    "grpcio",
    "protobuf",
)

# Photos (package, path inside it) and the sizes they are written at: ImageNet's typical
# 500x375 for all, and larger ones that make decoding cost what a camera's photo costs.
PHOTO_SOURCES = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}
PHOTO_SIZES = {
    (500, 375): tuple(PHOTO_SOURCES),
    (1024, 768): ("coffee", "motorcycle"),
    (2048, 1536): ("astronaut",),
}
JPEG_QUALITY = 90


class KitError(RuntimeError):
    """The kit cannot be built as asked: what is wrong, and what to do."""


def log(message: str) -> None:
    print(f"[gpu-kit] {message}", flush=True)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise KitError(f"{name} is not installed here: run `make venv`")
    return Path(next(iter(spec.submodule_search_locations)))


# ---------------------------------------------------------------------------- tritonserver


def elf_needed(path: Path) -> list[str]:
    """The `NEEDED` entries of an ELF file's dynamic section, in order (binutils' readelf)."""
    out = subprocess.run(
        ["readelf", "--dynamic", "--wide", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


@dataclass
class Closure:
    """The libraries a set of ELF files loads: those found in the searched folders (to be
    carried) and those left to the host (glibc, libstdc++, zlib...)."""

    carried: dict[str, Path] = field(default_factory=dict)
    host: set[str] = field(default_factory=set)


def library_closure(roots: Iterable[Path], search: Sequence[Path]) -> Closure:
    """Follows NEEDED from `roots` through libraries found in `search`, breadth first."""
    closure = Closure()
    queue = list(roots)
    seen: set[Path] = set()
    while queue:
        item = queue.pop(0)
        if item in seen:
            continue
        seen.add(item)
        for name in elf_needed(item):
            found = next((folder / name for folder in search if (folder / name).is_file()), None)
            if found is None:
                closure.host.add(name)
            elif name not in closure.carried:
                closure.carried[name] = found
                queue.append(found)
    return closure


def pytriton_site() -> Path:
    """The site-packages folder holding `pytriton/` and `nvidia_pytriton.libs/`."""
    return _package_dir("pytriton").parent


def stage_server(site: Path, dest: Path) -> dict[str, Any]:
    """Copies the tritonserver binary and the bundled libraries it needs into `dest`, in
    the wheel's layout; returns what was taken and what the host must provide."""
    binary = site / SERVER_BINARY
    libs = site / SERVER_LIBS
    if not binary.is_file() or not libs.is_dir():
        raise KitError(f"no tritonserver at {binary} (nvidia-pytriton, the `embedded` extra)")
    closure = library_closure([binary], [libs])
    all_bundled = sorted(p.name for p in libs.iterdir() if p.is_file())
    (dest / SERVER_BINARY).parent.mkdir(parents=True, exist_ok=True)
    (dest / SERVER_LIBS).mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, dest / SERVER_BINARY)
    for name, path in sorted(closure.carried.items()):
        shutil.copy2(path, dest / SERVER_LIBS / name)
    unpacked = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    return {
        "pytriton": importlib.metadata.version("nvidia-pytriton"),
        "binary": str(SERVER_BINARY),
        "libraries": sorted(closure.carried),
        "left_out": sorted(set(all_bundled) - set(closure.carried)),
        "host_libraries": sorted(closure.host),
        "unpacked_bytes": unpacked,
    }


def pack(tree: Path, archive: Path, top: str, preset: int) -> None:
    """A reproducible tar.xz of `tree` under `top/` (sorted names, no owners or times), which
    Python's own `tarfile` unpacks on the other side."""

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return info

    tmp = archive.with_name(archive.name + ".part")
    with lzma.open(tmp, "wb", preset=preset) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        for path in sorted(tree.rglob("*")):
            tar.add(path, arcname=f"{top}/{path.relative_to(tree)}", recursive=False, filter=clean)
    tmp.replace(archive)


def build_server(kit: Path, cache: Path, preset: int) -> dict[str, Any]:
    stage = cache / "server-stage"
    shutil.rmtree(stage, ignore_errors=True)
    info = stage_server(pytriton_site(), stage)
    started = time.monotonic()
    pack(stage, kit / SERVER_ARCHIVE, SERVER_TOP, preset)
    shutil.rmtree(stage, ignore_errors=True)
    kept, bundled = len(info["libraries"]), len(info["libraries"]) + len(info["left_out"])
    log(
        f"tritonserver: {kept} libraries of {bundled}, "
        f"{info['unpacked_bytes'] / 2**20:.1f} MiB unpacked, "
        f"{(kit / SERVER_ARCHIVE).stat().st_size / 2**20:.1f} MiB as xz (preset {preset}, "
        f"{time.monotonic() - started:.0f} s)"
    )
    return {"path": SERVER_ARCHIVE, "top": SERVER_TOP, "xz_preset": preset, **info}


# ---------------------------------------------------------------------------- GPU backend


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def torch_wheel(cache: Path) -> Path:
    """The PyPI torch wheel the GPU machine runs (cp312, CUDA 13), downloaded once."""
    downloads = cache / "downloads"
    pattern = f"torch-{DEVICE_TORCH}-cp312-cp312-manylinux*_x86_64.whl"
    found = sorted(downloads.glob(pattern))
    if not found:
        log(f"downloading torch {DEVICE_TORCH} (cp312, about 530 MB) into {downloads}")
        pip(
            "download",
            f"torch=={DEVICE_TORCH}",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            DEVICE_PYTHON,
            "--platform",
            "manylinux_2_28_x86_64",
            "-d",
            str(downloads),
        )
        found = sorted(downloads.glob(pattern))
    if not found:
        raise KitError(f"pip downloaded no {pattern} into {downloads}")
    return found[-1]


def unpack_torch(wheel: Path, cache: Path) -> Path:
    """The wheel's `torch/include`, `torch/lib`, `torch/share` and `torch/version.py`, all
    the build reads, unpacked once; returns the `torch/` folder."""
    dest = cache / f"torch-{DEVICE_TORCH}-cp312"
    stamp = dest / ".unpacked"
    if stamp.is_file() and stamp.read_text() == wheel.name:
        return dest / "torch"
    shutil.rmtree(dest, ignore_errors=True)
    log(f"unpacking the headers and libraries of {wheel.name}")
    prefixes = ("torch/include/", "torch/lib/", "torch/share/")
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.startswith(prefixes) or n == "torch/version.py"]
        zf.extractall(dest, members)
    stamp.write_text(wheel.name)
    return dest / "torch"


def build_backend(kit: Path, cache: Path, sources: Path, jobs: int) -> dict[str, Any]:
    torch_root = unpack_torch(torch_wheel(cache), cache)
    directory = backend.build(
        sources,
        jobs,
        download=True,
        backends=backend.GPU_BACKENDS_DIR,
        torch_root=torch_root,
        gpu=backend.Gpu(),
        libraries=DEVICE_RUNPATH,
    )
    library = directory / backend.LIBRARY
    dest = kit / BACKEND_DIR / backend.LIBRARY
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(library, dest)
    record = json.loads((directory / "build.json").read_text())
    needed = elf_needed(dest)
    rpath = subprocess.run(
        ["patchelf", "--print-rpath", str(dest)], capture_output=True, text=True, check=True
    ).stdout.strip()
    check_gpu_backend(needed, rpath)
    linkage = symbol_check(
        dest, [torch_root / "lib", backend.DEFAULT_CUDA_ROOT / "lib64", *nvidia_libraries()]
    )
    log(f"GPU backend: {dest.stat().st_size / 2**10:.0f} KiB, NEEDED {', '.join(needed)}; RUNPATH {rpath}")
    log(f"GPU backend: every symbol but the server's resolves against torch {DEVICE_TORCH}'s libraries")
    return {
        "path": str(dest.relative_to(kit)),
        "needed": needed,
        "runpath": rpath,
        "build": record,
        "symbol_check": linkage,
    }


def nvidia_libraries() -> list[Path]:
    """This environment's `nvidia/*/lib` folders (cuDNN and the like, for the symbol check
    only: the torch wheel here is a CUDA 13 build too)."""
    try:
        root = _package_dir("torch").parent / "nvidia"
    except KitError:
        return []
    return sorted(p for p in root.glob("*/lib") if p.is_dir())


def symbol_check(library: Path, folders: Sequence[Path]) -> dict[str, Any]:
    """`ldd -r` of the backend against the torch it was built for: every undefined symbol
    but Triton's own API (which the server provides when it loads the backend) must
    resolve, or libtorch's C++ API differs from the one built against. Libraries that
    cannot be found here are recorded, not fatal (the GPU machine has them)."""
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(str(f) for f in folders)}
    done = subprocess.run(["ldd", "-r", str(library)], capture_output=True, text=True, env=env)
    out = done.stdout + done.stderr
    undefined = re.findall(r"undefined symbol: (\S+)", out)
    foreign = sorted({s for s in undefined if not s.startswith(("TRITONSERVER_", "TRITONBACKEND_"))})
    not_found = sorted(set(re.findall(r"^\s*(\S+) => not found", out, re.M)))
    if foreign and not not_found:
        raise KitError(f"the GPU backend has symbols torch {DEVICE_TORCH} does not define: {foreign[:5]}")
    return {
        "checked": not not_found,
        "triton_api_symbols": len(undefined) - len(foreign),
        "libraries_not_found_here": not_found,
    }


def check_gpu_backend(needed: Sequence[str], rpath: str) -> None:
    """What a GPU backend for that machine must be: linked to CUDA 13's runtime and to
    libtorch, not to a server library, and looking where that machine keeps them."""
    problems = []
    if "libcudart.so.13" not in needed:
        problems.append("not linked against libcudart.so.13")
    if not any(n in ("libtorch.so", "libtorch_cuda.so") for n in needed):
        problems.append("not linked against libtorch")
    if any(n.startswith("libtritonserver") for n in needed):
        problems.append("still needs libtritonserver")
    if rpath.split(":") != ["$ORIGIN", *DEVICE_RUNPATH]:
        problems.append(f"RUNPATH {rpath!r} is not $ORIGIN and {':'.join(DEVICE_RUNPATH)}")
    if problems:
        raise KitError("the GPU backend is wrong: " + "; ".join(problems))


# ---------------------------------------------------------------------------- wheels


def installed_pins(names: Iterable[str]) -> dict[str, str]:
    """`name==version` of each name as installed here: the versions the tests run."""
    pins = {}
    for name in names:
        try:
            pins[normalise(name)] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError as exc:
            raise KitError(f"{name} is not installed here (run `make venv`)") from exc
    return pins


def requirement_closure(top_level: Iterable[str], python_version: str = DEVICE_PYTHON) -> dict[str, str]:
    """Every distribution the top-level requirements pull in, as installed here, with the
    markers read for the device's Python on Linux: normalised name -> version."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    environment = {str(key): str(value) for key, value in default_environment().items()}
    environment.update(python_version=python_version, python_full_version=f"{python_version}.0")
    found: dict[str, str] = {}
    queue = [Requirement(r) for r in top_level]
    while queue:
        requirement = queue.pop(0)
        name = normalise(requirement.name)
        if name in found:
            continue
        found[name] = importlib.metadata.version(requirement.name)
        extras = set(requirement.extras)
        for text in importlib.metadata.requires(requirement.name) or []:
            dependency = Requirement(text)
            marker = dependency.marker
            if marker is None or any(marker.evaluate({**environment, "extra": e}) for e in extras | {""}):
                queue.append(dependency)
    return found


def missing_from_kit(closure: Iterable[str], carried: Iterable[str], device: Iterable[str]) -> list[str]:
    """Distributions needed that neither the kit carries nor the device has."""
    have = {normalise(n) for n in carried} | {normalise(n) for n in device}
    return sorted(n for n in closure if normalise(n) not in have)


def build_wheels(kit: Path, cache: Path) -> dict[str, Any]:
    closure = requirement_closure(TOP_LEVEL)
    missing = missing_from_kit(closure, CARRIED, DEVICE_PACKAGES)
    if missing:
        raise KitError(
            f"the GPU machine lacks {', '.join(missing)} and the kit does not carry them (CARRIED)"
        )
    pins = installed_pins(CARRIED)
    downloads = cache / "wheels"
    downloads.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in DEVICE_PLATFORMS for arg in ("--platform", p)]
    wanted = [f"{name}=={version}" for name, version in pins.items()]
    pip(
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        DEVICE_PYTHON,
        *platforms,
        "-d",
        str(downloads),
        *wanted,
    )
    dest = kit / WHEELS_DIR
    dest.mkdir(parents=True, exist_ok=True)
    wheels = []
    for name, version in pins.items():
        match = [w for w in downloads.glob("*.whl") if wheel_key(w.name) == (name, version)]
        if not match:
            raise KitError(f"pip downloaded no wheel of {name}=={version}")
        shutil.copy2(match[0], dest / match[0].name)
        wheels.append({"name": name, "version": version, "file": match[0].name})
    top = [r.split("[")[0] for r in TOP_LEVEL]
    requirements = [
        f"{requirement}=={closure[normalise(requirement.split('[')[0])]}"
        for requirement in TOP_LEVEL
        if normalise(requirement.split("[")[0]) in pins
    ]
    (dest / REQUIREMENTS).write_text("\n".join(requirements) + "\n")
    log(f"wheels: {len(wheels)} ({sum((dest / w['file']).stat().st_size for w in wheels) / 2**20:.1f} MiB)")
    return {
        "path": WHEELS_DIR,
        "requirements": f"{WHEELS_DIR}/{REQUIREMENTS}",
        "wheels": wheels,
        "top_level": top,
        "expected_on_device": sorted(set(closure) - set(pins)),
    }


def wheel_key(filename: str) -> tuple[str, str]:
    """(normalised name, version) of a wheel file name."""
    name, version = filename.split("-")[:2]
    return normalise(name), version


# ---------------------------------------------------------------------------- photos


def build_photos(kit: Path) -> list[dict[str, Any]]:
    """Each source cropped to 4:3 around its centre and resized (Lanczos), saved as a
    baseline JPEG at quality 90, like an ordinary photo upload."""
    from PIL import Image, ImageOps

    dest = kit / PHOTOS_DIR
    dest.mkdir(parents=True, exist_ok=True)
    photos = []
    for (width, height), names in PHOTO_SIZES.items():
        for name in names:
            package, relative = PHOTO_SOURCES[name]
            source = _package_dir(package) / relative
            with Image.open(source) as image:
                original = image.size
                rgb = ImageOps.fit(image.convert("RGB"), (width, height), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            rgb.save(buffer, "JPEG", quality=JPEG_QUALITY)
            path = dest / f"{name}_{width}x{height}.jpg"
            path.write_bytes(buffer.getvalue())
            photos.append(
                {
                    "path": f"{PHOTOS_DIR}/{path.name}",
                    "width": width,
                    "height": height,
                    "source": f"{package}/{relative} ({original[0]}x{original[1]})",
                }
            )
    log(f"photos: {len(photos)}")
    return photos


# ---------------------------------------------------------------------------- the kit


def kit_files(kit: Path) -> dict[str, dict[str, Any]]:
    return {
        str(path.relative_to(kit)): {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(kit.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def check_size(total: int, limit: int) -> None:
    if total > limit:
        raise KitError(
            f"the kit is {total / 2**20:.1f} MiB, over its limit of {limit / 2**20:.0f} MiB: the GPU "
            "machine receives the working tree and the kit in at most 64 MiB"
        )


def write_manifest(kit: Path, pieces: dict[str, Any], seconds: float, limit: int) -> dict[str, Any]:
    files = kit_files(kit)
    total = sum(f["bytes"] for f in files.values())
    manifest = {
        "kit": 1,
        "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "build_seconds": round(seconds, 1),
        "total_bytes": total,
        "limit_bytes": limit,
        "device": {
            "python": DEVICE_PYTHON,
            "torch": DEVICE_TORCH,
            "site_packages": DEVICE_SITE_PACKAGES,
            "runpath": list(DEVICE_RUNPATH),
        },
        "pieces": pieces,
        "files": files,
    }
    (kit / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    check_size(total + (kit / MANIFEST).stat().st_size, limit)
    return manifest


def build_kit(
    out: Path,
    cache: Path = DEFAULT_CACHE,
    parts: Sequence[str] = PARTS,
    preset: int = 9,
    sources: Path | None = None,
    jobs: int | None = None,
    limit: int = LIMIT_BYTES,
) -> dict[str, Any]:
    """Builds the kit into `out` (emptied first); returns the manifest."""
    started = time.monotonic()
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise KitError(f"unknown parts {sorted(unknown)}; the parts are {', '.join(PARTS)}")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise KitError(f"{out} is not empty and holds no kit: refusing to replace it")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cache.mkdir(parents=True, exist_ok=True)
    pieces: dict[str, Any] = {}
    if "server" in parts:
        pieces["tritonserver"] = build_server(out, cache, preset)
    if "backend" in parts:
        pieces["backend"] = build_backend(
            out, cache, sources or backend.default_sources(), jobs or os.cpu_count() or 2
        )
    if "wheels" in parts:
        pieces["wheels"] = build_wheels(out, cache)
    if "photos" in parts:
        pieces["photos"] = build_photos(out)
    manifest = write_manifest(out, pieces, time.monotonic() - started, limit)
    log(
        f"kit ready: {out} ({manifest['total_bytes'] / 2**20:.1f} MiB of {limit / 2**20:.0f}, "
        f"{len(manifest['files'])} files, {manifest['build_seconds']:.0f} s)"
    )
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu.kit", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="downloads and the unpacked torch")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    parser.add_argument("--xz-preset", type=int, default=9, help="0 (fast) to 9 (small)")
    parser.add_argument(
        "--sources", type=Path, default=None, help="Triton's pinned source archives (embedded.backend's)"
    )
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--limit-mib", type=float, default=LIMIT_BYTES / 2**20)
    args = parser.parse_args(argv)
    try:
        build_kit(
            args.out,
            args.cache,
            [p for p in args.parts.split(",") if p],
            args.xz_preset,
            args.sources,
            args.jobs,
            int(args.limit_mib * 2**20),
        )
    except (KitError, backend.BuildError, subprocess.CalledProcessError) as exc:
        print(f"[gpu-kit] error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
