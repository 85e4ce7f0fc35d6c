"""Closed-loop load for `bench/gpu/stack.py`: Triton over gRPC, or the gateway over HTTP,
from several client processes at once, for a fixed time.

One Python process with asyncio sends at most a few thousand small requests a second,
which is less than a GPU Triton or a 16-worker gateway can answer; the load therefore
comes from several processes (`python -m bench.gpu.load SPEC_JSON`, one per share of the
concurrency), started together and measured over the same window after a warm-up, and
merged here. Each request's outcome is counted as answered, shed (503 or 429, admission
control's refusals, with or without `Retry-After`) or failed, apart.

Imports no torch: the clients must not compete with the GPU process for anything but CPU.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SHED_STATUSES = (429, 503)
TOP_K = 5


@dataclass
class Outcome:
    kind: str  # "ok", "shed" or "error"
    images: int = 0
    detail: str = ""  # an error's kind, or "no Retry-After" for a shed without one
    timing_ms: Mapping[str, float] | None = None


@dataclass
class LoadResult:
    """What one or several clients saw over the measured window."""

    concurrency: int = 0
    seconds: float = 0.0
    answered: int = 0
    images: int = 0
    shed: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    shed_without_retry_after: int = 0
    latencies: list[float] = field(default_factory=list)
    stage_ms_sum: dict[str, float] = field(default_factory=dict)
    client_cpu_seconds: float = 0.0  # the clients' own CPU over the window: are they the limit?

    def record(self, outcome: Outcome, latency: float) -> None:
        if outcome.kind == "ok":
            self.answered += 1
            self.images += outcome.images
            self.latencies.append(latency)
            for stage, ms in (outcome.timing_ms or {}).items():
                self.stage_ms_sum[stage] = self.stage_ms_sum.get(stage, 0.0) + float(ms)
        elif outcome.kind == "shed":
            self.shed += 1
            if outcome.detail:
                self.shed_without_retry_after += 1
        else:
            self.errors += 1
            self.error_kinds[outcome.detail] = self.error_kinds.get(outcome.detail, 0) + 1

    def merge(self, other: LoadResult) -> None:
        self.concurrency += other.concurrency
        self.seconds = max(self.seconds, other.seconds)
        self.answered += other.answered
        self.images += other.images
        self.shed += other.shed
        self.errors += other.errors
        self.shed_without_retry_after += other.shed_without_retry_after
        self.latencies += other.latencies
        for kind, count in other.error_kinds.items():
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + count
        for stage, ms in other.stage_ms_sum.items():
            self.stage_ms_sum[stage] = self.stage_ms_sum.get(stage, 0.0) + ms
        self.client_cpu_seconds += other.client_cpu_seconds

    def summary(self) -> dict[str, Any]:
        """Rates and percentiles; stage times as means over the answered requests."""
        lat = np.array(self.latencies) if self.latencies else None
        window = self.seconds or float("nan")
        stages = {k: v / self.answered for k, v in self.stage_ms_sum.items()} if self.answered else {}
        total = stages.get("total")
        return {
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 3),
            "answered": self.answered,
            "images": self.images,
            "shed": self.shed,
            "shed_without_retry_after": self.shed_without_retry_after,
            "errors": self.errors,
            "error_kinds": self.error_kinds,
            "images_per_s": self.images / window,
            "requests_per_s": self.answered / window,
            "p50_ms": float(np.percentile(lat, 50)) * 1e3 if lat is not None else None,
            "p99_ms": float(np.percentile(lat, 99)) * 1e3 if lat is not None else None,
            "stage_ms_mean": stages,
            "decode_share": (stages.get("decode", 0) + stages.get("preprocess", 0)) / total
            if total
            else None,
            "triton_share": stages.get("triton", 0) / total if total else None,
            "client_cores": self.client_cpu_seconds / window,
        }


async def closed_loop(
    call: Callable[[], Awaitable[Outcome]], concurrency: int, start_at: float, warmup: float, seconds: float
) -> LoadResult:
    """`concurrency` clients sending back to back from `start_at` (wall clock) for
    `warmup + seconds`; only requests that end after the warm-up are counted."""
    result = LoadResult(concurrency=concurrency)
    await asyncio.sleep(max(0.0, start_at - time.time()))
    begin = time.perf_counter() + max(0.0, start_at + warmup - time.time())
    end = begin + seconds

    async def client() -> None:
        while time.perf_counter() < end:
            started = time.perf_counter()
            try:
                outcome = await call()
            except Exception as exc:  # a client's failure is a figure, not the end of the run
                outcome = Outcome("error", detail=type(exc).__name__)
            finished = time.perf_counter()
            if begin <= finished <= end:
                result.record(outcome, finished - started)

    tasks = [asyncio.ensure_future(client()) for _ in range(concurrency)]
    await asyncio.sleep(max(0.0, begin - time.perf_counter()))
    cpu_begin = time.process_time()
    await asyncio.sleep(max(0.0, end - time.perf_counter()))
    result.client_cpu_seconds = time.process_time() - cpu_begin
    await asyncio.gather(*tasks)
    result.seconds = seconds
    return result


async def grpc_load(spec: Mapping[str, Any]) -> LoadResult:
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as grpcaio

    batch = int(spec["batch"])
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    images = rng.integers(0, 256, (batch, 299, 299, 3), dtype=np.uint8)
    inputs = []
    for name in spec.get("inputs", ["image__0"]):
        tensor = grpcclient.InferInput(name, list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        inputs.append(tensor)
    outputs = [grpcclient.InferRequestedOutput("probabilities__0")]
    client = grpcaio.InferenceServerClient(spec["url"])

    async def call() -> Outcome:
        answer = await client.infer(
            spec["model"], inputs, outputs=outputs, client_timeout=spec.get("timeout", 60)
        )
        probabilities = answer.as_numpy("probabilities__0")
        if probabilities is None or probabilities.shape != (batch, 1000):
            return Outcome("error", detail="bad answer")
        return Outcome("ok", images=batch)

    try:
        return await closed_loop(call, spec["concurrency"], spec["start_at"], spec["warmup"], spec["seconds"])
    finally:
        await client.close()


async def http_load(spec: Mapping[str, Any]) -> LoadResult:
    import httpx

    photos = [Path(p).read_bytes() for p in spec["photos"]]
    counter = iter(range(1 << 62))
    concurrency = int(spec["concurrency"])
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    params = {"model": spec["model"], "top_k": str(TOP_K)}

    async with httpx.AsyncClient(
        base_url=spec["url"], timeout=spec.get("timeout", 60), limits=limits
    ) as http:

        async def call() -> Outcome:
            body = photos[next(counter) % len(photos)]
            answer = await http.post(
                "/v1/classify", content=body, params=params, headers={"Content-Type": "image/jpeg"}
            )
            if answer.status_code in SHED_STATUSES:
                return Outcome("shed", detail="" if "retry-after" in answer.headers else "no Retry-After")
            if answer.status_code != 200:
                return Outcome("error", detail=f"HTTP {answer.status_code}")
            data = answer.json()
            if len(data.get("predictions", [])) != TOP_K:
                return Outcome("error", detail="bad answer")
            return Outcome("ok", images=1, timing_ms=data.get("timing_ms"))

        return await closed_loop(call, concurrency, spec["start_at"], spec["warmup"], spec["seconds"])


def run_spec(spec: Mapping[str, Any]) -> LoadResult:
    loader = grpc_load if spec["kind"] == "grpc" else http_load
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(loader(spec))


def run_load(
    spec: Mapping[str, Any],
    processes: int,
    env: Mapping[str, str] | None = None,
    start_delay: float = 2.0,
    cwd: Path | None = None,
) -> dict[str, Any]:
    """The load `spec` (its `concurrency` the total) from `processes` client processes
    started together; their results merged and summarised."""
    processes = max(1, min(processes, int(spec["concurrency"])))
    shares = [
        int(spec["concurrency"]) // processes + (i < int(spec["concurrency"]) % processes)
        for i in range(processes)
    ]
    start_at = time.time() + start_delay
    deadline = (
        start_delay + float(spec["warmup"]) + float(spec["seconds"]) + float(spec.get("timeout", 60)) + 30
    )
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.gpu.load",
                json.dumps({**spec, "concurrency": share, "start_at": start_at, "seed": i}),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
        for i, share in enumerate(shares)
    ]
    merged = LoadResult()
    failures = []
    for child in children:
        try:
            out, err = child.communicate(timeout=deadline)
        except subprocess.TimeoutExpired:
            child.kill()
            out, err = child.communicate()
        if child.returncode != 0 or not out.strip():
            failures.append((err or "").strip()[-1500:] or f"exit code {child.returncode}")
            continue
        merged.merge(LoadResult(**json.loads(out.splitlines()[-1])))
    summary = merged.summary()
    summary["processes"] = processes
    if failures:
        summary["client_failures"] = failures
    return summary


class CpuMeter:
    """CPU time used between `start()` and `stop()`: the whole machine's busy share, and the
    seconds used by each watched process group (a gateway with its workers, a Triton)."""

    def __init__(self, groups: Mapping[str, int]) -> None:
        self.groups = dict(groups)
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._start: tuple[float, list[int], dict[str, float]] | None = None

    @staticmethod
    def _machine() -> list[int]:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]

    def _group_seconds(self) -> dict[str, float]:
        totals = dict.fromkeys(self.groups, 0.0)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pgrp = int(fields[2])
            for name, group in self.groups.items():
                if pgrp == group:
                    totals[name] += (int(fields[11]) + int(fields[12])) / self._ticks
        return totals

    def start(self) -> None:
        self._start = (time.perf_counter(), self._machine(), self._group_seconds())

    def stop(self) -> dict[str, float]:
        if self._start is None:
            raise RuntimeError("CpuMeter.stop() before start()")
        began, machine, groups = self._start
        elapsed = time.perf_counter() - began
        now = self._machine()
        delta = [b - a for a, b in zip(machine, now, strict=True)]
        idle = delta[3] + (delta[4] if len(delta) > 4 else 0)
        busy = 1 - idle / sum(delta) if sum(delta) else 0.0
        used = self._group_seconds()
        figures = {"machine_busy": busy, "cores": float(os.cpu_count() or 1)}
        for name in self.groups:
            # Processes that ended in between take their time with them: a lower bound.
            figures[f"{name}_cores"] = max(0.0, used[name] - groups[name]) / elapsed
        return figures


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m bench.gpu.load SPEC_JSON (started by bench.gpu.stack)", file=sys.stderr)
        return 2
    result = run_spec(json.loads(args[0]))
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
