"""GPU figures of the networks (`python -m bench.gpu.inprocess`): the frozen TorchScript the
exporter writes, loaded onto the device the way Triton's PyTorch backend loads it, in fp32 and
fp16, measured side by side in one run.

For each network: build it with random weights (speed does not depend on them), wrap it in
`ServingModel` and trace, freeze and check it with the exporter's own `trace_and_check`
(on the CPU at batch 1, as `python -m inception.export` does), save it and load it back
with `map_location` set to the device, which is what the backend's `torch::jit::load` does
with the same file. Then, under `torch.inference_mode()` (the repository's
`INFERENCE_MODE: true`) and with the images already on the device:

- latency at batch 1: median and 99th percentile of single calls, each synchronized;
- throughput at batches 8, 32 and 64: images/s over blocks of calls back to back,
  synchronized at the end of each block (median of the blocks);
- fp16 (and fp32 with TF32 off) against fp32 on a few random and synthetic images: max
  absolute difference of the probabilities and of their logarithms, top-1 agreement.

Variants: `fp32` is the exporter's file as it is. Tracing records cuDNN's flags of the
moment into every convolution (`aten::_convolution(..., benchmark, deterministic,
cudnn_enabled, allow_tf32)`), so the file carries `allow_tf32=True`, torch's default, and
its convolutions may use TF32 tensor cores wherever it is loaded, whatever that process's
flags (Triton's PyTorch backend has no TF32 parameter either). `fp32 no-TF32` is the same
network traced with cuDNN's TF32 off, i.e. true fp32 convolutions; the one matmul, the
classifier, follows the running process's cuBLAS flag, off by default in both. `fp16` is
the exporter's `--precision fp16` file. On the CPU (a smoke run with tiny counts) the
no-TF32 variant is left out.

Calls alternate between variants in blocks, every variant past its own warm-up at a batch
size before any is timed at it, so that every column sees the same machine.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _stand_in_for_tritonclient() -> bool:
    """`inception.export` imports the repository writer, which imports tritonclient's
    `model_config_pb2`; a GPU machine with torch but no tritonclient cannot import the
    exporter. Nothing here writes a config (the writer uses the protobuf inside its
    functions only), so where tritonclient is missing an empty module stands in for it.
    Returns whether it did."""
    try:
        import tritonclient.grpc.model_config_pb2  # noqa: F401
    except ImportError:
        names = ("tritonclient", "tritonclient.grpc", "tritonclient.grpc.model_config_pb2")
        package, grpc, config = (types.ModuleType(name) for name in names)
        setattr(package, "grpc", grpc)  # noqa: B010
        setattr(grpc, "model_config_pb2", config)  # noqa: B010
        sys.modules.update(zip(names, (package, grpc, config), strict=True))
        return True
    return False


TRITONCLIENT_STAND_IN = _stand_in_for_tritonclient()

from inception import create_model  # noqa: E402
from inception.contract import IMAGE_SIZE, NETWORKS  # noqa: E402
from inception.export import example_images, max_error, quiet_torchscript, trace_and_check  # noqa: E402
from inception.serving import ServingModel  # noqa: E402

BATCHES = (8, 32, 64)


@dataclass(frozen=True)
class Variant:
    name: str
    precision: str
    # cuDNN's TF32 flag while tracing, which the trace records into every convolution.
    # None: as the process has it (torch's default, allowed), which is what the exporter does.
    trace_tf32: bool | None = None


FP32 = Variant("fp32", "fp32")
FP32_NO_TF32 = Variant("fp32 no-TF32", "fp32", trace_tf32=False)
FP16 = Variant("fp16", "fp16")


def variants_for(device: torch.device) -> list[Variant]:
    return [FP32, FP32_NO_TF32, FP16] if device.type == "cuda" else [FP32, FP16]


@contextmanager
def cudnn_tf32(allowed: bool | None) -> Iterator[None]:
    if allowed is None:
        yield
        return
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def conv_tf32_flags(module: torch.jit.ScriptModule) -> dict[str, int]:
    """How many of the graph's convolutions carry each recorded `allow_tf32` value."""
    counts: dict[str, int] = {}
    for node in module.graph.findAllNodes("aten::_convolution"):  # type: ignore[attr-defined]
        value = str(node.inputsAt(node.inputsSize() - 1).toIValue())
        counts[value] = counts.get(value, 0) + 1
    return counts


