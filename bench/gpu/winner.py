"""The tuning and winner stages of `python -m bench.gpu.stack`: the variants of one
network (`tuning.py`) traced while Triton warms up, measured in-process and checked against
fp32 on the photos; the fastest that passes, with its serving options, then served by a
second tritonserver and measured as today's export was (`measure.py`).

The variants' state (`Tuning`) lives here, with the stages that fill and read it; the
command only starts the tracing early (`prepare_variants`, from its triton stage).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bench.gpu import tuning
from bench.gpu.measure import (
    compare,
    device_of,
    in_process_probabilities,
    load_module,
    prepared_photos,
    served_model_file,
    side_by_side_rows,
    triton_probabilities,
)
from bench.gpu.server import triton_server

if TYPE_CHECKING:
    from bench.gpu.run import Run, Stack


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
