"""The measuring stages of `python -m bench.gpu.stack` against the running Triton (accuracy,
side by side, gateway), and the helpers the winner stage (`winner.py`) measures its own
server with. Each takes the run (budget, plan, output folder) and the stack (paths,
servers, photos) and returns its figures.

Imported by the command only after the install stage: it needs torch, and tritonclient
from the kit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bench.gpu import tuning
from bench.gpu.load import CpuMeter, run_load
from inception.contract import ENSEMBLE_NAME

if TYPE_CHECKING:
    from bench.gpu.run import Run, Stack

ROOT = Path(__file__).resolve().parents[2]
FP32_TOLERANCE = 1e-4
ORDINARY_PHOTO = "500x375"


def served_model_file(repository: Path, name: str) -> Path:
    """The model file the repository serves of `name` (its newest version): imported when
    called, as the kit's wheels (protobuf, tritonclient) are installed after this module."""
    from inception.rollout import served_model_file as served

    return served(repository, name)


def device_of(run: Run) -> torch.device:
    return torch.device(run.plan.device)


def load_module(path: Path, device: torch.device) -> torch.jit.ScriptModule:
    from inception.export import quiet_torchscript

    with quiet_torchscript():
        return torch.jit.load(str(path), map_location=device).eval()


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prepared_photos(photos: Sequence[Path], crop_pct: float, interpolation: str, size: int) -> np.ndarray:
    """The photos as the gateway prepares them for a model with this preprocessing."""
    from service.imaging import Preprocessing, prepare

    pre = Preprocessing(crop_pct, interpolation, size)
    return np.stack([prepare(p.read_bytes(), [pre], max_pixels=50_000_000).inputs[pre] for p in photos])


def network_photos(name: str, photos: Sequence[Path]) -> np.ndarray:
    from inception import get_spec

    spec = get_spec(name)
    return prepared_photos(photos, spec.crop_pct, spec.interpolation, spec.input_size)


def client_env(stack: Stack) -> dict[str, str]:
    return stack.env.apply(os.environ)


# ---------------------------------------------------------------------------- accuracy


def compare(reference: np.ndarray, got: np.ndarray, precision: str) -> dict[str, Any]:
    """fp32: the largest difference must be <= 1e-4; fp16: the same top-1 everywhere."""
    diff = float(np.abs(reference.astype(np.float64) - got.astype(np.float64)).max())
    same_top1 = float((reference.argmax(1) == got.argmax(1)).mean())
    passed = diff <= FP32_TOLERANCE if precision == "fp32" else same_top1 == 1.0
    return {"precision": precision, "max_abs_diff": diff, "top1_same": same_top1, "passed": bool(passed)}


def triton_probabilities(url: str, model: str, inputs: Mapping[str, np.ndarray], batch: int) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    n = len(next(iter(inputs.values())))
    out = []
    for start in range(0, n, batch):
        tensors = []
        for name, images in inputs.items():
            part = np.ascontiguousarray(images[start : start + batch])
            tensor = grpcclient.InferInput(name, list(part.shape), "UINT8")
            tensor.set_data_from_numpy(part)
            tensors.append(tensor)
        answer = client.infer(model, tensors, outputs=[grpcclient.InferRequestedOutput("probabilities__0")])
        out.append(answer.as_numpy("probabilities__0"))
    client.close()
    return np.concatenate(out)


def in_process_probabilities(
    module: torch.jit.ScriptModule, images: np.ndarray, device: torch.device
) -> np.ndarray:
    return tuning.probabilities(module, images, device).numpy()


def ensemble_parameters(repository: Path, config_name: str) -> tuple[list[str], list[float], dict[str, str]]:
    """Members, weights, and for each image input the member preprocessing it carries."""
    from inception.repository import parse

    config = parse((repository / ENSEMBLE_NAME / "configs" / f"{config_name}.pbtxt").read_text())
    params = {k: v.string_value for k, v in config.parameters.items()}
    members = params["members"].split(",")
    weights = [float(w) for w in params["member_weights"].split(",")]
    inputs = {}
    for step in config.ensemble_scheduling.step:
        if step.model_name in members:
            inputs[step.model_name] = step.input_map["image__0"]
    return members, weights, inputs


