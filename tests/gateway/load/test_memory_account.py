"""One memory account per worker (service/memory.py): reservations before allocation,
waiting and shedding past the budget, and, on a real two-worker gateway in a 1 GiB
memory-limited cgroup (the Kubernetes pod's size), no OOM kill under concurrent bombs and
idle memory given back afterwards."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.errors import ImageTooLarge, Overloaded
from service.gateway import Gateway
from service.imaging import decode
from service.memory import MemoryAccount
from service.pixels import BYTES_PER_PIXEL_BUDGET
from service.settings import Settings
from service.worker_share import worker_memory_bytes

from ...helpers import TritonEndpoint
from ..helpers import MODEL, UNREACHABLE, GatewayProcess, MemoryCgroup, encode, palette_bomb, photo

MIB = 1024 * 1024


def test_the_account_sheds_past_its_budget_and_refuses_what_never_fits() -> None:
    account = MemoryAccount(100)
    account.reserve_now(60)
    with pytest.raises(Overloaded):
        account.reserve_now(50)
    with pytest.raises(ImageTooLarge):
        account.reserve_now(101)
    account.release(60)
    with account.held(100):
        assert account.reserved == 100
    assert account.reserved == 0 and account.peak == 100


def test_a_decode_waits_briefly_for_memory_given_back() -> None:
    account = MemoryAccount(100)
    account.reserve_now(80)
    threading.Timer(0.1, account.release, args=(80,)).start()
    started = time.monotonic()
    account.reserve_waiting(50, wait_s=2.0)
    assert 0.05 < time.monotonic() - started < 1.0
    with pytest.raises(Overloaded):
        account.reserve_waiting(60, wait_s=0.05)


def test_decoded_pixels_are_reserved_from_the_header_before_load() -> None:
    """The cost is known before a pixel is decoded, at the per-request budget's rate, after
    any draft reduction; a refusal costs no decode."""
    costs: list[int] = []

    def refuse(cost: int) -> None:
        costs.append(cost)
        raise Overloaded("no memory")

    bomb = palette_bomb(7071, 7071)
    started = time.process_time()
    with pytest.raises(Overloaded):
        decode(bomb, max_pixels=50_000_000, reserve=refuse)
    assert time.process_time() - started < 0.05  # nothing was inflated
    assert costs == [BYTES_PER_PIXEL_BUDGET * 7071 * 7071]
    jpeg = encode(Image.new("RGB", (4000, 3000)), "JPEG")
    decode(jpeg, max_pixels=50_000_000, draft_short_side=700, reserve=costs.append)
    assert costs[-1] == BYTES_PER_PIXEL_BUDGET * 1000 * 750  # drafted to a quarter


def test_a_large_photos_crops_fit_beside_its_own_body() -> None:
    """The smaller finding: a crops=144 photo over ~8.7 MiB could never fit a 128 MiB buffer
    budget, because its crops were refused for its own body's reservation."""
    gateway = Gateway(Settings(buffer_budget_bytes=128 * MIB, memory_budget_bytes=512 * MIB))
    body = 2 * 12 * MIB

    async def scenario() -> None:
        policy = gateway.policy
        async with await policy.reserve("", body_bytes=body) as lease:
            await lease.reserve(body_bytes=116 * MIB)  # beside its own body
            assert policy.memory.reserved == body + 116 * MIB
        async with await policy.reserve("", body_bytes=body):
            with pytest.raises(Overloaded):  # another request's body still counts
                async with await policy.reserve("", body_bytes=116 * MIB):
                    pass

    asyncio.run(scenario())


def test_the_budget_follows_the_workers_share_of_the_cgroup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", "2")
    settings = Settings()
    assert settings.memory_budget_bytes <= 0.85 * worker_memory_bytes()


CGROUP_UNAVAILABLE = MemoryCgroup.available()


