"""The gateway's Prometheus metrics (names are a contract with the dashboards and alerts).

With several uvicorn workers every worker is its own process, so the metrics use
prometheus_client's multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is set (it must be
set before this module is imported, in the parent of the workers: ``embedded/serve.py`` and
the tests do it). ``/metrics`` then aggregates the files of all workers.

Buckets are explicit: CPU inference takes 0.1 to several seconds and a GPU a few ms, so
the latency buckets span 1 ms to 60 s.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
SIZE_BUCKETS = tuple(float(1024 * 4**i) for i in range(9))  # 1 KiB .. 64 MiB
STAGES = ("read", "decode", "preprocess", "triton", "postprocess")
#: The model label of requests not (yet) resolved to a known model: bounded cardinality.
UNKNOWN_MODEL = "unknown"
#: The model label of per-request ensembles (``models=a,b``), whatever their members.
CUSTOM_ENSEMBLE = "custom_ensemble"

REQUESTS = Counter("inception_gateway_requests", "Classify requests answered", ["model", "status"])
REQUEST_DURATION = Histogram(
    "inception_gateway_request_duration_seconds",
    "Total latency of classify requests, from the first byte read to the answer",
    ["model", "status"],
    buckets=LATENCY_BUCKETS,
)
STAGE_DURATION = Histogram(
    "inception_gateway_stage_duration_seconds",
    "Latency of each stage of a classify request (read, decode, preprocess, triton, postprocess)",
    ["model", "stage", "status"],
    buckets=LATENCY_BUCKETS,
)
ERRORS = Counter(
    "inception_gateway_errors", "Error answers by the code of their JSON body", ["model", "code"]
)
IN_FLIGHT = Gauge(
    "inception_gateway_in_flight_requests",
    "Classify requests being handled",
    multiprocess_mode="livesum",
)
REQUEST_SIZE = Histogram(
    "inception_gateway_request_size_bytes",
    "Bytes of image data per classify request",
    ["model"],
    buckets=SIZE_BUCKETS,
)


def multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def render() -> tuple[bytes, str]:
    """The exposition of every worker's metrics (or this process's, without multiprocess)."""
    if multiprocess_enabled():
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Drop a finished worker's live gauges (livesum would count them otherwise)."""
    if multiprocess_enabled():
        _multiprocess.mark_process_dead(pid)


def observe(
    model: str,
    status: int,
    total_s: float,
    stages: dict[str, float],
    size_bytes: int | None,
    error_code: str | None,
) -> None:
    """Record one finished classify request."""
    code = str(status)
    REQUESTS.labels(model, code).inc()
    REQUEST_DURATION.labels(model, code).observe(total_s)
    for stage, seconds in stages.items():
        STAGE_DURATION.labels(model, stage, code).observe(seconds)
    if size_bytes is not None:
        REQUEST_SIZE.labels(model).observe(size_bytes)
    if error_code is not None:
        ERRORS.labels(model, error_code).inc()