def accuracy(run: Run, stack: Stack) -> dict[str, Any]:
    assert stack.repository is not None
    device = device_of(run)
    url = stack.triton.grpc_url
    results: dict[str, Any] = {}
    members_probs: dict[str, np.ndarray] = {}
    member_inputs: dict[str, np.ndarray] = {}
    for name in run.plan.networks:
        images = network_photos(name, stack.photos[: run.plan.photo_limit])
        module = load_module(served_model_file(stack.repository, name), device)
        local = in_process_probabilities(module, images, device)
        del module
        release(device)
        served = triton_probabilities(url, name, {"image__0": images}, batch=tuning.CHUNK)
        precision = precision_of(stack.repository / name)
        results[name] = {"images": len(images), **compare(local, served, precision)}
        members_probs[name] = local
        member_inputs[name] = images
    members, weights, inputs = ensemble_parameters(stack.repository, run.plan.config_name)
    feed = {inputs[m]: member_inputs[m] for m in members}
    served = triton_probabilities(url, ENSEMBLE_NAME, feed, batch=tuning.CHUNK)
    local = np.sum([w * members_probs[m] for m, w in zip(members, weights, strict=True)], axis=0)
    results[ENSEMBLE_NAME] = {
        "images": len(served),
        **compare(local, served, "fp32"),
        "members": members,
    }
    failed = [n for n, r in results.items() if not r["passed"]]
    if failed:
        results["failed"] = failed
    return results


def precision_of(model_folder: Path) -> str:
    import json

    stamp = served_model_file(model_folder.parent, model_folder.name).with_name(".export.json")
    return json.loads(stamp.read_text()).get("precision", "fp32") if stamp.is_file() else "fp32"


# ---------------------------------------------------------------------------- side by side


