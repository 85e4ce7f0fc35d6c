"""Overload benchmark (`make bench-overload`): goodput and latency past capacity, with
admission control and without it, in one run (a benchmark, not a test).

1. Capacity: the best of closed loops of 2, 4 and 8 clients (admission off, so none is
   refused), answers per second; the unloaded latency: one client.
2. Open loop (requests sent at a fixed rate whether or not earlier ones were answered) at
   1.5x and 4x capacity, `--seconds` each: answers by status, accepted p50/p99, refusal
   p99, goodput as a fraction of capacity, the gateway's RSS, Triton's mean queue and
   compute time per request (from its own metrics).
3. The same 4x level against a second gateway with admission control turned off
   (`GATEWAY_ADMISSION=false`), for comparison.
4. Soak: capacity for `--soak-s` with a 4x burst in the middle; the gateway's RSS before,
   right after the burst and at the end, and its slope.

    python -m bench.overload --repository model_repository
    python -m bench.overload --triton 127.0.0.1:8001 --seconds 20 --soak-s 120   # quicker

Client, gateway and Triton share the machine: figures are ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.gateway import LOAD_GENERATOR_SETTINGS, percentile, photos
from embedded.gateway import Gateway
from embedded.tritonserver import TritonServer

ROOT = Path(__file__).resolve().parent.parent
HEADERS = {"Content-Type": "image/jpeg"}


@dataclass
class Outcome:
    statuses: dict[int, int] = field(default_factory=dict)
    accepted: list[float] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed: float = 0.0

    def add(self, status: int, seconds: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        (self.accepted if status == 200 else self.refused).append(seconds)


async def _send(client: httpx.AsyncClient, image: bytes, model: str, outcome: Outcome) -> None:
    started = time.perf_counter()
    try:
        answer = await client.post("/v1/classify", content=image, params={"model": model}, headers=HEADERS)
    except httpx.HTTPError:
        outcome.errors += 1
        return
    outcome.add(answer.status_code, time.perf_counter() - started)


async def closed_loop(url: str, image: bytes, model: str, clients: int, seconds: float) -> Outcome:
    outcome = Outcome()
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        end = time.monotonic() + seconds

        async def loop() -> None:
            while time.monotonic() < end:
                await _send(client, image, model, outcome)

        started = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(clients)))
        outcome.elapsed = time.monotonic() - started
    return outcome


async def open_loop(url: str, image: bytes, model: str, rate: float, seconds: float) -> Outcome:
    outcome = Outcome()
    limits = httpx.Limits(max_connections=4000, max_keepalive_connections=4000)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        tasks = []
        started = time.monotonic()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(_send(client, image, model, outcome)))
        await asyncio.gather(*tasks)
        # Goodput over the offered period plus the drain: answers that came late still count.
        outcome.elapsed = time.monotonic() - started
    return outcome


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (uvicorn workers), in MiB."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def triton_counters(metrics_url: str, model: str) -> dict[str, float]:
    """Triton's cumulative request count and queue and compute microseconds for a model."""
    wanted = {
        "nv_inference_request_success": "requests",
        "nv_inference_queue_duration_us": "queue_us",
        "nv_inference_compute_infer_duration_us": "compute_us",
    }
    values = dict.fromkeys(wanted.values(), 0.0)
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        name = line.split("{", 1)[0]
        if name in wanted and f'model="{model}"' in line:
            values[wanted[name]] += float(line.rsplit(" ", 1)[1])
    return values