def worker_pids(parent: int) -> list[int]:
    """uvicorn's workers: its spawned children, not multiprocessing's resource tracker."""
    children = [int(pid) for pid in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
    return [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.integration
@pytest.mark.skipif(CGROUP_UNAVAILABLE is not None, reason=str(CGROUP_UNAVAILABLE))
def test_no_worker_is_oom_killed_in_a_1_gib_pod_under_concurrent_bombs(
    gateway_triton: TritonEndpoint, tmp_path: Path
) -> None:
    """Two workers in 1 GiB, each budgeting half: palette bombs with transparency (16 MP,
    which fit two at a time, and 50 MP, which never fit a worker's half), 21 MiB JSON bodies
    and 16 MiB raw bodies, 24 at once. Every answer is a 200 or a clear refusal, the kernel
    kills nothing, and idle memory comes back near its start."""
    cgroup = MemoryCgroup(f"gateway-{os.getpid()}", 1 << 30)
    gateway = GatewayProcess(
        gateway_triton.grpc_url,
        tmp_path / "gateway.log",
        workers=2,
        env={"GATEWAY_MODELS": MODEL, "GATEWAY_DEFAULT_MODEL": MODEL},
        multiproc_dir=tmp_path / "metrics",
    )
    gateway.command = cgroup.wrap(gateway.command)
    bombs = {
        "palette 16 MP": (palette_bomb(4000, 4000), "image/png"),
        "palette 50 MP": (palette_bomb(7071, 7071), "image/png"),
        "json 21 MiB": (
            json.dumps({"image": base64.b64encode(os.urandom(16 * MIB - 1024)).decode()}).encode(),
            "application/json",
        ),
        "raw 16 MiB": (os.urandom(16 * MIB - 1024), "image/jpeg"),
    }
    try:
        gateway.start().wait("/readyz")
        workers = worker_pids(gateway.pid)
        assert len(workers) == 2
        with httpx.Client(base_url=gateway.url, timeout=120) as client:
            small = photo("chelsea.png").read_bytes()
            for _ in range(4):  # both workers warm
                client.post("/v1/classify", content=small, headers={"Content-Type": "image/png"})
        start_rss = {pid: rss_mib(pid) for pid in workers}

        def send(kind: str) -> tuple[str, int]:
            data, media = bombs[kind]
            with httpx.Client(base_url=gateway.url, timeout=120) as http:
                return kind, http.post(
                    "/v1/classify", content=data, headers={"Content-Type": media}
                ).status_code

        kinds = ["palette 16 MP"] * 10 + ["palette 50 MP"] * 6 + ["json 21 MiB"] * 4 + ["raw 16 MiB"] * 4
        with ThreadPoolExecutor(len(kinds)) as pool:
            answers = list(pool.map(send, kinds))
        time.sleep(2)
        idle_rss = {pid: rss_mib(pid) for pid in workers}
        assert worker_pids(gateway.pid) == workers, "a worker died"
        with httpx.Client(base_url=gateway.url, timeout=120) as client:
            assert client.get("/healthz").status_code == 200
    finally:
        gateway.stop()
        oom_kills, peak = cgroup.oom_kills(), cgroup.peak_bytes()
        for _ in range(50):
            if not (cgroup.path / "cgroup.procs").read_text().strip():
                break
            time.sleep(0.1)
        cgroup.remove()
    by_kind = Counter(answers)
    assert oom_kills == 0, (oom_kills, by_kind)
    assert peak < 1 << 30
    print(f"peak {peak / MIB:.0f} MiB, RSS at start {start_rss}, idle after {idle_rss}, {dict(by_kind)}")
    # 429: the memory account; 503: admission or the decode queue, with Retry-After.
    allowed = {
        "palette 16 MP": {200, 429, 503},
        "palette 50 MP": {413, 429, 503},  # never fits half of 1 GiB: 413 once it gets that far
        "json 21 MiB": {400, 429, 503},  # random bytes, not an image: 400 once parsed
        "raw 16 MiB": {400, 429, 503},
    }
    assert all(status in allowed[kind] for kind, status in answers), by_kind
    assert by_kind["palette 16 MP", 200] >= 2, by_kind  # concurrency is budgeted, not refused
    for pid in workers:
        assert idle_rss[pid] < start_rss[pid] + 150, (start_rss, idle_rss)


def test_each_worker_of_make_serve_budgets_its_share() -> None:
    """`make serve WORKERS=2` (embedded/serve.py, through embedded/gateway.py) tells the
    workers how many they are, as the image's entrypoint does, so each budgets half."""
    from embedded.gateway import Gateway as Launcher

    assert Launcher(UNREACHABLE, workers=2).environment["WEB_CONCURRENCY"] == "2"
    assert (
        Launcher(UNREACHABLE, workers=2, env={"WEB_CONCURRENCY": "3"}).environment["WEB_CONCURRENCY"] == "3"
    )
