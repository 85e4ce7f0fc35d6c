"""The gateway's own cost per image, isolated (`make bench-frontend`; a benchmark, not a test).

On a GPU host the network costs less than the gateway's decoding and preprocessing, so the
gateway's CPU seconds per image set the host's throughput. This measures them on any
machine: a real tritonserver serves a network that costs almost nothing (a pooled linear
layer in the contract's `ServingModel` wrapper, exported by the exporter's own writer into a
bench-only repository: same input, output, config and provenance as the real networks), a
real gateway runs one uvicorn worker per core, and closed-loop clients send real photos.

For each input (JPEGs of 500x375 to 4000x3000, a PNG; single images and batches of 8 and
32) it reports images/s, the gateway's CPU seconds per image (its processes' user + system
time over the run, from /proc) and so images per gateway CPU-second, beside the floor: the
same bytes through the gateway's own `prepare` (decode, crop, resize) in one thread, no HTTP.
`--profile` samples one worker with py-spy under the 500x375 load and prints the top costs.

    python -m bench.frontend                       # everything, one worker per core
    python -m bench.frontend --only jpeg-500x375 --profile build/frontend.folded

Client, Triton and gateway share the machine: the CPU accounting per process is what
separates them, not the wall clock.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

from bench.gateway import LOAD_GENERATOR_SETTINGS, is_shed, photos
from embedded.gateway import Gateway
from embedded.tritonserver import TritonServer
from service.imaging import configure_pillow, prepare
from service.model_inputs import Preprocessing

ROOT = Path(__file__).resolve().parent.parent
#: The network whose name, preprocessing and config the cheap stand-in takes.
MODEL = "inception_v4"
#: The settings of the gateway under this bench: a load generator's (many users from one
#: address), the stand-in as its one model, and no answer cache, since the same bytes are
#: sent again and again and a cached answer costs no decode.
SETTINGS = {
    **LOAD_GENERATOR_SETTINGS,
    "GATEWAY_CACHE": "false",
    "GATEWAY_MODELS": MODEL,
    "GATEWAY_DEFAULT_MODEL": MODEL,
}


@dataclass(frozen=True)
class Case:
    """One row: an input and how many of it one request carries."""

    name: str
    media: str
    data: bytes
    per_request: int = 1
    multipart: bool = False

    @property
    def label(self) -> str:
        how = f"batch of {self.per_request}" if self.per_request > 1 else "single"
        return f"{self.name}, {how}{' (multipart)' if self.multipart and self.per_request == 1 else ''}"


def scene(width: int, height: int) -> Image.Image:
    """A photograph-like RGB image of the given size: the sample photos' mosaic resized (a
    JPEG's decode cost depends on its content, so no synthetic noise or flat colour)."""
    mosaic = Image.open(io.BytesIO(photos()["camera: mosaic 3000x2000"])).convert("RGB")
    return mosaic.resize((width, height), Image.Resampling.LANCZOS)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def cases() -> list[Case]:
    jpegs = {f"jpeg-{w}x{h}": (w, h) for w, h in ((500, 375), (1024, 768), (2048, 1536), (4000, 3000))}
    made = {name: encoded(scene(*size), "JPEG") for name, size in jpegs.items()}
    small = made["jpeg-500x375"]
    rows = [Case(name, "image/jpeg", data) for name, data in made.items()]
    rows += [
        Case("jpeg-500x375", "image/jpeg", small, multipart=True),
        Case("png-500x375", "image/png", encoded(scene(500, 375), "PNG")),
        Case("jpeg-500x375", "image/jpeg", small, per_request=8),
        Case("jpeg-500x375", "image/jpeg", small, per_request=32),
    ]
    return rows


# -- the bench-only repository


def write_repository(root: Path) -> None:
    """`MODEL`'s folder as the exporter writes it, holding a network that pools the image
    to its three channel means and maps them to 1000 logits: the contract's input and
    output, at almost no cost."""
    import torch
    from torch import nn

    from inception.contract import RANDOM_INIT
    from inception.export import example_images, network_entry, trace_and_check, write_version
    from inception.registry import get_spec
    from inception.repository import repository_files
    from inception.rollout import Rollout, stamp_export

    torch.manual_seed(0)
    spec = get_spec(MODEL)
    network = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 1000))
    from inception.serving import ServingModel

    examples = [(example_images(b, spec.input_size, seed=b),) for b in (1, 4)]
    traced = trace_and_check(ServingModel(network), examples)
    stamp: dict[str, object] = {
        "fingerprint": "bench-frontend",
        "weights": RANDOM_INIT,
        "weights_sha256": "",
        "precision": "fp32",
    }
    with Rollout(root, log=lambda _m: None) as rollout:
        write_version(traced, rollout.new_version(MODEL), stamp, examples[0])
        rollout.publish_all(repository_files([network_entry(spec, stamp_export(stamp))], None))


# -- CPU accounting


def cpu_seconds(pid: int) -> float:
    """User + system seconds of a process and all its descendants still alive."""
    try:
        parent = psutil.Process(pid)
        processes = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


# -- load


