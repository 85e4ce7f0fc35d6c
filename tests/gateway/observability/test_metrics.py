"""/metrics after traffic: every stage histogram with the right labels and counts, with one
and with two uvicorn workers (Prometheus multiprocess mode)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ...helpers import TritonEndpoint
from ..helpers import photo, running_gateway

pytestmark = pytest.mark.integration

MODEL = "inception_resnet_v1"
STAGES = ("read", "decode", "preprocess", "triton", "postprocess")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def worker_pids(multiproc: Path) -> set[str]:
    return {p.stem.rsplit("_", 1)[-1] for p in multiproc.glob("*.db")}


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_after_traffic(gateway_triton: TritonEndpoint, tmp_path: Path, workers: int) -> None:
    multiproc = tmp_path / "prometheus" if workers > 1 else None
    with running_gateway(
        gateway_triton.grpc_url, tmp_path / "gateway.log", workers=workers, multiproc_dir=multiproc
    ) as gateway:
        if multiproc is not None:
            # /readyz answers as soon as one worker is up; wait for every worker's metric
            # files (its unlabelled gauge is written at import) before the traffic.
            deadline = time.monotonic() + 120
            while len(worker_pids(multiproc)) < workers and time.monotonic() < deadline:
                time.sleep(0.2)
        data = photo("chelsea.png").read_bytes()
        ok = 4
        for _ in range(ok):  # a new connection each: with two workers, both get some
            answer = httpx.post(
                gateway.url + "/v1/classify",
                content=data,
                params={"model": MODEL},
                headers={"Content-Type": "image/png"},
                timeout=120,
            )
            assert answer.status_code == 200
        bad = httpx.post(
            gateway.url + "/v1/classify", content=b"not an image", params={"model": MODEL},
            headers={"Content-Type": "image/png"}, timeout=60,
        )  # fmt: skip
        unknown = httpx.post(
            gateway.url + "/v1/classify", content=data, params={"model": "x" * 50},
            headers={"Content-Type": "image/png"}, timeout=60,
        )  # fmt: skip
        assert (bad.status_code, unknown.status_code) == (400, 404)
        text = httpx.get(gateway.url + "/metrics", timeout=30).text
        # Read while the workers live: a stopping worker removes its live gauges' files,
        # and one that served no request (the kernel chose the other) has no others.
        pids = worker_pids(multiproc) if multiproc is not None else set()
    found = samples(text)
    for stage in STAGES:
        count = value(
            found, "inception_gateway_stage_duration_seconds_count", model=MODEL, stage=stage, status="200"
        )
        assert count == ok, stage
        inf = value(
            found,
            "inception_gateway_stage_duration_seconds_bucket",
            model=MODEL,
            stage=stage,
            status="200",
            le="+Inf",
        )
        assert inf == ok
    # The refused image was read and decoding was tried; it never reached Triton.
    for stage in ("read", "decode"):
        assert value(
            found, "inception_gateway_stage_duration_seconds_count", model=MODEL, stage=stage, status="400"
        )
    assert ("inception_gateway_stage_duration_seconds_count",
            frozenset({"model": MODEL, "stage": "triton", "status": "400"}.items())) not in found  # fmt: skip
    assert value(found, "inception_gateway_requests_total", model=MODEL, status="200") == ok
    assert value(found, "inception_gateway_requests_total", model=MODEL, status="400") == 1
    assert value(found, "inception_gateway_requests_total", model="unknown", status="404") == 1
    assert value(found, "inception_gateway_request_duration_seconds_count", model=MODEL, status="200") == ok
    assert value(found, "inception_gateway_errors_total", model=MODEL, code="invalid_image") == 1
    assert value(found, "inception_gateway_errors_total", model="unknown", code="unknown_model") == 1
    assert value(found, "inception_gateway_request_size_bytes_count", model=MODEL) == ok + 1
    assert value(found, "inception_gateway_request_size_bytes_sum", model=MODEL) == pytest.approx(
        (ok + 1) * len(data), rel=0.5
    )
    assert value(found, "inception_gateway_in_flight_requests") == 0
    assert not any("x" * 50 in str(labels) for _, labels in found)  # clients cannot mint label values
    if multiproc is not None:
        assert len(pids) >= workers, pids  # both workers wrote, /metrics summed them
    # The gateway's CPU and memory (the dashboard's panels): the process's, or the whole tree's
    # (supervisor and workers) in multiprocess mode; each worker holds at least 20 MB.
    assert value(found, "process_cpu_seconds_total") > 0
    assert 20e6 * workers < value(found, "process_resident_memory_bytes") < 64e9
