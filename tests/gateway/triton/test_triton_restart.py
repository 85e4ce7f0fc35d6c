"""The gateway outlives its Triton: it starts before Triton, answers 503 with Retry-After
while Triton is away (within the deadline), and serves again once Triton is back, without
being restarted. Uses its own tritonserver (one model, quick to start), never the shared one."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from embedded.processes import free_port
from embedded.tritonserver import TritonServer

from ..helpers import MODEL, GatewayProcess, classify, photo

pytestmark = pytest.mark.integration

DEADLINE_S = 10.0


def _eventually_200(client: httpx.Client, data: bytes, timeout: float) -> httpx.Response:
    deadline = time.monotonic() + timeout
    answer = classify(client, data, "image/png")
    while answer.status_code != 200 and time.monotonic() < deadline:
        assert answer.status_code == 503, answer.text
        time.sleep(0.5)
        answer = classify(client, data, "image/png")
    return answer


def test_triton_down_then_back(one_model_repository: Path, tmp_path: Path) -> None:
    ports = free_port(), free_port(), free_port()
    logs = tmp_path / "logs"
    env = {
        "GATEWAY_MODELS": MODEL,
        "GATEWAY_DEFAULT_MODEL": MODEL,
        "GATEWAY_TRITON_TIMEOUT_S": str(DEADLINE_S),
        "GATEWAY_RETRY_AFTER_UNAVAILABLE_S": "2",
    }
    gateway = GatewayProcess(f"127.0.0.1:{ports[1]}", logs / "gateway.log", env=env)
    data = photo("chelsea.png").read_bytes()
    first = TritonServer(one_model_repository, *ports, log_path=logs / "triton-1.log")
    second = TritonServer(one_model_repository, *ports, log_path=logs / "triton-2.log")
    try:
        # 1. The gateway starts with no Triton at all: alive, not ready, 503 per request.
        gateway.start().wait("/healthz")
        pid = gateway.process.pid if gateway.process else None
        with gateway.client() as client:
            assert client.get("/readyz").status_code == 503
            early = classify(client, data, "image/png")
            assert early.status_code == 503 and early.headers["Retry-After"] == "2"
            assert early.json()["error"]["code"] == "backend_unavailable"

            # 2. Triton comes up: the gateway becomes ready by itself.
            first.start().wait_ready(timeout=300)
            gateway.wait("/readyz", timeout=60)
            assert _eventually_200(client, data, 30).status_code == 200

            # 3. Triton stops under a running gateway: 503 + Retry-After, within the deadline.
            first.stop()
            started = time.monotonic()
            down = classify(client, data, "image/png")
            elapsed = time.monotonic() - started
            assert down.status_code == 503, down.text
            assert (
                down.headers["Retry-After"] == "2" and down.json()["error"]["code"] == "backend_unavailable"
            )
            assert elapsed < DEADLINE_S
            assert client.get("/readyz").status_code == 503
            assert client.get("/healthz").status_code == 200

            # 4. Triton starts again on the same ports: 200, same gateway process.
            second.start().wait_ready(timeout=300)
            back = _eventually_200(client, data, 60)
            assert back.status_code == 200, back.text
            assert (
                gateway.process is not None and gateway.process.poll() is None and gateway.process.pid == pid
            )
            assert client.get("/readyz").status_code == 200
    finally:
        gateway.stop()
        first.stop()
        second.stop()
