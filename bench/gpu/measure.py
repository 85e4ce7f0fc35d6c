"""The measuring stages of `bench/gpu/stack.py` (accuracy, side by side, gateway, tuning,
winner): the parts that need torch or a running server. Each takes the run (budget,
plan, output folder) and the stack (paths, servers, photos) and returns its figures."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bench.gpu import tuning
from bench.gpu.load import CpuMeter, run_load

if TYPE_CHECKING:
    from bench.gpu.stack import Run, Stack

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


# ---------------------------------------------------------------------------- variants


@dataclass
class Tuning:
    """The variants of one network, traced (frozen, on the CPU) and on the device."""

    network: str
    photos: np.ndarray
    frozen: dict[str, torch.jit.ScriptModule] = field(default_factory=dict)
    modules: dict[str, torch.jit.ScriptModule] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    reference: torch.Tensor | None = None  # the calibrated network's answers, eager fp32
    chosen: tuning.Variant | None = None
    max_batch_size: int = 64
    instances: int = 1


def plan_variants(run: Run) -> list[tuning.Variant]:
    return list(tuning.DRY_RUN_VARIANTS if run.plan.variants == ("dry",) else tuning.VARIANTS)


def prepare_variants(run: Run, stack: Stack) -> Tuning:
    """Today's export of the tuned network as it is (its `model.pt`, loaded as the backend
    loads it), and every other variant traced on the CPU as the exporter traces, from the
    network with its batch norms calibrated on the photos. That network, eager in fp32, is
    the reference the variants' answers are checked against (speed does not depend on the
    weights; agreement does, and needs answers that depend on the input)."""
    import copy

    from inception import get_spec

    assert stack.repository is not None
    device = device_of(run)
    name = run.plan.tuned
    spec = get_spec(name)
    chosen = stack.photos[: run.plan.photo_limit]
    crops = [prepared_photos(chosen, c, spec.interpolation, spec.input_size) for c in run.plan.photo_crops]
    photos = np.concatenate(crops)
    if run.plan.photo_flips:
        photos = np.concatenate([photos, np.ascontiguousarray(photos[:, :, ::-1])])
    state = Tuning(name, photos)
    network = tuning.calibrated_network(name, photos)
    state.reference = tuning.eager_probabilities(network, photos, device)
    today = load_module(served_model_file(stack.repository, name), torch.device("cpu"))
    state.frozen[tuning.TODAY.name] = today
    state.modules[tuning.TODAY.name] = tuning.to_device(today, device)
    state.facts[tuning.TODAY.name] = tuning.graph_facts(today)
    for variant in plan_variants(run):
        if variant == tuning.TODAY:
            continue
        if run.remaining() < 5:
            state.errors[variant.name] = "not traced: out of time"
            continue
        try:
            frozen = tuning.frozen_variant(copy.deepcopy(network), variant)
            state.frozen[variant.name] = frozen
            state.modules[variant.name] = tuning.to_device(frozen, device)
            state.facts[variant.name] = tuning.graph_facts(frozen)
        except Exception as exc:
            state.errors[variant.name] = f"{type(exc).__name__}: {exc}"
    return state


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

    config = parse((repository / "inception_ensemble" / "configs" / f"{config_name}.pbtxt").read_text())
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
    served = triton_probabilities(url, "inception_ensemble", feed, batch=tuning.CHUNK)
    local = np.sum([w * members_probs[m] for m, w in zip(members, weights, strict=True)], axis=0)
    results["inception_ensemble"] = {
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
            "GATEWAY_MODELS": ",".join([*run.plan.networks, "inception_ensemble"]),
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


# ---------------------------------------------------------------------------- tuning


def tuning_stage(run: Run, stack: Stack) -> dict[str, Any]:
    """Every variant in-process, checked against fp32 on the photos; then the winner and
    its serving options (batch 128, two instances)."""
    device = device_of(run)
    if stack.triton is not None:  # the second server is started in the winner stage
        stack.triton.stop()
        stack.triton = None
    state: Tuning = stack.tuning if stack.tuning is not None else prepare_variants(run, stack)
    stack.tuning = state
    variants = [v for v in plan_variants(run) if v.name in state.modules]
    assert state.reference is not None
    for variant in variants:
        entry: dict[str, Any] = {"variant": variant.__dict__, "graph": state.facts.get(variant.name)}
        if variant != tuning.TODAY:  # today's export has other (uncalibrated) weights
            probs = tuning.probabilities(state.modules[variant.name], state.photos, device)
            entry["agreement"] = tuning.agreement_check(state.reference, probs)
        state.results[variant.name] = entry
    for variant in variants:
        if run.remaining() < len(run.plan.tuning_batches) * run.plan.inprocess_seconds + 3:
            state.results[variant.name]["skipped"] = "out of time"
            continue
        state.results[variant.name]["batches"] = tuning.measure(
            state.modules[variant.name],
            run.plan.tuning_batches,
            device,
            run.plan.inprocess_seconds,
            run.plan.warmup_calls,
            run.plan.blocks,
        )
    big = [b for b in run.plan.tuning_batches if b <= 64]
    decide_at = str(max(big)) if big else str(run.plan.tuning_batches[-1])
    chosen = tuning.winner(state.results, variants, decide_at)
    state.chosen = chosen
    rates = state.results[chosen.name].get("batches", {})
    if "128" in rates and "64" in rates and rates["128"]["images_per_s"] > 1.05 * rates["64"]["images_per_s"]:
        state.max_batch_size = 128
    streams = tuning.two_streams(
        state.modules[chosen.name], int(decide_at), device, run.plan.inprocess_seconds
    )
    if streams["2_instances_images_per_s"] > 1.05 * streams["1_instance_images_per_s"]:
        state.instances = 2
    return {
        "network": state.network,
        "photos": len(state.photos),
        "rule": tuning.RULE,
        "variants": state.results,
        "not_traced": state.errors,
        "instances": streams,
        "decided_at_batch": int(decide_at),
        "winner": chosen.name,
        "max_batch_size": state.max_batch_size,
        "instance_count": state.instances,
    }


# ---------------------------------------------------------------------------- winner


def winner_repository(run: Run, stack: Stack, state: Tuning, dest: Path) -> Path:
    """The tuned network alone, as the winner: its frozen module and today's config with
    the chosen max_batch_size, preferred sizes and instance count. Warm-up covers the
    preferred sizes only (the load's own warm-up covers the rest) to fit the run's time."""
    from inception.export import quiet_torchscript
    from inception.repository import parse, render

    assert stack.repository is not None and state.chosen is not None
    source = stack.repository / state.network
    folder = dest / state.network
    (folder / "1").mkdir(parents=True)
    (folder / "configs").mkdir()
    shutil.copyfile(source / "labels.txt", folder / "labels.txt")
    with quiet_torchscript():
        torch.jit.save(state.frozen[state.chosen.name], str(folder / "1" / "model.pt"))
    config = parse((source / "configs" / f"{run.plan.config_name}.pbtxt").read_text())
    config.max_batch_size = state.max_batch_size
    preferred = sorted({*config.dynamic_batching.preferred_batch_size, state.max_batch_size})
    del config.dynamic_batching.preferred_batch_size[:]
    config.dynamic_batching.preferred_batch_size.extend(p for p in preferred if p <= state.max_batch_size)
    config.instance_group[0].count = state.instances
    sizes = {1, *config.dynamic_batching.preferred_batch_size} if run.plan.device == "cuda" else {1}
    warmups = [w for w in config.model_warmup if w.batch_size in sizes]
    for size in sizes - {w.batch_size for w in warmups}:
        template = config.model_warmup[0]
        extra = type(template)()
        extra.CopyFrom(template)
        extra.name, extra.batch_size = f"batch_{size}", size
        warmups.append(extra)
    del config.model_warmup[:]
    config.model_warmup.extend(sorted(warmups, key=lambda w: w.batch_size))
    config.parameters["precision"].string_value = state.chosen.precision
    text = render(config)
    (folder / "configs" / f"{run.plan.config_name}.pbtxt").write_text(text)
    (folder / "config.pbtxt").write_text(text)
    return dest


def winner_stage(run: Run, stack: Stack) -> dict[str, Any]:
    from bench.gpu.stack import triton_server

    state: Tuning = stack.tuning
    assert state is not None and state.chosen is not None
    device = device_of(run)
    repository = winner_repository(run, stack, state, stack.work / "repository-winner")
    server = triton_server(stack, repository, run.plan.config_name, run.out / "tritonserver-winner.log")
    result: dict[str, Any] = {
        "variant": state.chosen.name,
        "max_batch_size": state.max_batch_size,
        "instances": state.instances,
    }
    started = time.monotonic()
    try:
        server.start().wait_ready(timeout=max(1.0, min(120.0, run.remaining() - 10)))
        result["ready_after_s"] = round(time.monotonic() - started, 1)
        module = state.modules[state.chosen.name]
        images = state.photos[: max(8, len(stack.photos))]
        local = in_process_probabilities(module, images, device)
        served = triton_probabilities(
            server.grpc_url, state.network, {"image__0": images}, batch=tuning.CHUNK
        )
        result["accuracy"] = compare(local, served, state.chosen.precision)
        batches = [*run.plan.batches, *([128] if state.max_batch_size >= 128 else [])]
        result["rows"] = side_by_side_rows(run, stack, server.grpc_url, state.network, module, batches)
    finally:
        server.stop()
    return result
