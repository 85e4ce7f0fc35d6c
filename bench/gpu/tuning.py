"""The tuning variants of `bench/gpu/stack.py`, compared in-process on the GPU, and the
check that decides whether fp16 may be the GPU default.

Each variant is the exporter's module (`ServingModel`, traced, frozen and checked against
eager by `inception.export.trace_and_check`) with one or more of:

- fp16 (the exporter's `--precision fp16`) against fp32, whose convolutions already run in
  TF32: tracing records cuDNN's `allow_tf32` (on by default) into every convolution;
- channels_last inside the traced graph: the network's weights converted before tracing
  and its input converted in `forward`, so cuDNN's NHWC kernels run with no layout change
  at serving time;
- cuDNN's autotuner recorded into the trace: tracing records `torch.backends.cudnn.benchmark`
  into every convolution as it records `allow_tf32`, and Triton's backend has no switch
  for it, so the only way to serve with it is to trace with it on.

The serving-side variants (max_batch_size 128, two instances) are measured in-process as
what they amount to there: a call at batch 128, and two threads calling the same module on
two CUDA streams.

A variant may be served only if it agrees with fp32 where inputs matter: random weights
give every input nearly the same answer, so the batch norms' statistics are first
calibrated on the kit's real photos (train-mode forward passes, cumulative averages), which
makes the network's answer depend on the photo; every variant is traced from that
network, and its answers must match the network's own (eager, fp32) in top-1 on >= 99 % of
the images, with probabilities within 1e-2. Today's variant is the exported `model.pt`
itself (random weights: speed does not depend on them), the baseline of the speed-ups.
"""

from __future__ import annotations

import io
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.gpu.inprocess import agreement, synchronize
from inception import create_model
from inception.export import example_images, quiet_torchscript, trace_and_check
from inception.serving import ServingModel

# Answers are computed in batches of this size, in-process and through Triton alike: the
# same batch runs the same kernels, so the comparison sees the serving path, not batching.
CHUNK = 8
TOP1_AGREEMENT = 0.99
MAX_PROB_DIFF = 1e-2


@dataclass(frozen=True)
class Variant:
    name: str
    precision: str = "fp32"
    channels_last: bool = False
    cudnn_benchmark: bool = False


TODAY = Variant("fp32 (today)")
VARIANTS = (
    TODAY,
    Variant("fp32 channels_last+benchmark", "fp32", True, True),
    Variant("fp16", "fp16"),
    Variant("fp16 channels_last", "fp16", True),
    Variant("fp16 benchmark", "fp16", False, True),
    Variant("fp16 channels_last+benchmark", "fp16", True, True),
)
DRY_RUN_VARIANTS = (TODAY, VARIANTS[5])


class ChannelsLastServing(ServingModel):
    """`ServingModel` whose network sees its input in channels_last memory order."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).type_as(self.anchor) / 127.5 - 1.0
        x = x.contiguous(memory_format=torch.channels_last)
        return torch.softmax(self.network(x).float(), dim=1)


@contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def serving_module(network: nn.Module, variant: Variant) -> ServingModel:
    if not variant.channels_last:
        return ServingModel(network)
    return ChannelsLastServing(network.to(memory_format=torch.channels_last))


def frozen_variant(network: nn.Module, variant: Variant) -> torch.jit.ScriptModule:
    """The exporter's frozen, checked trace of `network` as `variant` (on the CPU)."""
    with cudnn_benchmark(variant.cudnn_benchmark):
        return trace_and_check(serving_module(network, variant), [(example_images(1),)], variant.precision)


def to_device(frozen: torch.jit.ScriptModule, device: torch.device) -> torch.jit.ScriptModule:
    """Saved and loaded with `map_location`, as Triton's backend loads `model.pt`."""
    buffer = io.BytesIO()
    with quiet_torchscript():
        torch.jit.save(frozen, buffer)
        buffer.seek(0)
        module = torch.jit.load(buffer, map_location=device)
    return module.eval()