def level_row(name: str, outcome: Outcome, capacity: float, triton: dict[str, float], rss: float) -> dict:
    ok = outcome.statuses.get(200, 0)
    requests = max(1.0, triton["requests"])
    return {
        "level": name,
        "answers": dict(sorted(outcome.statuses.items())),
        "client_errors": outcome.errors,
        "accepted_p50_ms": percentile(outcome.accepted, 50) * 1000 if outcome.accepted else None,
        "accepted_p99_ms": percentile(outcome.accepted, 99) * 1000 if outcome.accepted else None,
        "refused_p99_ms": percentile(outcome.refused, 99) * 1000 if outcome.refused else None,
        "goodput_per_s": ok / outcome.elapsed if outcome.elapsed else 0.0,
        "goodput_of_capacity": (ok / outcome.elapsed) / capacity if outcome.elapsed else 0.0,
        "gateway_rss_mib": rss,
        "triton_queue_ms": triton["queue_us"] / requests / 1000,
        "triton_compute_ms": triton["compute_us"] / requests / 1000,
    }


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def run(args: argparse.Namespace, grpc_url: str, metrics_url: str) -> dict:
    image = photos()["small: grace_hopper.jpg 512x600"]
    model = args.model
    # The admitted gateway runs error pacing as shipped (`--pacing off`: as the suite's
    # gateways): its load comes from one address, as from a web app's server, and a refusal
    # for load must stay fast for it (issue 25, item 2).
    objective = {
        "GATEWAY_LATENCY_TARGET_S": str(args.objective),
        **(LOAD_GENERATOR_SETTINGS if args.pacing == "off" else {}),
    }
    admitted = Gateway(grpc_url, env=objective).start().wait("/readyz")
    unlimited = Gateway(grpc_url, env={"GATEWAY_ADMISSION": "false", **LOAD_GENERATOR_SETTINGS})
    unlimited.start().wait("/readyz")
    rows: list[dict] = []
    try:
        asyncio.run(closed_loop(admitted.url, image, model, 2, 3))  # warm
        unloaded = asyncio.run(closed_loop(admitted.url, image, model, 1, args.seconds / 4))
        # Capacity: the best goodput of closed-loop client counts (too few clients leave the
        # pipeline idle between a request's stages), measured without admission control so
        # that no client is refused and retries at once.
        capacity = 0.0
        for clients in args.clients:
            measured = asyncio.run(closed_loop(unlimited.url, image, model, clients, args.seconds / 3))
            served = measured.statuses.get(200, 0) / measured.elapsed
            print(f"[overload] closed loop, {clients} clients: {served:.2f}/s", flush=True)
            capacity = max(capacity, served)
        print(f"[overload] capacity {capacity:.2f}/s, unloaded p99 "
              f"{percentile(unloaded.accepted, 99) * 1000:.0f} ms", flush=True)  # fmt: skip
        for name, gateway, factor in (
            ("1.5x, admission", admitted, 1.5),
            ("4x, admission", admitted, 4.0),
            ("4x, no admission", unlimited, 4.0),
        ):
            before = triton_counters(metrics_url, model)
            outcome = asyncio.run(open_loop(gateway.url, image, model, factor * capacity, args.seconds))
            row = level_row(
                name, outcome, capacity, _delta(triton_counters(metrics_url, model), before),
                rss_mib(gateway.pid),
            )  # fmt: skip
            rows.append(row)
            print(f"[overload] {json.dumps(row)}", flush=True)
            time.sleep(2)
        soak = asyncio.run(soak_run(admitted, image, model, capacity, args.soak_s))
    finally:
        admitted.stop()
        unlimited.stop()
    return {
        "capacity_per_s": capacity,
        "unloaded_p50_ms": percentile(unloaded.accepted, 50) * 1000,
        "unloaded_p99_ms": percentile(unloaded.accepted, 99) * 1000,
        "levels": rows,
        "soak": soak,
    }


async def soak_run(gateway: Gateway, image: bytes, model: str, capacity: float, seconds: float) -> dict:
    """Capacity for ``seconds``, 4x for a tenth of it in the middle; RSS every 5 s."""
    samples: list[tuple[float, float]] = []
    started = time.monotonic()

    async def sample() -> None:
        while time.monotonic() - started < seconds + 5:
            samples.append((time.monotonic() - started, rss_mib(gateway.pid)))
            await asyncio.sleep(5)

    sampler = asyncio.create_task(sample())
    third = (seconds - seconds / 10) / 2
    await open_loop(gateway.url, image, model, capacity, third)
    before = rss_mib(gateway.pid)
    await open_loop(gateway.url, image, model, 4 * capacity, seconds / 10)
    after_burst = rss_mib(gateway.pid)
    await open_loop(gateway.url, image, model, capacity, third)
    end = rss_mib(gateway.pid)
    await sampler
    late = [(t, r) for t, r in samples if t >= third + seconds / 10]
    slope = 0.0
    if len(late) >= 2:
        n = len(late)
        mean_t = sum(t for t, _ in late) / n
        mean_r = sum(r for _, r in late) / n
        var = sum((t - mean_t) ** 2 for t, _ in late)
        slope = sum((t - mean_t) * (r - mean_r) for t, r in late) / var * 60 if var else 0.0
    return {
        "seconds": seconds,
        "rss_before_burst_mib": before,
        "rss_after_burst_mib": after_burst,
        "rss_end_mib": end,
        "end_over_before": end / before if before else None,
        "slope_after_burst_mib_per_min": slope,
        "samples": samples,
    }