def frozen_on(variant: Variant, name: str, device: torch.device) -> tuple[torch.jit.ScriptModule, str]:
    """The exporter's frozen module for `name`, as the backend would hold it on `device`.

    Traced, frozen and checked against eager on the CPU as the exporter does; should that
    fail on this torch (the fp16 check runs fp16 convolutions on the CPU), the same
    function is run on the device instead. Returns the module and where it was traced."""
    serving = ServingModel(create_model(name))
    precision = variant.precision
    try:
        with cudnn_tf32(variant.trace_tf32):
            frozen = trace_and_check(serving, [(example_images(1),)], precision)
        traced_on = "cpu"
    except Exception as error:
        if device.type == "cpu":
            raise
        print(f"  {name} {variant.name}: tracing on the CPU failed ({error!r}); tracing on {device}")
        with cudnn_tf32(variant.trace_tf32):
            frozen = trace_and_check(serving.to(device), [(example_images(1).to(device),)], precision)
        traced_on = str(device)
    buffer = io.BytesIO()
    with quiet_torchscript():
        torch.jit.save(frozen, buffer)
        buffer.seek(0)
        module = torch.jit.load(buffer, map_location=device)
    return module.eval(), traced_on


def latencies(fn: Callable[[], object], runs: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - start)
    return out


