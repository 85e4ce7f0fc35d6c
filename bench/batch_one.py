"""Where Triton's batch-1 time goes on the CPU, against the same frozen module in-process
(`python -m bench.batch_one`; a benchmark, not a test).

`make bench` measured Triton at 0.68–0.75 of in-process at batch 1 and 0.92–0.96 at batch 8.
This splits the difference, each figure a median of blocks alternated in one run:

- the round trip of Triton and gRPC alone: a network that costs almost nothing (the
  stand-in of `bench.frontend`, same input and output) served by the same tritonserver;
- the network in-process, in a separate process that imports torch (so that neither its
  threads nor the client's compete with Triton's), at libtorch's default thread count and
  at the count Triton's backend uses;
- the network through Triton, with the CPU seconds the tritonserver process spent per call
  beside the wall time: more CPU than in-process means more work (threads spinning), the
  same CPU and more wall means waiting;
- both through a second tritonserver whose libgomp threads sleep as soon as they are out
  of work (`OMP_WAIT_POLICY=PASSIVE`) instead of spinning for a while first.

    python -m bench.batch_one --model inception_resnet_v1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import tritonclient.grpc as grpcclient

from bench.frontend import MODEL as STAND_IN
from bench.frontend import write_repository
from embedded.tritonserver import TritonServer
from inception.contract import INPUT_NAME, OUTPUT_NAME
from inception.rollout import served_model_file

ROOT = Path(__file__).resolve().parent.parent
#: libgomp's threads sleep at once when out of work instead of spinning for a while first.
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}

#: The in-process side, run in its own interpreter: load, warm, time `repeats` calls.
IN_PROCESS = textwrap.dedent(
    """
    import json, statistics, sys, time, torch
    path, threads, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if threads:
        torch.set_num_threads(threads)
    module = torch.jit.load(path).eval()
    images = torch.randint(0, 256, (1, 299, 299, 3), dtype=torch.uint8)
    walls, cpus = [], []
    with torch.inference_mode():
        for _ in range(5):
            module(images)
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            module(images)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    print(json.dumps({"threads": torch.get_num_threads(), "wall": walls, "cpu": cpus}))
    """
)


def in_process(model_file: Path, threads: int, repeats: int) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", IN_PROCESS, str(model_file), str(threads), str(repeats)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def through_triton(
    client: grpcclient.InferenceServerClient, server: psutil.Process, model: str, repeats: int
) -> dict[str, object]:
    images = np.random.default_rng(0).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
    tensor = grpcclient.InferInput(INPUT_NAME, list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    for _ in range(3):
        client.infer(model, [tensor])
    # The process's CPU over the whole block, per call: its clock ticks (10 ms) are too
    # coarse to read one call.
    walls = []
    before = server.cpu_times()
    for _ in range(repeats):
        wall = time.perf_counter()
        client.infer(model, [tensor]).as_numpy(OUTPUT_NAME)
        walls.append(time.perf_counter() - wall)
    after = server.cpu_times()
    cpus = [(after.user + after.system - before.user - before.system) / repeats] * repeats
    return {"threads": server.num_threads(), "wall": walls, "cpu": cpus}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batch_one", description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--model", default="inception_resnet_v1")
    parser.add_argument("--repeats", type=int, default=15, help="calls per block")
    parser.add_argument("--blocks", type=int, default=3, help="alternated blocks per column")
    args = parser.parse_args(argv)
    model_file = served_model_file(args.repository, args.model)
    samples: dict[str, dict[str, list[float]]] = {}
    threads: dict[str, int] = {}
    cores = os.cpu_count() or 1

    def add(column: str, result: dict[str, object]) -> None:
        entry = samples.setdefault(column, {"wall": [], "cpu": []})
        entry["wall"] += result["wall"]  # type: ignore[arg-type]
        entry["cpu"] += result["cpu"]  # type: ignore[arg-type]
        threads[column] = int(str(result["threads"]))

    with tempfile.TemporaryDirectory(prefix="bench-batch-one-") as tmp:
        repository = Path(tmp) / "repository"
        write_repository(repository)
        shutil.copytree(args.repository / args.model, repository / args.model, symlinks=True)
        logs = ROOT / "build" / "logs"
        with (
            TritonServer(repository, log_path=logs / "bench-batch-one.log") as spinning,
            TritonServer(
                repository, log_path=logs / "bench-batch-one-passive.log", environment=PASSIVE
            ) as passive,
        ):
            servers = {"": spinning, ", OMP_WAIT_POLICY=PASSIVE": passive}
            clients = {k: grpcclient.InferenceServerClient(t.grpc_url) for k, t in servers.items()}
            processes = {k: psutil.Process(t.process.pid) for k, t in servers.items() if t.process}
            for _ in range(args.blocks):
                for k in servers:
                    add(
                        f"Triton{k}, stand-in network",
                        through_triton(clients[k], processes[k], STAND_IN, args.repeats),
                    )
                add("in-process, libtorch's default threads", in_process(model_file, 0, args.repeats))
                add(f"in-process, {cores} threads", in_process(model_file, cores, args.repeats))
                for k in servers:
                    add(f"Triton{k}", through_triton(clients[k], processes[k], args.model, args.repeats))
    base = statistics.median(samples["in-process, libtorch's default threads"]["wall"])
    print(
        f"\n{args.model}, batch 1, {args.blocks} blocks of {args.repeats} calls per column, {cores} cores\n"
    )
    print(
        "| column | threads | median wall ms | p90 wall ms | median CPU ms per call | in-process / column |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for column, values in samples.items():
        wall = statistics.median(values["wall"])
        p90 = float(np.percentile(values["wall"], 90))
        print(
            f"| {column} | {threads[column]} | {1e3 * wall:.1f} | {1e3 * p90:.1f} "
            f"| {1e3 * statistics.median(values['cpu']):.1f} | {base / wall:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
