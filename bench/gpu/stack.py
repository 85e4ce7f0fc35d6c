"""`python -m bench.gpu.stack --kit build/gpu-kit --out DIR`: the whole stack on a lent GPU,
served and measured in one command of at most 7 minutes.

The GPU machine is lent for 15 minutes in all and cannot fetch anything, so this runs once
there with what `make gpu-kit` carried (`bench/gpu/kit.py`), and a second try still fits.
Stages, each with its own time budget inside one deadline for the run (a stage that fails
or runs out of time is recorded and the rest goes on; the JSON is rewritten after every
stage, so even a run cut short leaves its figures; `run.py`, the plans in `plan.py`):

1. install: the kit, offline (`bench/gpu/install.py`: tritonserver unpacked, the wheels
   this machine lacks installed into `<work>/site`);
2. export: the networks and the ensemble, with the project's own exporter, into
   `<work>/repository` (configs `gpu` and `cpu` as always; `bench/gpu/prepare.py`);
3. triton: the kit's tritonserver started on it with `--model-config-name=gpu` (KIND_GPU,
   dynamic batching, the production warm-up), the kit's GPU PyTorch backend beside it
   (`bench/gpu/server.py`); while it warms up, the tuning variants are traced on the CPU
   (`bench/gpu/tuning.py`);
4. accuracy: the kit's photos, preprocessed as the gateway does, through Triton against
   the same `model.pt` in-process: <= 1e-4 in fp32, the same top-1 in fp16 (this step and
   the next two: `bench/gpu/measure.py`);
5. side by side: each network in-process (images on the GPU, calls back to back) and
   through Triton over gRPC (`bench/gpu/load.py`: several client processes, enough
   concurrent requests to fill the dynamic batcher) at batches 1, 8, 32 and 64;
6. gateway: uvicorn with as many workers as the machine has cores, pointed at that Triton;
   500x375 JPEGs POSTed at rising concurrency, top-5 back; images/s, p50/p99, the share of
   decoding against Triton from each answer's `timing_ms`, CPU use; one network and the
   ensemble; capacity with admission control off, goodput with it on (sheds counted apart);
7. tuning: the variants in-process (fp16, channels_last, cuDNN's autotuner recorded in the
   trace, batch 128, two instances), each checked against fp32 on the photos;
8. winner: the best variant that passed, served by a second tritonserver, beside today's
   figures from step 5 (this step and the last: `bench/gpu/winner.py`).

It writes `gpu_stack.json`, `gpu_stack.md` (`bench/gpu/report.py`) and the servers' and
gateway's logs into `--out`.

`--cpu-dry-run` runs the same stages on the CPU with tiny counts (one network, batches 1
and 2, a second or so per point): the CPU tritonserver (the kit's trimmed one when `--kit`
is given, else the wheel in this environment), the CPU backend of `make backend`,
`--model-config-name=cpu`. `tests/models/test_gpu_bench.py` runs it, so this command
cannot rot between GPU runs.

ON THE GPU MACHINE, what is carried and where the paths come from:
- carried: the working tree (this code, `inception/`, `service/`, `embedded/`) and the kit
  folder (`build/gpu-kit`, an ignored path named in the run's `carry`);
- PYTHONPATH = `<work>/site` (the kit's wheels, installed here) + the repository root,
  set for this process (sys.path) and every child (gateway workers, load clients);
- LD_LIBRARY_PATH of tritonserver = the unpacked server's bundled libraries + this
  machine's `torch/lib` and `nvidia/*/lib` (found beside the torch Python imports), ahead
  of the RUNPATH the kit's backend was built with (`bench/gpu/kit.py`'s DEVICE_RUNPATH);
- the backend directory: the kit's `backend/` (GPU build); with `--cpu-dry-run`, the CPU
  build of `make backend` (`build/backends/current`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.gpu import prepare
from bench.gpu.plan import cpu_dry_run_plan, gpu_plan
from bench.gpu.run import Run, Stack, log
from bench.gpu.server import triton_server


def start_triton(run: Run, stack: Stack) -> dict[str, Any]:
    """Starts Triton on the export; traces the tuning variants while it warms up."""
    assert stack.repository is not None
    stack.triton = triton_server(stack, stack.repository, run.plan.config_name, run.out / "tritonserver.log")
    started = time.monotonic()
    stack.triton.start()
    result: dict[str, Any] = {"command": stack.triton.command()}
    try:
        from bench.gpu.winner import prepare_variants

        stack.tuning = prepare_variants(run, stack)
        result["variants_traced_while_warming"] = sorted(stack.tuning.modules)
    except Exception as exc:  # the tuning stage reports it; Triton still counts
        result["variants_error"] = f"{type(exc).__name__}: {exc}"
    stack.triton.wait_ready(timeout=max(1.0, run.remaining()))
    result["ready_after_s"] = round(time.monotonic() - started, 1)
    return result


def run_stages(run: Run, stack: Stack, kit: Path | None, dry_run: bool) -> None:
    """The stages in order; each needs those whose results it uses."""
    with run.stage("install") as record:
        run.need()
        record.update(prepare.install(run, stack, kit, dry_run))
    with run.stage("environment") as record:
        run.need("install")
        run.results["environment"] = prepare.environment(run.plan.device)
        record.update(run.results["environment"])
    with run.stage("export") as record:
        run.need("install")
        record.update(prepare.export(run, stack))
    with run.stage("triton") as record:
        run.need("export")
        record.update(start_triton(run, stack))
    # Imported only now: torch, and tritonclient from the kit.
    from bench.gpu import measure, winner

    with run.stage("accuracy") as record:
        run.need("triton")
        record.update(measure.accuracy(run, stack))
    with run.stage("side_by_side") as record:
        run.need("triton")
        record["rows"] = measure.side_by_side(run, stack)
    with run.stage("gateway") as record:
        run.need("triton")
        record["rows"] = measure.gateway(run, stack)
    with run.stage("tuning") as record:
        run.need("export")
        record.update(winner.tuning_stage(run, stack))
    with run.stage("winner") as record:
        run.need("tuning")
        record.update(winner.winner_stage(run, stack))


def checks_failed(results: dict[str, Any]) -> list[str]:
    """Stages that did not succeed, and answers that did not match."""
    stages = results["stages"]
    failed = [f"stage {n}: {s.get('status')}" for n, s in stages.items() if s.get("status") != "ok"]
    for model, check in stages.get("accuracy", {}).items():
        if isinstance(check, dict) and check.get("passed") is False:
            failed.append(f"accuracy of {model}")
    winner = stages.get("winner", {}).get("accuracy")
    if isinstance(winner, dict) and winner.get("passed") is False:
        failed.append("accuracy of the winner")
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu.stack", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--kit", type=Path, default=None, help="the folder `make gpu-kit` built (required on a GPU)"
    )
    parser.add_argument("--out", type=Path, required=True, help="where the JSON, Markdown and logs go")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="the same stages on the CPU, tiny counts")
    parser.add_argument("--deadline", type=float, default=None, help="seconds for the whole run")
    args = parser.parse_args(argv)
    plan = cpu_dry_run_plan() if args.cpu_dry_run else gpu_plan()
    if args.deadline is not None:
        plan = replace(plan, deadline=args.deadline)
    if args.kit is None and not args.cpu_dry_run:
        parser.error("--kit is required on a GPU (build it with `make gpu-kit`)")
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-stack-"))
    work.mkdir(parents=True, exist_ok=True)
    run = Run(args.out, plan)
    stack = Stack(work)
    try:
        run_stages(run, stack, args.kit, args.cpu_dry_run)
    finally:
        if stack.triton is not None:
            stack.triton.stop()
        run.write()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    log(f"done in {time.monotonic() - run.started:.0f} s: {args.out / 'gpu_stack.md'}")
    failed = checks_failed(run.results)
    for line in failed:
        log(f"not ok: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