def throughput(fn: Callable[[], object], calls: int, batch: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return calls * batch / (time.perf_counter() - start)


def synthetic_images(n_random: int) -> torch.Tensor:
    """A horizontal/vertical colour gradient, flat mid-grey and an 8-pixel checkerboard,
    then `n_random` uniform-noise images: uint8 NHWC."""
    ramp = torch.linspace(0, 255, IMAGE_SIZE).round().to(torch.uint8)
    gradient = torch.stack(
        [
            ramp.view(1, -1).expand(IMAGE_SIZE, -1),
            ramp.view(-1, 1).expand(-1, IMAGE_SIZE),
            torch.full((IMAGE_SIZE, IMAGE_SIZE), 64, dtype=torch.uint8),
        ],
        dim=-1,
    )
    grey = torch.full((IMAGE_SIZE, IMAGE_SIZE, 3), 128, dtype=torch.uint8)
    idx = torch.arange(IMAGE_SIZE) // 8
    checker = (((idx.view(-1, 1) + idx.view(1, -1)) % 2) * 255).to(torch.uint8)
    checker = checker.unsqueeze(-1).expand(-1, -1, 3)
    fixed = torch.stack([gradient, grey, checker])
    return torch.cat([fixed, example_images(n_random, seed=7)]) if n_random else fixed


def agreement(reference: torch.Tensor, probs: torch.Tensor) -> dict[str, float]:
    ref, got = reference.double().cpu(), probs.double().cpu()
    top2 = ref.log().topk(2, dim=1).values
    return {
        "max_abs_prob": max_error(ref, got),
        "max_abs_log_prob": max_error(ref.log(), got.log()),
        "top1_agree": float((ref.argmax(1) == got.argmax(1)).double().mean()),
        "reference_top1_prob_median": float(ref.max(1).values.median()),
        "reference_min_top1_log_margin": float((top2[:, 0] - top2[:, 1]).min()),
    }


def bench_network(name: str, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    variants = variants_for(device)
    modules: dict[str, torch.jit.ScriptModule] = {}
    result: dict[str, Any] = {"variants": {v.name: {} for v in variants}}
    for variant in variants:
        start = time.monotonic()
        module, traced_on = frozen_on(variant, name, device)
        modules[variant.name] = module
        result["variants"][variant.name] |= {
            "traced_on": traced_on,
            "conv_allow_tf32": conv_tf32_flags(module),
        }
        print(f"  {name} {variant.name}: traced, frozen, checked, loaded in {time.monotonic() - start:.1f} s")

    with torch.inference_mode():
        for batch in (1, *args.batches):
            images = example_images(batch, seed=batch).to(device)
            fns = {v: partial(module, images) for v, module in modules.items()}
            for fn in fns.values():  # every variant past its warm-up before any is timed
                for _ in range(args.warmup):
                    fn()
                synchronize(device)
            if batch == 1:
                samples: dict[str, list[float]] = {v: [] for v in fns}
                for _ in range(2):
                    for v, fn in fns.items():
                        samples[v] += latencies(fn, max(1, args.latency_runs // 2), device)
                for v, values in samples.items():
                    result["variants"][v]["latency_ms"] = {
                        "median": 1e3 * statistics.median(values),
                        "p99": 1e3 * float(np.percentile(values, 99)),
                        "runs": len(values),
                    }
            else:
                calls = max(1, args.images_per_block // batch)
                rates: dict[str, list[float]] = {v: [] for v in fns}
                for _ in range(args.blocks):
                    for v, fn in fns.items():
                        rates[v].append(throughput(fn, calls, batch, device))
                for v, values in rates.items():
                    result["variants"][v].setdefault("images_per_s", {})[str(batch)] = {
                        "median": statistics.median(values),
                        "blocks": values,
                        "calls_per_block": calls,
                    }
        images = synthetic_images(args.random_images).to(device)
        probs = {v: module(images).float() for v, module in modules.items()}
    reference = FP32_NO_TF32.name if FP32_NO_TF32.name in probs else FP32.name
    result["accuracy"] = {
        "reference": reference,
        "images": int(images.shape[0]),
        "against_reference": {v: agreement(probs[reference], p) for v, p in probs.items() if v != reference},
    }
    if FP32.name != reference:
        result["accuracy"]["fp16_against_fp32"] = agreement(probs[FP32.name], probs[FP16.name])
    return result


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "cudnn_allow_tf32_default": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32_default": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tritonclient_stand_in": TRITONCLIENT_STAND_IN,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=torch.cuda.get_device_name(device),
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return env


def tables(results: dict[str, dict[str, Any]], batches: tuple[int, ...]) -> str:
    lines = [
        "| model | variant | b1 median (ms) | b1 p99 (ms) | "
        + " | ".join(f"b{b} (img/s)" for b in batches)
        + " |",
        "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in batches) + " |",
    ]
    for name, result in results.items():
        if "error" in result:
            lines.append(f"| {name} | failed: {result['error'].splitlines()[-1]} |")
            continue
        for v, figures in result["variants"].items():
            lat = figures["latency_ms"]
            rates = [figures["images_per_s"][str(b)]["median"] for b in batches]
            lines.append(
                f"| {name} | {v} | {lat['median']:.2f} | {lat['p99']:.2f} | "
                + " | ".join(f"{r:.0f}" for r in rates)
                + " |"
            )
    lines += [
        "",
        "| model | compared | b1 latency ratio | "
        + " | ".join(f"b{b} speed-up" for b in batches)
        + " | max abs Δp | max abs Δ log p | top-1 agree |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in batches) + " | ---: | ---: | ---: |",
    ]
    for name, result in results.items():
        if "error" in result:
            continue
        variants = result["variants"]
        acc = result["accuracy"]
        pairs = [(FP16.name, FP32.name)]
        if FP32_NO_TF32.name in variants:
            pairs.append((FP32.name, FP32_NO_TF32.name))
        for new, old in pairs:
            if new not in variants or old not in variants:
                continue
            a = acc["against_reference"][new] if old == acc["reference"] else acc["fp16_against_fp32"]
            lat = variants[old]["latency_ms"]["median"] / variants[new]["latency_ms"]["median"]
            speed = [
                variants[new]["images_per_s"][str(b)]["median"]
                / variants[old]["images_per_s"][str(b)]["median"]
                for b in batches
            ]
            lines.append(
                f"| {name} | {new} vs {old} | {lat:.2f}× | "
                + " | ".join(f"{s:.2f}×" for s in speed)
                + f" | {a['max_abs_prob']:.2g} | {a['max_abs_log_prob']:.2g} | {a['top1_agree']:.0%} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu.inprocess", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--latency-runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5, help="calls per variant and batch size")
    parser.add_argument("--images-per-block", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--random-images", type=int, default=5, help="beside the 3 synthetic ones")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    args.batches = tuple(args.batches)
    device = torch.device(args.device)

    env = environment(device)
    print(json.dumps(env), flush=True)
    results: dict[str, dict[str, Any]] = {}
    for name in args.networks:
        start = time.monotonic()
        try:
            results[name] = bench_network(name, device, args)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
            print(results[name]["error"], file=sys.stderr)
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"{name}: {time.monotonic() - start:.0f} s", flush=True)
    report = tables(results, args.batches)
    print("\n" + report, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {"environment": env, "args": vars(args) | {"out": str(args.out)}, "results": results},
                indent=2,
            )
            + "\n"
        )
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
