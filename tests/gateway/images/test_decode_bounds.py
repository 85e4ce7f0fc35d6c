"""CPU-bounded decoding: JPEG scan bombs are refused from their bytes, and the decode pool's
queue is bounded and deadline-aware (service/format_checks.py, service/gateway.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from service import deadlines
from service import gateway as gateway_module
from service.errors import DeadlineExceeded, InvalidImage, OverCapacity, Overloaded
from service.format_checks import MAX_JPEG_SCANS, jpeg_scans
from service.gateway import Gateway
from service.imaging import Prepared, decode
from service.model_inputs import Preprocessing
from service.settings import Settings

from ..helpers import encode, photo, scan_bomb


def test_real_encoders_stay_under_the_scan_limit() -> None:
    image = Image.open(photo("rocket.jpg"))
    written = {
        "baseline": encode(image, "JPEG"),
        "progressive": encode(image, "JPEG", progressive=True),
        "optimised progressive": encode(image, "JPEG", progressive=True, optimize=True),
        "grey progressive": encode(image.convert("L"), "JPEG", progressive=True),
        "camera photo": photo("grace_hopper.jpg").read_bytes(),
    }
    counts = {name: jpeg_scans(data, MAX_JPEG_SCANS) for name, data in written.items()}
    assert counts == {
        "baseline": 1,
        "progressive": 10,
        "optimised progressive": 10,
        "grey progressive": 6,
        "camera photo": 1,
    }


def test_a_scan_bomb_is_refused_before_decoding() -> None:
    bomb = scan_bomb(2000, 500)
    assert len(bomb) < 64 * 1024
    assert jpeg_scans(bomb, 10**6) == 510
    started = time.process_time()
    with pytest.raises(InvalidImage, match="scans"):
        decode(bomb, max_pixels=50_000_000)
    assert time.process_time() - started < 0.05
    # At the limit it decodes: the bound refuses only what no encoder writes.
    image, *_ = decode(scan_bomb(64, MAX_JPEG_SCANS - 10), max_pixels=50_000_000)
    assert image.size == (64, 64)


def test_counting_scans_costs_milliseconds_on_the_largest_body() -> None:
    noise = np.random.default_rng(0).integers(0, 255, (2000, 4000, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG", progressive=True, quality=95)
    assert len(data) > 7 << 20
    started = time.perf_counter()
    assert jpeg_scans(data, MAX_JPEG_SCANS) == 10
    assert time.perf_counter() - started < 0.05


class SlowDecodes:
    """Stands in for service.imaging.prepare: takes ``seconds`` and records each call."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, *args: object, **kwargs: object) -> Prepared:
        with self.lock:
            self.calls += 1
        time.sleep(self.seconds)
        return Prepared(batches={}, size=(1, 1))


@pytest.fixture
def slow_gateway(monkeypatch: pytest.MonkeyPatch) -> tuple[Gateway, SlowDecodes]:
    slow = SlowDecodes(0.3)
    monkeypatch.setattr(gateway_module, "prepare", slow)
    gateway = Gateway(Settings(decode_threads=1, decode_queue=2))
    gateway.pool = ThreadPoolExecutor(max_workers=1)
    return gateway, slow


async def _decode(gateway: Gateway, timeout_s: float | None = None) -> Prepared:
    deadlines.start(timeout_s, 30.0)
    return await gateway.prepare(b"x", [Preprocessing()])


def test_the_decode_queue_is_bounded(slow_gateway: tuple[Gateway, SlowDecodes]) -> None:
    gateway, slow = slow_gateway

    async def scenario() -> list[object]:
        tasks = [asyncio.create_task(_decode(gateway)) for _ in range(3)]
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(scenario())
    assert [type(r) for r in results] == [Prepared, Prepared, Overloaded]
    assert slow.calls == 2


def test_a_decode_is_never_queued_past_its_deadline(slow_gateway: tuple[Gateway, SlowDecodes]) -> None:
    """Once a decode is known to take 0.3 s, a request with 0.4 s left behind another one is
    refused at once (503 over_capacity, Retry-After), without waiting or decoding."""
    gateway, slow = slow_gateway

    async def scenario() -> tuple[float, BaseException | None]:
        await _decode(gateway)  # measures the decode time
        ahead = asyncio.create_task(_decode(gateway))
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        try:
            await _decode(gateway, 0.4)
            refused = None
        except OverCapacity as exc:
            refused = exc
        took = time.perf_counter() - started
        await ahead
        return took, refused

    took, refused = asyncio.run(scenario())
    assert isinstance(refused, OverCapacity) and refused.retry_after_s is not None
    assert took < 0.05
    assert slow.calls == 2


def test_a_decode_whose_deadline_passed_in_the_queue_is_dropped(
    slow_gateway: tuple[Gateway, SlowDecodes],
) -> None:
    """Before any decode time is measured the estimate is nothing: a request queues, its
    deadline passes while the decode ahead of it runs, and its turn comes to nothing (504),
    with no decode started for it."""
    gateway, slow = slow_gateway

    async def scenario() -> list[object]:
        ahead = asyncio.create_task(_decode(gateway))
        await asyncio.sleep(0.01)
        late = asyncio.create_task(_decode(gateway, 0.1))
        return await asyncio.gather(ahead, late, return_exceptions=True)

    ahead, late = asyncio.run(scenario())
    assert isinstance(ahead, Prepared)
    assert isinstance(late, DeadlineExceeded)
    assert slow.calls == 1


def test_a_scan_bomb_gets_400_on_a_real_gateway_and_holds_no_one(client: httpx.Client) -> None:
    """Two scan bombs, then a normal request with a 5 s deadline: the bombs get 400 in
    milliseconds and the normal request its answer (the review's victim waited 54.9 s)."""
    bomb = scan_bomb(4000, 6000)
    with ThreadPoolExecutor(3) as pool:
        bombs = [
            pool.submit(client.post, "/v1/classify", content=bomb, headers={"Content-Type": "image/jpeg"})
            for _ in range(2)
        ]
        started = time.monotonic()
        normal = client.post(
            "/v1/classify",
            content=photo("rocket.jpg").read_bytes(),
            headers={"Content-Type": "image/jpeg", "X-Request-Timeout": "5"},
            params={"model": "inception_resnet_v1"},
        )
        elapsed = time.monotonic() - started
        answers = [f.result() for f in bombs]
    assert [a.status_code for a in answers] == [400, 400]
    assert all("scans" in a.json()["error"]["message"] for a in answers)
    assert normal.status_code == 200, normal.text
    assert elapsed < 5