def concurrency_for(run: Run, batch: int) -> int:
    return max(2, min(256, run.plan.fill // batch))


def grpc_point(run: Run, stack: Stack, url: str, model: str, batch: int, clients: int) -> dict[str, Any]:
    spec = {
        "kind": "grpc",
        "url": url,
        "model": model,
        "batch": batch,
        "concurrency": clients,
        "warmup": run.plan.load_warmup,
        "seconds": run.plan.load_seconds,
        "timeout": 60,
    }
    return run_load(
        spec, run.plan.client_processes, env=client_env(stack), start_delay=run.plan.start_delay, cwd=ROOT
    )


def point_seconds(run: Run) -> float:
    return (
        run.plan.start_delay + run.plan.load_warmup + run.plan.load_seconds + run.plan.inprocess_seconds + 2
    )


def side_by_side_rows(
    run: Run, stack: Stack, url: str, name: str, module: torch.jit.ScriptModule, batches: Sequence[int]
) -> list[dict[str, Any]]:
    """One network in-process against Triton at each batch size (and at batch 1 with one
    client, for latency)."""
    device = device_of(run)
    rows = []
    points = [(b, concurrency_for(run, b)) for b in batches]
    if 1 in batches:
        points.insert(0, (1, 1))
    for batch, clients in points:
        row: dict[str, Any] = {"network": name, "batch": batch, "clients": clients}
        if run.remaining() < point_seconds(run):
            rows.append({**row, "skipped": "out of time"})
            continue
        local = tuning.measure(
            module, [batch], device, run.plan.inprocess_seconds, run.plan.warmup_calls, run.plan.blocks
        )[str(batch)]
        served = grpc_point(run, stack, url, name, batch, clients)
        row["in_process"] = local
        row["triton"] = served
        row["ratio"] = served["images_per_s"] / local["images_per_s"] if local["images_per_s"] else None
        rows.append(row)
    return rows


def side_by_side(run: Run, stack: Stack) -> list[dict[str, Any]]:
    assert stack.repository is not None
    device = device_of(run)
    order = [run.plan.tuned, *(n for n in run.plan.networks if n != run.plan.tuned)]
    rows: list[dict[str, Any]] = []
    for name in order:
        module = load_module(served_model_file(stack.repository, name), device)
        rows += side_by_side_rows(run, stack, stack.triton.grpc_url, name, module, run.plan.batches)
        del module
        release(device)
    return rows


# ---------------------------------------------------------------------------- gateway


def gateway_levels(
    run: Run, stack: Stack, url: str, model: str, admission: bool, groups: Mapping[str, int]
) -> list[dict[str, Any]]:
    photos = [str(p) for p in stack.photos if ORDINARY_PHOTO in p.name] or [str(p) for p in stack.photos]
    rows = []
    for concurrency in run.plan.gateway_levels:
        row: dict[str, Any] = {"model": model, "admission": admission, "concurrency": concurrency}
        if run.remaining() < 3 + run.plan.start_delay + run.plan.load_warmup + run.plan.load_seconds:
            rows.append({**row, "skipped": "out of time"})
            continue
        spec = {
            "kind": "http",
            "url": url,
            "model": model,
            "photos": photos,
            "concurrency": concurrency,
            "warmup": run.plan.load_warmup,
            "seconds": run.plan.load_seconds,
            "timeout": 60,
        }
        meter = CpuMeter(groups)
        meter.start()
        figures = run_load(
            spec, run.plan.client_processes, env=client_env(stack), start_delay=run.plan.start_delay, cwd=ROOT
        )
        row.update(figures)
        row["cpu"] = meter.stop()
        rows.append(row)
    return rows


def warm_up_gateway(url: str, model: str, photo: Path) -> None:
    """One request before a model's levels: the first one through a fresh gateway pays for
    its channel to Triton and the model's config, which no level should count."""
    import httpx

    httpx.post(
        f"{url}/v1/classify",
        params={"model": model},
        content=photo.read_bytes(),
        headers={"Content-Type": "image/jpeg"},
        timeout=120,
    )


def gateway(run: Run, stack: Stack) -> list[dict[str, Any]]:
    """The real path: JPEGs over HTTP through uvicorn workers to Triton, for one network
    and the ensemble; admission off (capacity), then on (goodput and sheds)."""
    from bench.gateway import LOAD_GENERATOR_SETTINGS
    from embedded.gateway import Gateway, serving

    rows: list[dict[str, Any]] = []
    workers = run.plan.gateway_workers
    models = [run.plan.gateway_model, "ensemble"]
    for admission in (False, True):
        if run.remaining() < 15:
            rows.append({"admission": admission, "skipped": "out of time"})
            continue
        metrics = Path(tempfile.mkdtemp(prefix="gateway-metrics-")) if workers > 1 else None
        settings = {
            "GATEWAY_MODELS": ",".join([*run.plan.networks, ENSEMBLE_NAME]),
            "GATEWAY_DEFAULT_MODEL": run.plan.gateway_model,
            "GATEWAY_ADMISSION": "true" if admission else "false",
            "WEB_CONCURRENCY": str(workers),
            **LOAD_GENERATOR_SETTINGS,
            # One JSON line per request from 16 workers would be tens of MB per run.
            "GATEWAY_LOG_LEVEL": "WARNING",
        }
        log_path = run.out / f"gateway-admission-{'on' if admission else 'off'}.log"
        gateway = Gateway(
            stack.triton.grpc_url, log_path, workers=workers, env=settings, multiproc_dir=metrics
        )
        try:
            with serving(gateway):
                groups = {"gateway": gateway.pid}
                if stack.triton.process is not None:
                    groups["triton"] = stack.triton.process.pid
                for model in models:
                    warm_up_gateway(gateway.url, model, stack.photos[0])
                    rows += gateway_levels(run, stack, gateway.url, model, admission, groups)
        finally:
            if metrics is not None:
                shutil.rmtree(metrics, ignore_errors=True)
    return rows
