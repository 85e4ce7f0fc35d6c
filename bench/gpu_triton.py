"""GPU figures of the embedded flavour: the same Python-backend runner and `model.pt`
files, with the instance group switched to KIND_GPU, served by the tritonserver of the
`nvidia-pytriton` wheel.

Run on a GPU machine (the project's CI has none and never runs this):

    python -m bench.gpu_triton --out results/

For each network and precision (fp32, fp16) and batch size it records images per second
through Triton (one client sending batches of that size back to back over gRPC, so that
Triton runs exactly that batch) beside the same traced module called in-process on the
same GPU, in one run.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODELS = ("inception_v4", "inception_resnet_v1", "inception_resnet_v2")
BATCHES = (1, 8, 32, 64)
PRECISIONS = ("fp32", "fp16")


def gpu_repository(cpu_repo: Path, dest: Path, models: tuple[str, ...] = MODELS) -> None:
    """Copies each network's CPU-flavour folder once per precision, on KIND_GPU."""
    if dest.exists():
        shutil.rmtree(dest)
    for model in models:
        for precision in PRECISIONS:
            name = f"{model}_{precision}"
            folder = dest / name
            (folder / "1").mkdir(parents=True)
            shutil.copy(cpu_repo / model / "labels.txt", folder / "labels.txt")
            shutil.copy(cpu_repo / model / "1" / "model.py", folder / "1" / "model.py")
            (folder / "1" / "model.pt").symlink_to((cpu_repo / model / "1" / "model.pt").resolve())
            config = (cpu_repo / model / "config.pbtxt").read_text()
            config = config.replace(f'name: "{model}"', f'name: "{name}"').replace("KIND_CPU", "KIND_GPU")
            config = config.replace('string_value: "fp32"', f'string_value: "{precision}"')
            # Warm every batch size measured, on the GPU.
            config = re.sub(r"model_warmup \[.*?\n\]\n", _warmup(), config, flags=re.S)
            (folder / "config.pbtxt").write_text(config)


def _warmup() -> str:
    samples = ",\n".join(
        f'  {{ name: "b{b}" batch_size: {b} inputs {{ key: "image__0" value {{ data_type: TYPE_UINT8 '
        f"dims: [ 299, 299, 3 ] random_data: true }} }} }}"
        for b in BATCHES
    )
    return f"model_warmup [\n{samples}\n]\n"


def time_loop(fn, seconds: float, min_iters: int = 5) -> float:
    """Seconds per call, after two warm-up calls."""
    fn()
    fn()
    n, start = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - start < seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-repository", type=Path, default=Path("build/model_repository_cpu"))
    parser.add_argument("--gpu-repository", type=Path, default=Path("/tmp/model_repository_gpu"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch
    import tritonclient.grpc as grpcclient

    from embedded.tritonserver import TritonServer

    card = torch.cuda.get_device_name(0)
    print(f"card: {card}, torch {torch.__version__}", flush=True)
    models = tuple(args.models.split(","))
    gpu_repository(args.cpu_repository, args.gpu_repository, models)
    results: list[dict] = []
    log = args.out / "tritonserver.log"
    server = TritonServer(args.gpu_repository, log_path=log)
    server.start()
    try:
        server.wait_ready(timeout=400)
        print("triton ready", flush=True)
        client = grpcclient.InferenceServerClient(server.grpc_url)
        rng = np.random.default_rng(0)
        for model in models:
            for precision in PRECISIONS:
                name = f"{model}_{precision}"
                module = torch.jit.load(
                    str(args.cpu_repository / model / "1" / "model.pt"), map_location="cuda"
                )
                module.eval()
                if precision == "fp16":
                    module.half()
                for batch in BATCHES:
                    images = rng.integers(0, 256, (batch, 299, 299, 3), dtype=np.uint8)
                    inp = grpcclient.InferInput("image__0", list(images.shape), "UINT8")
                    inp.set_data_from_numpy(images)

                    def via_triton(inp=inp, name=name):
                        return client.infer(name, [inp]).as_numpy("probabilities__0")

                    gpu_images = torch.from_numpy(images).cuda()

                    def in_process(module=module, gpu_images=gpu_images):
                        with torch.inference_mode():
                            out = module(gpu_images)
                        torch.cuda.synchronize()
                        return out

                    served = via_triton()
                    local = in_process().float().cpu().numpy()
                    max_diff = float(np.abs(served - local).max())
                    t_triton = time_loop(via_triton, args.seconds)
                    t_local = time_loop(in_process, args.seconds)
                    row = {
                        "model": model,
                        "precision": precision,
                        "batch": batch,
                        "triton_images_per_s": batch / t_triton,
                        "in_process_images_per_s": batch / t_local,
                        "triton_ms_per_batch": 1000 * t_triton,
                        "max_abs_diff_vs_in_process": max_diff,
                    }
                    results.append(row)
                    print(json.dumps(row), flush=True)
                del module
                torch.cuda.empty_cache()
    finally:
        server.stop()
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    summary = {"card": card, "nvidia_smi": smi, "torch": torch.__version__, "results": results}
    (args.out / "gpu_results.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"Card: {card} ({smi}); torch {torch.__version__}",
        "",
        "| model | precision | batch | Triton images/s | in-process images/s | Triton / in-process |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['batch']} | {r['triton_images_per_s']:.0f} | "
            f"{r['in_process_images_per_s']:.0f} | "
            f"{r['triton_images_per_s'] / r['in_process_images_per_s']:.2f} |"
        )
    (args.out / "gpu_results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
