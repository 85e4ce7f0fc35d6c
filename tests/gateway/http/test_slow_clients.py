"""A client that sends its headers and then stalls its body loses its slot: it gets 408
once the body deadline passes, and the slot serves the next client."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from PIL import Image

from ...helpers import TritonEndpoint
from ..helpers import MODEL, classify, encode, photo, running_gateway

pytestmark = pytest.mark.integration


def stalled_upload(port: int, declared: int = 200_000) -> socket.socket:
    """Headers and a first piece of the body, then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\n"
        + f"Content-Length: {declared}\r\n\r\n".encode()
        + b"\xff\xd8\xff" * 100
    )
    return sock


def test_a_stalled_body_gets_408_and_frees_its_slot(gateway_triton: TritonEndpoint, tmp_path: Path) -> None:
    env = {
        "GATEWAY_MODELS": MODEL,
        "GATEWAY_DEFAULT_MODEL": MODEL,
        "GATEWAY_MAX_CONCURRENCY": "1",
        "GATEWAY_BODY_TIMEOUT_S": "1",
        "GATEWAY_QUEUE_TIMEOUT_S": "5",
    }
    with running_gateway(gateway_triton.grpc_url, tmp_path / "gateway.log", env=env) as gateway:
        sock = stalled_upload(gateway.port)
        started = time.monotonic()
        with gateway.client() as client:
            # Waits for the one slot, which the stalled client holds until its deadline.
            answer = classify(client, photo("chelsea.png").read_bytes(), "image/png")
            assert answer.status_code == 200, answer.text
        answered = sock.recv(65536)
        elapsed = time.monotonic() - started
        sock.close()
    assert answered.startswith(b"HTTP/1.1 408"), answered[:200]
    assert b'"request_timeout"' in answered
    assert elapsed < 10


def test_the_buffer_budget_sheds_large_bodies_with_429(
    gateway_triton: TritonEndpoint, tmp_path: Path
) -> None:
    """While one large upload holds most of the worker's buffer budget, another large one
    is shed at once with 429 and Retry-After; a small one still gets in."""
    env = {
        "GATEWAY_MODELS": MODEL,
        "GATEWAY_DEFAULT_MODEL": MODEL,
        "GATEWAY_BUFFER_BUDGET_BYTES": str(1024 * 1024),
        "GATEWAY_BODY_TIMEOUT_S": "5",
    }
    with running_gateway(gateway_triton.grpc_url, tmp_path / "gateway.log", env=env) as gateway:
        sock = stalled_upload(gateway.port, declared=400_000)  # reserves 800 kB of 1 MiB
        time.sleep(0.5)
        with gateway.client() as client:
            started = time.monotonic()
            shed = classify(client, b"\xff\xd8" + b"\0" * 300_000)  # would reserve 600 kB more
            assert time.monotonic() - started < 2
            assert shed.status_code == 429 and shed.headers["Retry-After"], shed.text
            assert shed.json()["error"]["code"] == "overloaded"
            tiny = encode(Image.open(photo("chelsea.png")).resize((64, 64)), "PNG")
            small = classify(client, tiny, "image/png")
            assert small.status_code == 200, small.text
        sock.close()