def request_of(case: Case) -> dict[str, object]:
    """httpx keyword arguments of one classify request carrying `case`."""
    params = {"model": MODEL}
    if case.per_request == 1 and not case.multipart:
        return {"params": params, "content": case.data, "headers": {"Content-Type": case.media}}
    suffix = case.media.split("/")[1]
    files = [("image", (f"{k}.{suffix}", case.data, case.media)) for k in range(case.per_request)]
    return {"params": params, "files": files}


async def closed_loop(url: str, case: Case, clients: int, seconds: float) -> dict[str, float]:
    """`clients` sending back to back for `seconds`: answered images, refusals, errors and
    latencies."""
    latencies: list[float] = []
    counts = collections.Counter[str]()
    kwargs = request_of(case)
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                answer = await http.post("/v1/classify", **kwargs)  # type: ignore[arg-type]
            except httpx.HTTPError:
                counts["errors"] += 1
                continue
            if answer.status_code == 200:
                body = answer.json()
                ok = sum(1 for r in body["results"] if "predictions" in r) if "results" in body else 1
                counts["images"] += ok
                counts["errors"] += case.per_request - ok
                latencies.append(time.perf_counter() - started)
            elif is_shed(answer.status_code, answer.headers):
                counts["shed"] += 1
                await asyncio.sleep(float(answer.headers.get("retry-after", "1")) / 10)
            else:
                counts["errors"] += 1

    async with httpx.AsyncClient(
        base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients + 4)
    ) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {
        "elapsed_s": elapsed,
        "images": counts["images"],
        "shed": counts["shed"],
        "errors": counts["errors"],
        "p50_ms": float(np.percentile(latencies, 50) * 1e3) if latencies else float("nan"),
        "p99_ms": float(np.percentile(latencies, 99) * 1e3) if latencies else float("nan"),
    }


def served(
    case: Case, gateway: Gateway, triton: TritonServer, clients: int, seconds: float
) -> dict[str, object]:
    """One row through the stack, with each side's CPU seconds over the run."""
    asyncio.run(closed_loop(gateway.url, case, clients, min(2.0, seconds)))  # warm
    assert triton.process is not None
    before = (cpu_seconds(gateway.pid), cpu_seconds(triton.process.pid), time.process_time())
    result = asyncio.run(closed_loop(gateway.url, case, clients, seconds))
    after = (cpu_seconds(gateway.pid), cpu_seconds(triton.process.pid), time.process_time())
    gateway_cpu, triton_cpu, client_cpu = (b - a for a, b in zip(before, after, strict=True))
    images = max(1, int(result["images"]))
    return {
        "case": case.label,
        **result,
        "images_per_s": result["images"] / result["elapsed_s"],
        "gateway_cpu_ms_per_image": 1e3 * gateway_cpu / images,
        "triton_cpu_ms_per_image": 1e3 * triton_cpu / images,
        "client_cpu_ms_per_image": 1e3 * client_cpu / images,
        "images_per_gateway_cpu_s": images / max(gateway_cpu, 1e-9),
    }


def floor(case: Case, seconds: float) -> dict[str, object]:
    """The gateway's own `prepare` of the same bytes, one thread, no HTTP: images per CPU
    second of this thread (Pillow's decoders run on the calling thread)."""
    pre = Preprocessing(0.875, "bicubic", 299)
    prepare(case.data, [pre], max_pixels=50_000_000)
    count, started_cpu, started = 0, time.thread_time(), time.perf_counter()
    while time.perf_counter() - started < seconds:
        prepare(case.data, [pre], max_pixels=50_000_000)
        count += 1
    cpu = time.thread_time() - started_cpu
    return {"images_per_cpu_s": count / cpu, "images_per_s": count / (time.perf_counter() - started)}


# -- profile


def profile(
    gateway: Gateway, case: Case, clients: int, seconds: float, out: Path
) -> dict[str, list[tuple[str, float]]]:
    """py-spy samples one gateway worker (all its threads, native frames off) while the
    clients run `case`; the folded stacks go to `out`, and `top_costs` of them come back."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    worker = next(
        p.pid
        for p in psutil.Process(gateway.pid).children(recursive=True)
        if "spawn_main" in " ".join(p.cmdline())
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    recorder = subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(worker),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
            "--function",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)
    asyncio.run(closed_loop(gateway.url, case, clients, seconds))
    _, err = recorder.communicate(timeout=seconds + 60)
    if recorder.returncode != 0 or not out.exists():
        raise SystemExit(f"py-spy failed: {err.decode(errors='replace')[-2000:]}")
    return top_costs(out.read_text())


def top_costs(folded: str, count: int = 20) -> dict[str, list[tuple[str, float]]]:
    """From py-spy's folded stacks (idle threads already left out by py-spy): the functions
    with the most samples on top of the stack (`self`), and the gateway's own functions by
    the share of samples they are on the stack at all (`stages`), in percent of the
    worker's busy samples."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += int(n)
        for frame in dict.fromkeys(frames):
            inclusive[frame] += int(n)
        own[frames[-1]] += int(n)
    ours = [(f, c) for f, c in inclusive.most_common() if "(service/" in f]
    return {
        "self": [(f, 100 * c / total) for f, c in own.most_common(count)],
        "stages": [(f, 100 * c / total) for f, c in ours[:count]],
    }