def graph_facts(module: torch.jit.ScriptModule) -> dict[str, Any]:
    """What the trace recorded: per convolution its `benchmark` and `allow_tf32` arguments,
    and how many 4-D constants (the folded weights) are channels_last."""
    graph: Any = module.graph
    benchmark: dict[str, int] = {}
    tf32: dict[str, int] = {}
    for node in graph.findAllNodes("aten::_convolution"):
        b = str(node.inputsAt(9).toIValue())
        t = str(node.inputsAt(node.inputsSize() - 1).toIValue())
        benchmark[b] = benchmark.get(b, 0) + 1
        tf32[t] = tf32.get(t, 0) + 1
    weights = nchw_only = 0
    for node in graph.findAllNodes("prim::Constant"):
        value = node.output().toIValue() if node.output().type().kind() == "TensorType" else None
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            weights += 1
            # 1x1 kernels are both layouts at once; count those that are NCHW only.
            nchw_only += int(
                value.is_contiguous() and not value.is_contiguous(memory_format=torch.channels_last)
            )
    return {
        "conv_benchmark": benchmark,
        "conv_allow_tf32": tf32,
        "weights_4d": weights,
        "weights_nchw_only": nchw_only,
    }


def call_latencies(
    fn: Callable[[], object], device: torch.device, seconds: float, at_least: int
) -> list[float]:
    out: list[float] = []
    end = time.perf_counter() + seconds
    while len(out) < at_least or time.perf_counter() < end:
        started = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - started)
    return out


def block_rate(fn: Callable[[], object], batch: int, device: torch.device, seconds: float) -> float:
    """Images/s of calls back to back for about `seconds`, synchronised at the end."""
    synchronize(device)
    started = time.perf_counter()
    calls = 0
    while calls == 0 or time.perf_counter() - started < seconds:
        fn()
        calls += 1
        if calls % 8 == 0:
            synchronize(device)
    synchronize(device)
    return calls * batch / (time.perf_counter() - started)


def measure(
    module: torch.jit.ScriptModule,
    batches: Sequence[int],
    device: torch.device,
    seconds: float,
    warmup: int,
    blocks: int = 3,
) -> dict[str, dict[str, float]]:
    """Per batch size: images/s back to back (median of `blocks` blocks), and the p50/p99
    of single synchronised calls; about `seconds` each."""
    figures: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for batch in batches:
            images = example_images(batch, seed=batch).to(device)

            def fn(images: torch.Tensor = images) -> object:
                return module(images)

            for _ in range(warmup):
                fn()
            synchronize(device)
            lat = call_latencies(fn, device, seconds / 2, 1)
            rates = [block_rate(fn, batch, device, seconds / 2 / blocks) for _ in range(blocks)]
            figures[str(batch)] = {
                "images_per_s": statistics.median(rates),
                "p50_ms": 1e3 * float(np.percentile(lat, 50)),
                "p99_ms": 1e3 * float(np.percentile(lat, 99)),
                "calls": float(len(lat)),
            }
    return figures


def two_streams(
    module: torch.jit.ScriptModule, batch: int, device: torch.device, seconds: float
) -> dict[str, float]:
    """Images/s of one thread, then of two threads on two CUDA streams calling the same
    module: what a second model instance on the same GPU could add."""
    images = example_images(batch, seed=3).to(device)

    def worker(stream: torch.cuda.Stream | None, counts: list[int], stop: float) -> None:
        with torch.inference_mode(), torch.cuda.stream(stream) if stream is not None else _nothing():
            while time.perf_counter() < stop:
                module(images)
                if stream is not None:
                    stream.synchronize()
                counts.append(batch)

    results = {}
    for threads in (1, 2):
        streams = [torch.cuda.Stream(device) if device.type == "cuda" else None for _ in range(threads)]
        counts: list[list[int]] = [[] for _ in range(threads)]
        started = time.perf_counter()
        stop = started + seconds
        pool = [
            threading.Thread(target=worker, args=(s, c, stop)) for s, c in zip(streams, counts, strict=True)
        ]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        synchronize(device)
        results[f"{threads}_instance{'s' if threads > 1 else ''}_images_per_s"] = sum(map(sum, counts)) / (
            time.perf_counter() - started
        )
    return results


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def photo_batch(photos: Sequence[Path], crop_pcts: Sequence[float], flips: bool) -> np.ndarray:
    """The kit's photos through the gateway's own preprocessing, at several crop fractions
    and mirrored: uint8 [n, 299, 299, 3]."""
    from service.imaging import Preprocessing, prepare

    images = []
    for path in photos:
        data = path.read_bytes()
        for crop in crop_pcts:
            pre = Preprocessing(crop, "bicubic", 299)
            image = prepare(data, [pre], max_pixels=50_000_000).inputs[pre]
            images.append(image)
            if flips:
                images.append(np.ascontiguousarray(image[:, ::-1]))
    return np.stack(images)


