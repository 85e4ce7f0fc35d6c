"""What tracing costs a request: the same requests through a gateway with tracing off (no
``OTEL_*`` variable) and on (OTLP/HTTP to a local receiver, every request sampled, and
Triton's own OpenTelemetry mode on), against one real Triton, the two alternating.

Reported per mode: the client's latency (p50, p90) and the gateway's own time (the total
less the Triton call, from the answer's ``timing_ms``), which is where tracing works.

    .venv/bin/python -m bench.tracing --requests 60 --rounds 2

Measured on 2 cores (inception_resnet_v1, one 512×600 JPEG at a time, 120 requests a mode):
off: latency p50 189.4 ms, p90 274.5 ms, the gateway's own time p50 6.11 ms;
on: 191.8 ms, 277.4 ms, 6.19 ms (1273 spans received): +0.08 ms of the gateway's time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from embedded.gateway import Gateway, serving
from embedded.tritonserver import TritonServer, opentelemetry_args
from tests.gateway.helpers import MODEL, photo
from tests.otlp import receiving

IMAGE = photo("grace_hopper.jpg")


def run(grpc_url: str, env: dict[str, str], requests: int, log: Path) -> tuple[list[float], list[float]]:
    """Client latencies and gateway-own times, in ms, of `requests` sequential requests."""
    data = IMAGE.read_bytes()
    settings = {"GATEWAY_MODELS": MODEL, "GATEWAY_DEFAULT_MODEL": MODEL, **env}
    latencies, own = [], []
    gateway = Gateway(grpc_url, log, env=settings)
    with serving(gateway), httpx.Client(base_url=gateway.url) as client:
        headers = {"Content-Type": "image/jpeg"}
        for _ in range(5):  # warm-up
            client.post("/v1/classify", content=data, headers=headers).raise_for_status()
        for _ in range(requests):
            started = time.perf_counter()
            answer = client.post("/v1/classify", content=data, headers=headers)
            latencies.append((time.perf_counter() - started) * 1000)
            answer.raise_for_status()
            timing = answer.json()["timing_ms"]
            own.append(timing["total"] - timing["triton"])
    return latencies, own


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    results: dict[str, tuple[list[float], list[float]]] = {"off": ([], []), "on": ([], [])}
    with receiving() as receiver:
        flags = opentelemetry_args({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})
        triton = TritonServer(
            args.repository,
            log_path=folder / "tritonserver.log",
            extra_args=["--model-control-mode=explicit", f"--load-model={MODEL}", *flags],
        )
        with triton:
            for _ in range(args.rounds):
                for mode, env in (("off", {}), ("on", {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})):
                    latencies, own = run(triton.grpc_url, env, args.requests, folder / f"gateway-{mode}.log")
                    results[mode][0].extend(latencies)
                    results[mode][1].extend(own)
        spans = len(receiver.spans)
    for mode, (latencies, own) in results.items():
        deciles = statistics.quantiles(latencies, n=10)
        print(
            f"tracing {mode:3}: {len(latencies)} requests, "
            f"latency p50 {statistics.median(latencies):.1f} ms, p90 {deciles[8]:.1f} ms; "
            f"gateway's own time p50 {statistics.median(own):.2f} ms"
        )
    print(f"spans received: {spans}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