# -- report


def markdown(
    rows: list[dict[str, object]], floors: dict[str, dict[str, object]], info: dict[str, object]
) -> str:
    lines = [
        f"Measured {info['date']} on {info['machine']}; {info['workers']} gateway worker(s), "
        f"{info['clients']} closed-loop clients, {info['seconds']:.0f} s a row.",
        "",
        "| input | code | images/s | p50 ms | p99 ms | gateway CPU ms/image | images per gateway CPU-s "
        "| floor (one thread, images per CPU-s) | gateway / floor | Triton CPU ms/image | shed | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        floor_rate = float(floors[str(r["input"])]["images_per_cpu_s"])  # type: ignore[arg-type]
        ratio = float(r["images_per_gateway_cpu_s"]) / floor_rate  # type: ignore[arg-type]
        lines.append(
            f"| {r['case']} | {r['code']} | {r['images_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
            f"| {r['gateway_cpu_ms_per_image']:.2f} | {r['images_per_gateway_cpu_s']:.0f} "
            f"| {floor_rate:.0f} | {ratio:.2f} "
            f"| {r['triton_cpu_ms_per_image']:.2f} | {r['shed']} | {r['errors']} |"
        )
    return "\n".join(lines)


def start_gateway(
    grpc_url: str, workers: int, checkout: Path, env: dict[str, str] | None = None, tag: str = ""
) -> Gateway:
    """A gateway of `checkout`'s code (its `service` package first on the path), with `env`
    over the bench's settings."""
    settings = {**SETTINGS, **(env or {}), "PYTHONPATH": str(checkout)}
    log = ROOT / "build" / "logs" / f"bench-frontend-gateway-{checkout.name}{tag}.log"
    return (
        Gateway(grpc_url, workers=workers, env=settings, log_path=log, cwd=checkout).start().wait("/readyz")
    )


def variant(text: str) -> tuple[str, dict[str, str]]:
    """``LABEL:KEY=VALUE[,KEY=VALUE]`` as the label and the settings it names."""
    label, _, pairs = text.partition(":")
    env = dict(pair.split("=", 1) for pair in pairs.split(",") if "=" in pair)
    if not label or not env:
        raise SystemExit(f"--variant {text!r}: expected LABEL:KEY=VALUE[,KEY=VALUE]")
    return label, env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frontend", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="gateway workers (default: one per core)"
    )
    parser.add_argument("--clients", type=int, default=0, help="closed-loop clients (default: 4 per worker)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per row")
    parser.add_argument("--only", help="run only the cases whose label contains this")
    parser.add_argument("--profile", type=Path, help="also sample a worker with py-spy; folded stacks here")
    parser.add_argument(
        "--before",
        type=Path,
        help="a checkout of other code (a git worktree of an earlier commit): its gateway is measured "
        "beside this one's, row by row, against the same Triton",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL:KEY=VALUE[,KEY=VALUE]",
        help="also measure this checkout's gateway with these settings, row by row beside the "
        "default one (e.g. 'grpc payload:GATEWAY_TRITON_SHARED_MEMORY=off'); may repeat",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    clients = args.clients or 4 * args.workers
    chosen = [c for c in cases() if not args.only or args.only in c.label]
    configure_pillow(50_000_000)
    floors = {c.name: floor(c, min(args.seconds, 4.0)) for c in chosen}

    rows: list[dict[str, object]] = []
    costs: dict[str, list[tuple[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-frontend-") as tmp:
        repository = Path(tmp) / "repository"
        write_repository(repository)
        with TritonServer(
            repository, log_path=ROOT / "build" / "logs" / "bench-frontend-tritonserver.log"
        ) as triton:
            gateways = {"this checkout": start_gateway(triton.grpc_url, args.workers, ROOT)}
            if args.before:
                gateways["before"] = start_gateway(triton.grpc_url, args.workers, args.before.resolve())
            for number, (label, env) in enumerate(map(variant, args.variant)):
                gateways[label] = start_gateway(triton.grpc_url, args.workers, ROOT, env, f"-variant{number}")
            try:
                for case in chosen:
                    for code, gateway in gateways.items():
                        row: dict[str, object] = {"input": case.name, "code": code}
                        row.update(served(case, gateway, triton, clients, args.seconds))
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                if args.profile:
                    costs = profile(gateways["this checkout"], chosen[0], clients, args.seconds, args.profile)
            finally:
                for gateway in gateways.values():
                    gateway.stop()
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "workers": args.workers,
        "clients": clients,
        "seconds": args.seconds,
    }
    print()
    print(markdown(rows, floors, info))
    for title, entries in costs.items():
        print(f"\n| function ({title}) | % of the worker's busy samples |\n| --- | ---: |")
        for name, share in entries:
            print(f"| `{name}` | {share:.1f} |")
    if args.json:
        args.json.write_text(
            json.dumps({"info": info, "rows": rows, "floors": floors, "profile": costs}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