def calibrate_batch_norm(network: nn.Module, images: torch.Tensor, chunk: int = 16) -> None:
    """Running statistics of every batch norm recomputed on `images` (cumulative average
    over train-mode passes), the weights untouched."""
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    network.train()
    with torch.no_grad():
        for start in range(0, len(images), chunk):
            part = images[start : start + chunk]
            x = part.permute(0, 3, 1, 2).float() / 127.5 - 1.0
            network(x)
    network.eval()


def calibrated_network(name: str, photos: np.ndarray) -> nn.Module:
    """`name` with its (random) weights and batch norms calibrated on `photos`."""
    network = create_model(name)
    calibrate_batch_norm(network, torch.from_numpy(photos))
    return network


def eager_probabilities(network: nn.Module, images: np.ndarray, device: torch.device) -> torch.Tensor:
    """The network as it is, not traced, in fp32 on `device`: the reference answers."""
    serving = ServingModel(network).eval().to(device)
    try:
        with torch.inference_mode():
            tensor = torch.from_numpy(images).to(device)
            return torch.cat(
                [serving(tensor[i : i + CHUNK]).float() for i in range(0, len(tensor), CHUNK)]
            ).cpu()
    finally:
        serving.to("cpu")


def probabilities(module: torch.jit.ScriptModule, images: np.ndarray, device: torch.device) -> torch.Tensor:
    with torch.inference_mode():
        tensor = torch.from_numpy(images).to(device)
        return torch.cat([module(tensor[i : i + CHUNK]).float() for i in range(0, len(tensor), CHUNK)]).cpu()


def agreement_check(reference: torch.Tensor, probs: torch.Tensor) -> dict[str, Any]:
    """A variant's answers on the photos against the fp32 export's: the rule a variant
    must pass to be served (fp16 in particular)."""
    figures = agreement(reference, probs)
    distinct = int(reference.argmax(1).unique().numel())
    passed = figures["top1_agree"] >= TOP1_AGREEMENT and figures["max_abs_prob"] <= MAX_PROB_DIFF
    return {
        "images": int(reference.shape[0]),
        **figures,
        "reference_distinct_top1": distinct,
        "passed": bool(passed and distinct > 1),
    }


RULE = (
    f"top-1 the same on >= {TOP1_AGREEMENT:.0%} of the photos, max |dp| <= {MAX_PROB_DIFF:g}, "
    "and answers that depend on the photo (more than one top-1 class)"
)


def winner(results: dict[str, Any], variants: Sequence[Variant], batch: str) -> Variant:
    """The variant with the most images/s at `batch`, among those measured whose answers
    passed the agreement rule (the reference itself always may)."""
    eligible = {
        variant: results[variant.name]["batches"][batch]["images_per_s"]
        for variant in variants
        if batch in results.get(variant.name, {}).get("batches", {})
        and (variant == TODAY or results[variant.name].get("agreement", {}).get("passed", False))
    }
    if not eligible:
        return TODAY
    return max(eligible, key=lambda v: eligible[v])
