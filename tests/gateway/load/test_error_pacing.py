"""Error pacing (service/policy/ledger.py): a client past its budget of error answers has them held,
so that looping on refusals or bad requests stops costing the server CPU; a client within
it, the probes, and the server's own faults are answered at once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.errors import (
    BackendUnavailable,
    ClientOverloaded,
    InvalidRequest,
    OverCapacity,
    Overloaded,
    OverShare,
)
from service.policy import PRUNE_AT, Ledger, paced
from service.settings import Settings

from ..helpers import UNREACHABLE, GatewayProcess


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pacer(rate: float = 2.0, burst: int = 3, pause: float = 2.0) -> tuple[Ledger, FakeClock]:
    clock = FakeClock()
    return Ledger(rate, burst, pause, clock=clock), clock


def test_a_client_within_its_burst_is_never_held() -> None:
    errors, _ = pacer(burst=3)
    assert [errors.pause_for("a") for _ in range(3)] == [0.0, 0.0, 0.0]


def test_past_the_burst_each_error_waits_for_its_token_up_to_the_bound() -> None:
    errors, _ = pacer(rate=2.0, burst=3, pause=2.0)
    for _ in range(3):
        errors.pause_for("a")
    # Tokens go into debt at 2 a second: 0.5 s, 1 s, 1.5 s, 2 s, then the bound.
    assert [errors.pause_for("a") for _ in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


def test_the_budget_comes_back_with_time_and_clients_are_apart() -> None:
    errors, clock = pacer(rate=2.0, burst=3)
    for _ in range(8):
        errors.pause_for("a")
    assert errors.pause_for("b") == 0.0  # another client has its own budget
    clock.now += 10.0  # 20 tokens earned, capped at the burst
    assert [errors.pause_for("a") for _ in range(4)] == [0.0, 0.0, 0.0, 0.5]


def test_pacing_off_never_holds() -> None:
    for errors in (Ledger(0.0, 1, 2.0), Ledger(2.0, 1, 0.0)):
        assert {errors.pause_for("a") for _ in range(50)} == {0.0}


def test_clients_that_earned_their_budget_back_are_forgotten() -> None:
    errors, clock = pacer(rate=1.0, burst=2)
    for n in range(PRUNE_AT):
        errors.pause_for(f"c{n}")
    errors.pause_for("old-debtor")
    errors.pause_for("old-debtor")
    errors.pause_for("old-debtor")
    clock.now += 10.0
    errors.pause_for("new")
    assert "c0" not in errors.entries and "new" in errors.entries
    assert len(errors.entries) < PRUNE_AT


def test_hold_sleeps_the_pause() -> None:
    """One error after another (a client that waits for each answer) gets them at the
    budget's rate: each held answer earns the next token while it waits."""
    errors = Ledger(rate_per_s=10.0, burst=1, pause_s=0.2)
    started = time.perf_counter()
    pauses = asyncio.run(hold_many(errors, 3))
    assert pauses == [0.0, pytest.approx(0.1, abs=0.02), pytest.approx(0.1, abs=0.02)]
    assert time.perf_counter() - started >= 0.18


async def hold_many(errors: Ledger, n: int) -> list[float]:
    return [await errors.hold("a") for _ in range(n)]


def test_what_is_paced() -> None:
    """The client's own making, a 4xx: its mistakes and its excess; never the service's
    state, whatever its status (issue 25, item 2)."""
    assert paced(InvalidRequest("bad"), "/v1/classify")
    assert paced(OverShare("over its share"), "/v1/classify")
    assert paced(ClientOverloaded("its most requests in flight"), "/v1/classify")
    assert not paced(OverCapacity("busy"), "/v1/classify")  # load everyone shares: fast
    assert not paced(Overloaded("the worker is full"), "/v1/classify")
    assert not paced(BackendUnavailable("triton is down"), "/v1/classify")  # no client's loop
    assert not paced(InvalidRequest("bad"), "/readyz")  # a kubelet hears at once


@pytest.fixture
def paced_app() -> Iterator[TestClient]:
    settings = Settings(
        triton_grpc_url=UNREACHABLE,
        api_keys=["key-a", "key-b"],
        error_rate_per_s=2.0,
        error_burst=3,
        error_pause_s=0.4,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def bad_request(client: TestClient, key: str) -> float:
    """A 4xx of the client's own making (a crop count that is no number), and its time."""
    started = time.perf_counter()
    answer = client.post(
        "/v1/classify",
        params={"crops": "many"},
        content=b"x",
        headers={"Content-Type": "image/jpeg", "X-API-Key": key},
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "invalid_request"
    return time.perf_counter() - started


def test_a_client_looping_on_errors_is_held_and_the_others_are_not(paced_app: TestClient) -> None:
    quick = [bad_request(paced_app, "key-a") for _ in range(3)]
    held = [bad_request(paced_app, "key-a") for _ in range(3)]
    assert max(quick) < 0.3, quick
    assert min(held) >= 0.3, held  # 0.5 s earned at 2 a second, bounded by the 0.4 s pause
    assert bad_request(paced_app, "key-b") < 0.3  # another key is another client
    started = time.perf_counter()
    assert paced_app.get("/healthz").status_code == 200
    assert time.perf_counter() - started < 0.3
    metrics = paced_app.get("/metrics", headers={"X-API-Key": "key-a"}).text
    line = next(x for x in metrics.splitlines() if x.startswith("inception_gateway_errors_held_total"))
    assert float(line.rsplit(" ", 1)[1]) >= 3


def hammer(url: str, seconds: float, threads: int = 8) -> int:
    """Closed-loop clients from 127.0.0.2 resending a bad request as soon as each answer
    comes; how many answers they got in ``seconds``."""
    stop = threading.Event()
    counts: list[int] = []

    def loop() -> None:
        done = 0
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(base_url=url, timeout=30, transport=transport) as client:
            while not stop.is_set():
                answer = client.post(
                    "/v1/classify", params={"crops": "many"}, headers={"Content-Type": "image/jpeg"}
                )
                assert answer.status_code == 422
                done += 1
        counts.append(done)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join(timeout=30)
    return sum(counts)


def test_a_real_worker_slows_a_hammering_client_to_its_budget(tmp_path: Path) -> None:
    """The shipped defaults (20 at once, then 2 a second, held at most 2 s), against the
    same gateway with pacing off: the looping client gets its burst and about one answer per
    thread per pause, not as many as the worker can write."""
    shipped = {
        name: Settings.model_fields[name].default
        for name in ("error_rate_per_s", "error_burst", "error_pause_s")
    }
    counts = {}
    for name, rate in (("off", "0"), ("on", str(shipped["error_rate_per_s"]))):
        gateway = GatewayProcess(
            UNREACHABLE, tmp_path / f"{name}.log", env={"GATEWAY_ERROR_RATE_PER_S": rate}
        )
        try:
            gateway.start().wait("/healthz")
            counts[name] = hammer(gateway.url, seconds=4.0)
        finally:
            gateway.stop()
    # burst + earned tokens + one held answer per thread per pause, with slack for the last round
    bound = (
        shipped["error_burst"] + 4.0 * shipped["error_rate_per_s"] + 8 * (4.0 / shipped["error_pause_s"] + 1)
    )
    assert counts["on"] <= bound, counts
    assert counts["off"] > 3 * counts["on"], counts
