"""The gateway's Prometheus metrics (names are a contract with the dashboards and alerts).

With several uvicorn workers every worker is its own process, so the metrics use
prometheus_client's multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is set (it must be
set before this module is imported, in the parent of the workers: the one launcher,
``embedded/gateway.py``, does it for ``make serve``, the tests and the benches). ``/metrics``
then aggregates the files of all workers.

In multiprocess mode the default process collector is of no use (it would describe only the
worker that happens to answer the scrape), so ``/metrics`` exports instead the CPU seconds and
resident memory of the whole gateway process tree (:mod:`service.process_tree`), under the
names and types of the default collector: ``process_cpu_seconds_total`` (counter),
``process_resident_memory_bytes`` (gauge).

Buckets are explicit: CPU inference takes 0.1 to several seconds and a GPU a few ms, so
the latency buckets span 1 ms to 60 s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

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

from .process_tree import ProcessTreeCollector, has_ended


class ModelProvenance(Protocol):
    """What the weights gauge needs of a model's config (service.model_config.ModelInfo)."""

    @property
    def provenance(self) -> str: ...
    @property
    def checkpoint_sha256(self) -> str: ...
    @property
    def random_init(self) -> bool: ...


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
#: Admission control (service/admission.py): what it refused and why, and per model the
#: limit it derived and the service rate it measured, summed over the workers.
SHED = Counter(
    "inception_gateway_shed",
    "Classify requests refused by admission control (reason: capacity or deadline)",
    ["model", "reason"],
)
ERRORS_HELD = Counter(
    "inception_gateway_errors_held",
    "Error answers held before they were sent, their client being past its error budget "
    "(service/policy/ledger.py)",
)
ADMISSION_LIMIT = Gauge(
    "inception_gateway_admission_limit_images",
    "Images in flight admitted per model (AIMD on latency against the objective)",
    ["model"],
    multiprocess_mode="livesum",
)
SERVICE_RATE = Gauge(
    "inception_gateway_service_rate_images_per_second",
    "Measured service rate per model: images answered per second of busy time",
    ["model"],
    multiprocess_mode="livesum",
)
REQUEST_SIZE = Histogram(
    "inception_gateway_request_size_bytes",
    "Bytes of image data per classify request",
    ["model"],
    buckets=SIZE_BUCKETS,
)

#: The answer cache (service/cache.py), per image looked up: a request bypassing it
#: (`Cache-Control: no-store`, the cache off, weights without a sha256) counts in neither.
CACHE_HITS = Counter("inception_gateway_cache_hits", "Images answered from the answer cache", ["model"])
CACHE_MISSES = Counter(
    "inception_gateway_cache_misses", "Images looked up in the answer cache and not found", ["model"]
)
CACHE_BYTES = Gauge(
    "inception_gateway_cache_bytes",
    "Bytes the answer caches hold, summed over the workers",
    multiprocess_mode="livesum",
)

#: Connections answered and closed by the connection itself (service/protocol.py), by why:
#: headers_too_large, timeout, bad_http, connections, peer_connections.
CONNECTIONS_REFUSED = Counter(
    "inception_gateway_connections_refused",
    "Connections answered with an error and closed before any request reached the app",
    ["reason"],
)

#: How inference inputs travel to Triton (service/input_regions.py): ``shared_memory`` for a
#: same-host Triton with a region free, ``grpc`` payload otherwise.
TRITON_INPUTS = Counter(
    "inception_gateway_triton_inputs",
    "Inference requests sent to Triton, by how their inputs went",
    ["transport"],
)
SHARED_MEMORY_BYTES = Gauge(
    "inception_gateway_shared_memory_bytes",
    "Bytes of shared memory regions the workers hold for Triton's inputs",
    multiprocess_mode="livesum",
)

#: One series per served model and the provenance of its weights, as its config on Triton
#: says: 1 for what this gateway read last, 0 for what it read before (a multiprocess gauge
#: keeps every series it ever had, so a stale one is zeroed, not removed). Alerts select
#: `== 1`: random weights in production, and replicas that serve different weights.
WEIGHTS_INFO = Gauge(
    "inception_model_weights_info",
    "Provenance of each served model's weights, as read from its Triton config (value 1)",
    ["model", "weights", "weights_sha256", "random_init"],
    multiprocess_mode="livemax",
)
_weights_labels: dict[str, tuple[str, str, str]] = {}

#: A new version that fails to load leaves the old one ready (Triton's poll mode retries
#: it at every poll), so neither readiness nor the configs show it: only the repository
#: index does, which the gateway reads beside the configs (``TritonBackend.check_loads``).
MODEL_LOAD_FAILED = Gauge(
    "inception_gateway_model_load_failed",
    "1 while Triton's repository index reports a version of the model UNAVAILABLE with a load "
    "failure, else 0",
    ["model"],
    multiprocess_mode="livemax",
)


def set_model_weights(models: Mapping[str, ModelProvenance]) -> None:
    """Publishes the provenance of the models whose configs this process holds now."""
    current = {
        name: (info.provenance, info.checkpoint_sha256, "true" if info.random_init else "false")
        for name, info in models.items()
    }
    for name, labels in list(_weights_labels.items()):
        if current.get(name) != labels:
            WEIGHTS_INFO.labels(name, *labels).set(0)
            del _weights_labels[name]
    for name, labels in current.items():
        WEIGHTS_INFO.labels(name, *labels).set(1)
        _weights_labels[name] = labels


def multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def prune_dead_workers(directory: str) -> list[int]:
    """Drops the live gauges of workers that died without a clean stop (SIGKILL, OOM): their
    files stay behind, and `livesum` would count a killed worker's in-flight requests forever."""
    dead = []
    for path in Path(directory).glob("gauge_live*_*.db"):
        try:
            pid = int(path.stem.rsplit("_", 1)[1])
        except ValueError:
            continue
        if has_ended(pid):
            dead.append(pid)
    for pid in sorted(set(dead)):
        _multiprocess.mark_process_dead(pid, directory)
    return sorted(set(dead))


def render() -> tuple[bytes, str]:
    """The exposition of every worker's metrics (or this process's, without multiprocess)."""
    if multiprocess_enabled():
        prune_dead_workers(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)
        ProcessTreeCollector(registry=registry)
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
