"""CPU figures of the networks (`make bench`): Triton's PyTorch backend against the same
TorchScript called in-process, frozen and not, measured side by side in one run.

1. First request against tenth: a fresh tritonserver on `model_repository/` (its CPU
   variant, warm-up included), ten single-image requests per network, one at a time.
   TorchScript optimises a shape after a few runs of it; the warm-up must have paid that.
2. Batch-1 latency (median of repeated calls) and batch-8 throughput, four ways: the
   frozen `model.pt` in-process and through Triton, and a plain (unfrozen) trace of the
   same network in-process and through Triton (served from a temporary repository with
   the same configs).

Absolute numbers on a shared 2-core machine are noise; the ratios are what this measures.
Calls alternate in blocks so that every column sees the same machine load.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as grpcclient

from embedded.tritonserver import TritonServer
from inception import create_model
from inception.contract import INPUT_NAME, NETWORKS, OUTPUT_NAME
from inception.export import example_images, quiet_torchscript
from inception.rollout import served_model_file
from inception.serving import ServingModel


def timings(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def infer_fn(
    client: grpcclient.InferenceServerClient, model: str, images: np.ndarray
) -> Callable[[], object]:
    tensor = grpcclient.InferInput(INPUT_NAME, list(images.shape), "UINT8")
    tensor.set_data_from_numpy(np.ascontiguousarray(images))
    return lambda: client.infer(model, [tensor]).as_numpy(OUTPUT_NAME)


def local_fn(module: torch.jit.ScriptModule, images: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return module(images)

    return run


def plain_repository(source: Path, dest: Path) -> None:
    """The same configs with an unfrozen trace of each network as model.pt."""
    for name in NETWORKS:
        folder = dest / name
        (folder / "1").mkdir(parents=True)
        (folder / "configs").mkdir()
        for item in ("config.pbtxt", "configs/cpu.pbtxt", "labels.txt"):
            shutil.copyfile(source / name / item, folder / item)
        with torch.no_grad(), quiet_torchscript():
            traced = torch.jit.trace(ServingModel(create_model(name)).eval(), example_images(1))
            torch.jit.save(traced, str(folder / "1" / "model.pt"))


def first_against_tenth(repository: Path) -> dict[str, list[float]]:
    with TritonServer(repository) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        call = {n: infer_fn(client, n, example_images(1, seed=11).numpy()) for n in NETWORKS}
        return {name: timings(call[name], 10) for name in NETWORKS}


def side_by_side(repository: Path, plain: Path, repeats: int) -> dict[str, dict[str, dict[int, float]]]:
    """Per network, per column, per batch: median seconds per call."""
    results: dict[str, dict[str, dict[int, float]]] = {}
    with TritonServer(repository) as frozen_server, TritonServer(plain) as plain_server:
        frozen_client = grpcclient.InferenceServerClient(frozen_server.grpc_url)
        plain_client = grpcclient.InferenceServerClient(plain_server.grpc_url)
        for name in NETWORKS:
            with quiet_torchscript():
                frozen = torch.jit.load(str(served_model_file(repository, name))).eval()
                unfrozen = torch.jit.load(str(plain / name / "1" / "model.pt")).eval()
            results[name] = {}
            for batch in (1, 8):
                images = example_images(batch, seed=batch)
                columns = {
                    "in-process plain": local_fn(unfrozen, images),
                    "in-process frozen": local_fn(frozen, images),
                    "Triton plain": infer_fn(plain_client, name, images.numpy()),
                    "Triton frozen": infer_fn(frozen_client, name, images.numpy()),
                }
                n = repeats if batch == 1 else max(2, repeats // 2)
                samples: dict[str, list[float]] = {c: [] for c in columns}
                for fn in columns.values():
                    timings(fn, 3)  # every column past its own warm-up before any is timed
                for _ in range(2):
                    for column, fn in columns.items():
                        samples[column] += timings(fn, n // 2 or 1)
                for column, values in samples.items():
                    results[name].setdefault(column, {})[batch] = statistics.median(values)
            print(name, {c: {b: round(t * 1e3) for b, t in v.items()} for c, v in results[name].items()})
    return results


def figure(seconds: float, batch: int) -> str:
    """Batch 1 as latency, larger batches as throughput."""
    return f"{1e3 * seconds:.0f} ms" if batch == 1 else f"{batch / seconds:.1f} img/s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    first = first_against_tenth(args.repository)
    print("\n| model | 1st request (ms) | 2nd (ms) | 10th (ms) | median of 3rd–10th (ms) | 1st / 10th |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, t in first.items():
        print(
            f"| {name} | {1e3 * t[0]:.0f} | {1e3 * t[1]:.0f} | {1e3 * t[9]:.0f} | "
            f"{1e3 * statistics.median(t[2:]):.0f} | {t[0] / t[9]:.2f} |"
        )

    with tempfile.TemporaryDirectory(prefix="bench-plain-") as tmp:
        plain_repository(args.repository, Path(tmp))
        results = side_by_side(args.repository, Path(tmp), args.repeats)
    columns = ["in-process plain", "in-process frozen", "Triton plain", "Triton frozen"]
    ratios = " | frozen / plain in-process | Triton / in-process (frozen) |"
    print("\n| model | batch | " + " | ".join(columns) + ratios)
    print("| --- | ---: | " + " | ".join("---:" for _ in columns) + " | ---: | ---: |")
    for name, by_column in results.items():
        for batch in (1, 8):
            seconds = {c: by_column[c][batch] for c in columns}
            print(
                f"| {name} | {batch} | "
                + " | ".join(figure(seconds[c], batch) for c in columns)
                + f" | {seconds['in-process plain'] / seconds['in-process frozen']:.2f}× faster"
                + f" | {seconds['in-process frozen'] / seconds['Triton frozen']:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
