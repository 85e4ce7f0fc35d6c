"""`python -m bench.gpu.stack --kit build/gpu-kit --out DIR`: the whole stack on a lent GPU,
served and measured in one command of at most 7 minutes.

The GPU machine is lent for 15 minutes in all and cannot fetch anything, so this runs once
there with what `make gpu-kit` carried (`bench/gpu/kit.py`), and a second try still fits.
Stages, each with its own time budget inside one deadline for the run (a stage that fails
or runs out of time is recorded and the rest goes on; the JSON is rewritten after every
stage, so even a run cut short leaves its figures):

1. install: the kit, offline (`bench/gpu/install.py`: tritonserver unpacked, the wheels
   this machine lacks installed into `<work>/site`);
2. export: the networks and the ensemble, with the project's own exporter, into
   `<work>/repository` (configs `gpu` and `cpu` as always);
3. triton: the kit's tritonserver started on it with `--model-config-name=gpu` (KIND_GPU,
   dynamic batching, the production warm-up), the kit's GPU PyTorch backend beside it;
   while it warms up, the tuning variants are traced on the CPU (`bench/gpu/tuning.py`);
4. accuracy: the kit's photos, preprocessed as the gateway does, through Triton against
   the same `model.pt` in-process: <= 1e-4 in fp32, the same top-1 in fp16;
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
   figures from step 5.

It writes `gpu_stack.json`, `gpu_stack.md` and the servers' and gateway's logs into
`--out`.

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
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.gpu.install import (
    Environment,
    KitInstallError,
    Server,
    import_check,
    install_wheels,
    read_manifest,
    torch_libraries,
    unpack_server,
    verify,
)

ROOT = Path(__file__).resolve().parents[2]
NETWORKS = ("inception_v4", "inception_resnet_v1", "inception_resnet_v2")
ENSEMBLE = "inception_ensemble"
GATEWAY_IMPORTS = (
    "fastapi",
    "uvicorn",
    "httptools",
    "pydantic_settings",
    "multipart",
    "tritonclient.grpc.aio",
)


@dataclass(frozen=True)
class Plan:
    """What one run measures, and how long each stage may take (seconds)."""

    device: str
    config_name: str
    networks: tuple[str, ...]
    tuned: str  # the network the variants are made of
    gateway_model: str
    batches: tuple[int, ...]
    fill: int  # images in flight that fill the batcher: concurrency = fill // batch
    load_seconds: float
    load_warmup: float
    inprocess_seconds: float
    warmup_calls: int  # in-process, per module and batch size, before timing
    blocks: int  # in-process throughput: median of this many blocks
    start_delay: float  # load clients start together this long after being spawned
    gateway_levels: tuple[int, ...]
    gateway_workers: int
    client_processes: int
    tuning_batches: tuple[int, ...]
    variants: tuple[str, ...]
    photo_crops: tuple[float, ...]
    photo_flips: bool
    photo_limit: int  # photos used by the tuning and accuracy checks
    budgets: dict[str, float] = field(default_factory=dict)
    deadline: float = 400.0


BUDGETS = {
    "install": 45,
    "environment": 30,
    "export": 90,
    "triton": 150,
    "accuracy": 30,
    "side_by_side": 70,
    "gateway": 80,
    "tuning": 70,
    "winner": 70,
}


def gpu_plan() -> Plan:
    cores = os.cpu_count() or 16
    return Plan(
        device="cuda",
        config_name="gpu",
        networks=NETWORKS,
        tuned="inception_v4",
        gateway_model="inception_resnet_v1",
        batches=(1, 8, 32, 64),
        fill=128,
        load_seconds=1.5,
        load_warmup=0.5,
        inprocess_seconds=1.0,
        warmup_calls=3,
        blocks=3,
        start_delay=1.0,
        gateway_levels=(16, 64, 256),
        gateway_workers=cores,
        client_processes=max(2, cores // 4),
        tuning_batches=(1, 64, 128),
        variants=(),  # all of bench.gpu.tuning.VARIANTS
        photo_crops=(0.875, 1.0, 0.7),
        photo_flips=True,
        photo_limit=100,
        budgets=dict(BUDGETS),
    )


def cpu_dry_run_plan() -> Plan:
    return replace(
        gpu_plan(),
        device="cpu",
        config_name="cpu",
        networks=("inception_resnet_v1",),
        tuned="inception_resnet_v1",
        batches=(1, 2),
        fill=2,
        load_seconds=1.0,
        load_warmup=0.4,
        inprocess_seconds=0.3,
        warmup_calls=1,
        blocks=1,
        start_delay=1.0,
        gateway_levels=(2,),
        gateway_workers=1,
        client_processes=1,
        tuning_batches=(1, 2),
        variants=("dry",),
        photo_crops=(0.875,),
        photo_flips=False,
        photo_limit=4,
        deadline=240.0,
    )


_STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[gpu-stack +{time.monotonic() - _STARTED:5.1f}s] {message}", flush=True)


class Run:
    """The run's results, its deadline and its stages; written out after each stage."""

    def __init__(self, out: Path, plan: Plan) -> None:
        self.out = out
        self.plan = plan
        self.started = time.monotonic()
        self.results: dict[str, Any] = {
            "command": " ".join(["python -m bench.gpu.stack", *sys.argv[1:]]),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "plan": asdict(plan),
            "stages": {},
        }
        self.stage_end = 0.0

    def remaining(self) -> float:
        """Seconds left in the current stage (and in the run)."""
        return max(0.0, min(self.stage_end, self.started + self.plan.deadline) - time.monotonic())

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Runs a stage within its budget; records ok / failed / skipped and its time. The
        body starts with `need()`, which skips it when the run is out of time or a stage it
        needs did not succeed."""
        budget = self.plan.budgets.get(name, 30.0)
        left = max(0.0, self.started + self.plan.deadline - time.monotonic())
        record: dict[str, Any] = {"budget_s": budget}
        self.results["stages"][name] = record
        self.stage_end = time.monotonic() + min(budget, left)
        began = time.monotonic()
        log(f"stage {name} (budget {min(budget, left):.0f} s)")
        try:
            yield record
            record["status"] = "ok"
        except StageSkipped as skipped:
            record["status"] = f"skipped: {skipped}"
        except Exception as exc:
            record["status"] = "failed"
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc()[-4000:]
            log(f"stage {name} failed: {record['error']}")
        finally:
            record["seconds"] = round(time.monotonic() - began, 1)
            self.write()

    def need(self, *names: str) -> None:
        """Skips the current stage if the run is out of time or a named stage did not
        succeed."""
        if self.remaining() <= 1:
            raise StageSkipped("out of time")
        failed = [n for n in names if self.results["stages"].get(n, {}).get("status") != "ok"]
        if failed:
            raise StageSkipped(f"needs {', '.join(failed)}")

    def write(self) -> None:
        from bench.gpu.report import markdown

        self.results["total_seconds"] = round(time.monotonic() - self.started, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_stack.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        (self.out / "gpu_stack.md").write_text(markdown(self.results) + "\n")


class StageSkipped(Exception):
    """A stage that did not run: the deadline passed, or a stage it needs failed."""


# ---------------------------------------------------------------------------- stages


@dataclass
class Stack:
    """What the stages hand each other."""

    work: Path
    env: Environment = field(default_factory=Environment)
    server: Server | None = None
    backend_directory: Path | None = None
    photos: list[Path] = field(default_factory=list)
    repository: Path | None = None
    triton: Any = None  # a KitTritonServer while one runs
    tuning: Any = None  # bench.gpu.tuning state: the traced variants


def install(run: Run, stack: Stack, kit: Path | None, dry_run: bool) -> dict[str, Any]:
    """The kit, offline; in a dry run without a kit, this environment's tritonserver."""
    result: dict[str, Any] = {}
    ld_path: list[str] = []
    if kit is not None:
        manifest = read_manifest(kit)
        problems = verify(kit, manifest)
        if problems:
            raise KitInstallError("the kit is damaged: " + "; ".join(problems[:10]))
        result["kit_bytes"] = manifest["total_bytes"]
        result["kit_created"] = manifest["created"]
        stack.server = unpack_server(kit, manifest, stack.work)
        ld_path.append(str(stack.server.libs))
        site = stack.work / "site"
        result["wheels"] = install_wheels(kit, manifest, site, timeout=run.remaining())
        stack.env.pythonpath.append(str(site))
        backend = kit / "backend"
        stack.photos = sorted((kit / "photos").glob("*.jpg"))
        if not dry_run:
            if not (backend / "pytorch" / "libtriton_pytorch.so").is_file():
                raise KitInstallError("the kit carries no GPU backend (built without the `backend` part)")
            stack.backend_directory = backend
    if dry_run:
        from embedded.backend import CURRENT

        stack.backend_directory = CURRENT
        if not stack.photos:
            from bench.gpu.kit import build_photos

            stack.photos = [stack.work / p["path"] for p in build_photos(stack.work)]
    stack.env.pythonpath.append(str(ROOT))
    ld_path += torch_libraries()
    stack.env.ld_library_path = ld_path
    stack.env.activate()
    # Children (gateway workers, load clients) import from the same places; only Triton
    # gets the library path.
    os.environ["PYTHONPATH"] = stack.env.apply(os.environ)["PYTHONPATH"]
    result["pythonpath"] = stack.env.pythonpath
    result["ld_library_path"] = ld_path
    result["server"] = str(stack.server.binary) if stack.server else "this environment's nvidia-pytriton"
    result["backend_directory"] = str(stack.backend_directory)
    result["imports"] = import_check(
        stack.env.apply(os.environ), GATEWAY_IMPORTS, timeout=max(5.0, run.remaining())
    )
    broken = {m: e for m, e in result["imports"].items() if e != "ok"}
    if broken:
        raise KitInstallError(f"after the install these do not import: {broken}")
    return result


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_cores": os.cpu_count(),
        "device": device,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=torch.cuda.get_device_name(0),
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
        smi = shutil.which("nvidia-smi")
        if smi:
            done = subprocess.run(
                [smi, "--query-gpu=driver_version,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            env["nvidia_smi"] = done.stdout.strip()
    return env


def export(run: Run, stack: Stack) -> dict[str, Any]:
    """The project's exporter, as `make repository` runs it, into the run's own folder;
    an export already made here with the same inputs is reused (its fingerprint says so)."""
    from inception import export as exporter
    from inception.rollout import served_version

    repository = stack.work / "repository"
    seed = ROOT / "model_repository"
    for name in (*run.plan.networks, "inception_ensemble_mean"):
        number = served_version(seed / name)  # the version the seed serves, by its number
        source = seed / name / str(number)
        if number is not None and (source / "model.pt").is_file() and (source / ".export.json").is_file():
            (repository / name / str(number)).mkdir(parents=True, exist_ok=True)
            for item in ("model.pt", ".export.json"):
                target = repository / name / str(number) / item
                if not target.exists():
                    os.link(source / item, target)
    started = time.monotonic()
    code = exporter.main(
        ["--repository", str(repository), "--models", ",".join(run.plan.networks), "--hub", "never"]
    )
    if code != 0:
        raise RuntimeError(f"inception.export exited with {code}")
    stack.repository = repository
    return {
        "repository": str(repository),
        "seconds": round(time.monotonic() - started, 1),
        "models": sorted({p.parent.parent.name for p in repository.glob("*/[1-9]*/model.pt")}),
    }


def triton_server(stack: Stack, repository: Path, config_name: str, log_path: Path) -> Any:
    """A tritonserver on `repository`: the kit's binary when a kit was installed, with the
    run's library path; else this environment's, as `embedded/tritonserver.py` starts it."""
    from embedded.processes import start_group
    from embedded.tritonserver import TritonServer

    server = stack.server
    env = stack.env.apply(os.environ)

    class KitTritonServer(TritonServer):
        def command(self) -> list[str]:
            command = super().command()
            if server is not None:
                command[0] = str(server.binary)
            return command

        def start(self) -> KitTritonServer:
            if self.process is None or self.process.poll() is not None:
                self.process = start_group(self.command(), env=env, log_path=self.log_path)
            return self

    if server is None:  # the wheel in this environment, with its own library path
        from embedded.tritonserver import server_environment

        env = stack.env.apply(server_environment())
    return KitTritonServer(
        repository, log_path=log_path, config_name=config_name, backend_directory=stack.backend_directory
    )


def start_triton(run: Run, stack: Stack) -> dict[str, Any]:
    """Starts Triton on the export; traces the tuning variants while it warms up."""
    assert stack.repository is not None
    stack.triton = triton_server(stack, stack.repository, run.plan.config_name, run.out / "tritonserver.log")
    started = time.monotonic()
    stack.triton.start()
    result: dict[str, Any] = {"command": stack.triton.command()}
    try:
        from bench.gpu.measure import prepare_variants

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
        record.update(install(run, stack, kit, dry_run))
    with run.stage("environment") as record:
        run.need("install")
        run.results["environment"] = environment(run.plan.device)
        record.update(run.results["environment"])
    with run.stage("export") as record:
        run.need("install")
        record.update(export(run, stack))
    with run.stage("triton") as record:
        run.need("export")
        record.update(start_triton(run, stack))
    # Imported only now: torch, and tritonclient from the kit.
    from bench.gpu import measure

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
        record.update(measure.tuning_stage(run, stack))
    with run.stage("winner") as record:
        run.need("tuning")
        record.update(measure.winner_stage(run, stack))


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