def markdown(result: dict, info: dict) -> str:
    lines = [
        f"Measured {info['date']} on {info['machine']}; {info['model']}, {info['image']}; "
        f"objective {info['objective']} s.",
        "",
        f"Capacity (the best of closed loops of {info['clients']} clients): "
        f"{result['capacity_per_s']:.2f} answers/s; "
        f"unloaded p50 / p99: {result['unloaded_p50_ms']:.0f} / {result['unloaded_p99_ms']:.0f} ms.",
        "",
        "| offered | answers | accepted p50 / p99 (ms) | refused p99 (ms) | goodput (of capacity) "
        "| gateway RSS (MiB) | Triton queue / compute (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["levels"]:
        answers = ", ".join(f"{n} × {s}" for s, n in row["answers"].items())
        if row["client_errors"]:
            answers += f", {row['client_errors']} client errors"

        def ms(value: float | None) -> str:
            return "–" if value is None else f"{value:.0f}"

        cells = [
            row["level"],
            answers,
            f"{ms(row['accepted_p50_ms'])} / {ms(row['accepted_p99_ms'])}",
            ms(row["refused_p99_ms"]),
            f"{row['goodput_per_s']:.2f}/s ({row['goodput_of_capacity']:.2f})",
            f"{row['gateway_rss_mib']:.0f}",
            f"{row['triton_queue_ms']:.0f} / {row['triton_compute_ms']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    soak = result["soak"]
    lines += [
        "",
        f"Soak ({soak['seconds']:.0f} s at capacity, 4x for a tenth in the middle): gateway RSS "
        f"{soak['rss_before_burst_mib']:.1f} MiB before the burst, {soak['rss_after_burst_mib']:.1f} "
        f"right after, {soak['rss_end_mib']:.1f} at the end (end/before {soak['end_over_before']:.3f}); "
        f"slope after the burst {soak['slope_after_burst_mib_per_min']:+.2f} MiB/min.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--triton", help="gRPC host:port of a running Triton (else one is started)")
    parser.add_argument("--triton-metrics", help="its metrics URL (default: port 8002 of that host)")
    parser.add_argument("--model", default="inception_resnet_v1")
    parser.add_argument("--objective", type=float, default=0.5, help="GATEWAY_LATENCY_TARGET_S")
    parser.add_argument(
        "--clients",
        type=lambda text: [int(c) for c in text.split(",")],
        default=[2, 4, 8],
        help="closed-loop client counts; capacity is the best of them",
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each open-loop level")
    parser.add_argument("--soak-s", type=float, default=600.0)
    parser.add_argument(
        "--pacing", choices=("on", "off"), default="on", help="error pacing of the admitted gateway"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    triton = None
    try:
        if args.triton:
            grpc_url = args.triton
            host = args.triton.rsplit(":", 1)[0]
            metrics_url = args.triton_metrics or f"http://{host}:8002/metrics"
        else:
            triton = TritonServer(args.repository, log_path=ROOT / "build" / "logs" / "bench-overload.log")
            triton.start().wait_ready(timeout=600)
            grpc_url = triton.grpc_url
            metrics_url = f"http://{triton.metrics_url}/metrics"
        result = run(args, grpc_url, metrics_url)
    finally:
        if triton is not None:
            triton.stop()
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "model": args.model,
        "image": "grace_hopper.jpg (512x600 JPEG)",
        "objective": args.objective,
        "clients": ", ".join(map(str, args.clients)),
    }
    print(markdown(result, info))
    if args.json:
        args.json.write_text(json.dumps({"info": info, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
