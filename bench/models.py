"""CPU figures of the networks: in-process TorchScript against the same file served by
the embedded tritonserver, measured side by side in one run (`make bench`).

Per model: batch-1 latency (median of repeated single-image calls) and batch-8
throughput (images per second over repeated batches of 8), each in-process and through
Triton over gRPC. Absolute numbers on a shared 2-core machine are noise; the ratio
Triton / in-process is what this measures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as grpcclient

from embedded.tritonserver import TritonServer
from inception import list_models
from inception.export import example_images, quiet_torchscript


def timings(fn, repeats: int) -> list[float]:
    fn()  # warm
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repository", type=Path, default=Path("build/model_repository_cpu"))
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    rows = []
    with TritonServer(args.repository) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        for name in list_models():
            with quiet_torchscript():
                module = torch.jit.load(str(args.repository / name / "1" / "model.pt")).eval()
            figures = {}
            for batch in (1, 8):
                images = example_images(batch, seed=batch)
                array = images.numpy()
                inp = grpcclient.InferInput("image__0", list(array.shape), "UINT8")
                inp.set_data_from_numpy(np.ascontiguousarray(array))

                def local(images=images, module=module):
                    with torch.inference_mode():
                        return module(images)

                def served(inp=inp, name=name):
                    return client.infer(name, [inp]).as_numpy("probabilities__0")

                repeats = args.repeats if batch == 1 else max(3, args.repeats // 2)
                # Interleave so both see the same machine load.
                t_local, t_served = [], []
                for _ in range(2):
                    t_local += timings(local, repeats // 2)
                    t_served += timings(served, repeats // 2)
                figures[batch] = (statistics.median(t_local), statistics.median(t_served))
            rows.append((name, figures))
            print(name, figures, flush=True)
    print()
    print(
        "| model | batch-1 latency in-process (ms) | batch-1 latency Triton (ms) | Triton / in-process |"
        " batch-8 in-process (img/s) | batch-8 Triton (img/s) | Triton / in-process |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, f in rows:
        (l1, s1), (l8, s8) = f[1], f[8]
        print(
            f"| {name} | {1000 * l1:.0f} | {1000 * s1:.0f} | {s1 / l1:.2f} | {8 / l8:.1f} | {8 / s8:.1f} | "
            f"{(8 / s8) / (8 / l8):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
