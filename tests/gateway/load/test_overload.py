"""The real stack past capacity: what must hold whatever the machine's speed.

Capacity is measured first (closed loop), then four times that is offered open loop: every
answer is a 200 or a refusal with Retry-After, none is a 504 or a timeout, the probes and
/metrics answer throughout, and 200s return as soon as the overload ends. Figures (goodput,
percentiles) are `make bench-overload`'s business, not a test's.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from service.settings import Settings

from ...helpers import TritonEndpoint
from ..helpers import MODEL, GatewayProcess, photo, running_gateway

pytestmark = pytest.mark.integration

IMAGE = photo("grace_hopper.jpg").read_bytes()  # 512x600 JPEG, as in the figures
HEADERS = {"Content-Type": "image/jpeg"}
CLIENT_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def overload_gateway(
    gateway_triton: TritonEndpoint, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    log = tmp_path_factory.mktemp("overload") / "gateway.log"
    # Error pacing at its shipped default, as a polite client meets it: the load comes from
    # one address, as a web app's server or many users behind one proxy send it.
    pacing = str(Settings.model_fields["error_rate_per_s"].default)
    env = {
        "GATEWAY_DEFAULT_MODEL": MODEL,
        "GATEWAY_LATENCY_TARGET_S": "0.5",
        "GATEWAY_ERROR_RATE_PER_S": pacing,
    }
    with running_gateway(gateway_triton.grpc_url, log, env=env) as process:
        yield process


@dataclass
class Tally:
    answers: list[tuple[int, float, httpx.Headers]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def _one(client: httpx.AsyncClient, tally: Tally, headers: dict[str, str] | None = None) -> None:
    started = time.perf_counter()
    try:
        answer = await client.post("/v1/classify", content=IMAGE, headers={**HEADERS, **(headers or {})})
    except httpx.HTTPError as exc:
        tally.errors.append(f"{type(exc).__name__}: {exc}")
        return
    tally.answers.append((answer.status_code, time.perf_counter() - started, answer.headers))


async def capacity(url: str, seconds: float = 4.0, clients: int = 4) -> float:
    """Answers per second with ``clients`` closed-loop clients (no refusal expected)."""
    tally = Tally()
    async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT_S) as client:
        await _one(client, tally)  # warm
        tally.answers.clear()
        end = time.monotonic() + seconds

        async def loop() -> None:
            while time.monotonic() < end:
                await _one(client, tally)

        started = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(clients)))
        elapsed = time.monotonic() - started
    assert not tally.errors, tally.errors[:3]
    return sum(1 for status, _, _ in tally.answers if status == 200) / elapsed


async def open_loop(url: str, rate: float, seconds: float, probes: list[tuple[str, int, float]]) -> Tally:
    """``rate`` requests per second for ``seconds``, sent whether or not earlier ones have
    been answered; meanwhile /readyz and /metrics are asked every 0.25 s."""
    tally = Tally()
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with (
        httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT_S, limits=limits) as client,
        httpx.AsyncClient(base_url=url, timeout=10.0) as prober,
    ):
        done = asyncio.Event()

        async def probe() -> None:
            while not done.is_set():
                for path in ("/readyz", "/metrics"):
                    started = time.perf_counter()
                    try:
                        status = (await prober.get(path)).status_code
                    except httpx.HTTPError:
                        status = 0
                    probes.append((path, status, time.perf_counter() - started))
                await asyncio.sleep(0.25)

        prober_task = asyncio.create_task(probe())
        tasks = []
        started = time.monotonic()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(_one(client, tally)))
        await asyncio.gather(*tasks)
        done.set()
        await prober_task
    return tally


def test_past_capacity_every_answer_is_served_or_refused_at_once(overload_gateway: GatewayProcess) -> None:
    url = overload_gateway.url
    served = asyncio.run(capacity(url))
    assert served > 0
    probes: list[tuple[str, int, float]] = []
    tally = asyncio.run(open_loop(url, rate=max(4 * served, 8.0), seconds=8.0, probes=probes))

    assert not tally.errors, f"client errors or timeouts: {tally.errors[:3]}"
    statuses = [status for status, _, _ in tally.answers]
    assert set(statuses) <= {200, 429, 503}, sorted(set(statuses))
    assert 200 in statuses, "nothing was served"
    refused = [(s, h) for s, _, h in tally.answers if s != 200]
    assert refused, "4x capacity was offered and nothing was refused"
    assert all(h.get("Retry-After", "").isdigit() for _, h in refused)
    # One address past capacity is refused for load everyone shares (503), never held by
    # error pacing, past its burst of 20 errors too (issue 25, item 2: held, its refusals
    # took 5 s at p99).
    assert {s for s, _ in refused} == {503}, sorted({s for s, _ in refused})
    assert len(refused) > Settings.model_fields["error_burst"].default, len(refused)

    # Probes and metrics answer throughout, and promptly.
    assert probes and all(status == 200 for _, status, _ in probes), [p for p in probes if p[1] != 200][:5]
    assert max(seconds for _, _, seconds in probes) < 5.0

    # The overload is over: answers are 200 again within a few seconds.
    deadline = time.monotonic() + 10
    with httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT_S) as client:
        while True:
            status = client.post("/v1/classify", content=IMAGE, headers=HEADERS).status_code
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status == 200
        text = client.get("/metrics").text
    assert 'inception_gateway_shed_total{model="inception_resnet_v1",reason="capacity"}' in text
    held = next(x for x in text.splitlines() if x.startswith("inception_gateway_errors_held_total"))
    assert float(held.rsplit(" ", 1)[1]) == 0, held


def test_a_deadline_that_has_passed_is_refused_at_once(overload_gateway: GatewayProcess) -> None:
    """Shorter than any answer can take (5e-324, which schemathesis found): 422 before any
    work. Just long enough to be plausible but passed before the decode: 504 or 503 (the
    decode would end past it), never a decode."""
    with overload_gateway.client() as client:
        for hopeless in ("5e-324", "0.000001"):
            answer = client.post(
                "/v1/classify", content=IMAGE, headers={**HEADERS, "X-Request-Timeout": hopeless}
            )
            assert answer.status_code == 422, answer.text
            assert "cannot be met" in answer.json()["error"]["message"]
        started = time.monotonic()
        answer = client.post("/v1/classify", content=IMAGE, headers={**HEADERS, "X-Request-Timeout": "0.001"})
        assert answer.status_code in (503, 504), answer.text
        assert answer.json()["error"]["code"] in ("deadline_exceeded", "over_capacity")
        assert time.monotonic() - started < 1.0
        bad = client.post("/v1/classify", content=IMAGE, headers={**HEADERS, "X-Request-Timeout": "soon"})
        assert bad.status_code == 422 and "X-Request-Timeout" in bad.text
        fine = client.post("/v1/classify", content=IMAGE, headers={**HEADERS, "X-Request-Timeout": "50"})
        assert fine.status_code == 200, fine.text


def test_a_deadline_that_cannot_be_met_is_refused_before_any_work(overload_gateway: GatewayProcess) -> None:
    """With the model busy, a deadline shorter than the expected wait is refused at once."""

    async def scenario() -> Tally:
        tally, short = Tally(), Tally()
        async with httpx.AsyncClient(base_url=overload_gateway.url, timeout=CLIENT_TIMEOUT_S) as client:
            busy = [asyncio.create_task(_one(client, tally)) for _ in range(3)]
            await asyncio.sleep(0.05)
            await _one(client, short, {"X-Request-Timeout": "0.01"})
            await asyncio.gather(*busy)
        return short

    short = asyncio.run(scenario())
    ((status, seconds, headers),) = short.answers
    assert status in (503, 504), status
    if status == 503:
        assert headers["Retry-After"].isdigit()
    assert seconds < 2.0


def test_a_client_that_leaves_is_not_served(overload_gateway: GatewayProcess, tmp_path: Path) -> None:
    """A client that closes its connection while its request waits is counted as 499 (the
    gateway cancelled its work), not served."""
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(IMAGE)}\r\n\r\n"
    ).encode()

    def count_499() -> float:
        text = httpx.get(overload_gateway.url + "/metrics").text
        for line in text.splitlines():
            if line.startswith("inception_gateway_requests_total{") and 'status="499"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = count_499()

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=overload_gateway.url, timeout=CLIENT_TIMEOUT_S) as client:
            tally = Tally()
            busy = [asyncio.create_task(_one(client, tally)) for _ in range(2)]
            with socket.create_connection(("127.0.0.1", overload_gateway.port)) as sock:
                sock.sendall(head + IMAGE)
                await asyncio.sleep(0.02)
            await asyncio.gather(*busy)

    asyncio.run(scenario())
    deadline = time.monotonic() + 10
    while count_499() <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert count_499() > before
    del tmp_path


def test_triton_drops_requests_whose_deadline_passed_in_its_queue(gateway_triton: TritonEndpoint) -> None:
    """The configs' queue policy (REJECT, timeout override allowed): a request whose timeout
    passes while it waits behind others is dropped by Triton, not computed."""
    import numpy as np
    import tritonclient.grpc.aio as grpcaio
    from tritonclient.grpc import InferInput, InferRequestedOutput
    from tritonclient.utils import InferenceServerException

    batch = np.zeros((1, 299, 299, 3), dtype=np.uint8)

    def inputs() -> list[InferInput]:
        tensor = InferInput("image__0", list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(batch)
        return [tensor]

    async def scenario() -> list[object]:
        client = grpcaio.InferenceServerClient(gateway_triton.grpc_url)
        try:
            output = [InferRequestedOutput("probabilities__0")]
            busy = [asyncio.create_task(client.infer(MODEL, inputs(), outputs=output)) for _ in range(12)]
            await asyncio.sleep(0.05)
            late = client.infer(MODEL, inputs(), outputs=output, timeout=1000)  # 1 ms, in microseconds
            results = await asyncio.gather(late, *busy, return_exceptions=True)
        finally:
            await client.close()
        return results

    late, *busy = asyncio.run(scenario())
    assert isinstance(late, InferenceServerException), late
    assert "timeout expired" in str(late.message()).lower()
    assert not any(isinstance(b, Exception) for b in busy)
