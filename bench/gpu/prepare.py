"""The stages that make the stack before anything is measured: the kit installed (`install`),
the machine described (`environment`), the networks exported (`export`).

They need no torch at import (the environment stage imports it when it runs, after the
install has put the kit's packages on the path), so the command imports them at once and
the measuring stages (`measure.py`, `winner.py`) only after these have run.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.gpu.install import (
    KitInstallError,
    import_check,
    install_wheels,
    read_manifest,
    torch_libraries,
    unpack_server,
    verify,
)
from bench.gpu.layout import BACKEND_DIR, PHOTOS_DIR
from bench.gpu.run import Run, Stack
from inception.contract import ENSEMBLE_MEAN_NAME

ROOT = Path(__file__).resolve().parents[2]
# What the gateway and the load clients import: each checked in a fresh interpreter after
# the install, so a missing wheel fails this stage, not a worker minutes later.
GATEWAY_IMPORTS = (
    "fastapi",
    "uvicorn",
    "httptools",
    "pydantic_settings",
    "multipart",
    "tritonclient.grpc.aio",
)


def install(run: Run, stack: Stack, kit: Path | None, dry_run: bool) -> dict[str, Any]:
    """The kit, offline; in a dry run without a kit, this environment's tritonserver."""
    result: dict[str, Any] = {}
    ld_path: list[str] = []
    if kit is not None:
        manifest = read_manifest(kit)
        problems = verify(kit, manifest)
        if problems:
            raise KitInstallError("the kit is damaged: " + "; ".join(problems[:10]))
        result["kit_bytes"] = manifest["total_bytes"]
        result["kit_created"] = manifest["created"]
        stack.server = unpack_server(kit, manifest, stack.work)
        ld_path.append(str(stack.server.libs))
        site = stack.work / "site"
        result["wheels"] = install_wheels(kit, manifest, site, timeout=run.remaining())
        stack.env.pythonpath.append(str(site))
        backend = kit / BACKEND_DIR
        stack.photos = sorted((kit / PHOTOS_DIR).glob("*.jpg"))
        if not dry_run:
            if not (backend / "pytorch" / "libtriton_pytorch.so").is_file():
                raise KitInstallError("the kit carries no GPU backend (built without the `backend` part)")
            stack.backend_directory = backend
    if dry_run:
        from embedded.backend import CURRENT

        stack.backend_directory = CURRENT
        if not stack.photos:
            from bench.gpu.kit import build_photos

            stack.photos = [stack.work / p["path"] for p in build_photos(stack.work)]
    stack.env.pythonpath.append(str(ROOT))
    ld_path += torch_libraries()
    stack.env.ld_library_path = ld_path
    stack.env.activate()
    # Children (gateway workers, load clients) import from the same places; only Triton
    # gets the library path.
    os.environ["PYTHONPATH"] = stack.env.apply(os.environ)["PYTHONPATH"]
    result["pythonpath"] = stack.env.pythonpath
    result["ld_library_path"] = ld_path
    result["server"] = str(stack.server.binary) if stack.server else "this environment's nvidia-pytriton"
    result["backend_directory"] = str(stack.backend_directory)
    result["imports"] = import_check(
        stack.env.apply(os.environ), GATEWAY_IMPORTS, timeout=max(5.0, run.remaining())
    )
    broken = {m: e for m, e in result["imports"].items() if e != "ok"}
    if broken:
        raise KitInstallError(f"after the install these do not import: {broken}")
    return result


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_cores": os.cpu_count(),
        "device": device,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=torch.cuda.get_device_name(0),
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
        smi = shutil.which("nvidia-smi")
        if smi:
            done = subprocess.run(
                [smi, "--query-gpu=driver_version,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            env["nvidia_smi"] = done.stdout.strip()
    return env


def export(run: Run, stack: Stack) -> dict[str, Any]:
    """The project's exporter, as `make repository` runs it, into the run's own folder;
    an export already made here with the same inputs is reused (its fingerprint says so)."""
    from inception import export as exporter
    from inception.rollout import served_version

    repository = stack.work / "repository"
    seed = ROOT / "model_repository"
    for name in (*run.plan.networks, ENSEMBLE_MEAN_NAME):
        number = served_version(seed / name)  # the version the seed serves, by its number
        source = seed / name / str(number)
        if number is not None and (source / "model.pt").is_file() and (source / ".export.json").is_file():
            (repository / name / str(number)).mkdir(parents=True, exist_ok=True)
            for item in ("model.pt", ".export.json"):
                target = repository / name / str(number) / item
                if not target.exists():
                    os.link(source / item, target)
    started = time.monotonic()
    check = [] if run.plan.export_check_batch is None else ["--check-batch", str(run.plan.export_check_batch)]
    code = exporter.main(
        ["--repository", str(repository), "--models", ",".join(run.plan.networks), "--hub", "never", *check]
    )
    if code != 0:
        raise RuntimeError(f"inception.export exited with {code}")
    stack.repository = repository
    return {
        "repository": str(repository),
        "seconds": round(time.monotonic() - started, 1),
        "models": sorted({p.parent.parent.name for p in repository.glob("*/[1-9]*/model.pt")}),
    }
