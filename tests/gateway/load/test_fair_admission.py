"""Fair admission in the gateway (service/policy/, service/admission.py):
the Triton ensemble's work is charged to its members, a client's slots are capped, and on
a real gateway a client holding 16 requests in flight leaves another its answers."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest

from service.errors import Overloaded
from service.gateway import Gateway
from service.model_config import ModelInfo
from service.model_inputs import Preprocessing
from service.policy import Lease
from service.settings import Settings

from ...helpers import TritonEndpoint
from ..helpers import MODEL, photo, running_gateway


def ensemble_gateway() -> Gateway:
    gateway = Gateway(Settings())
    gateway.backend.models["inception_ensemble"] = ModelInfo(
        name="inception_ensemble",
        preprocessing=Preprocessing(),
        provenance="random-init",
        members=("inception_v4", "inception_resnet_v2"),
        member_weights=(0.5, 0.5),
    )
    return gateway


def test_the_ensembles_work_is_charged_to_its_members() -> None:
    gateway = ensemble_gateway()
    assert gateway.policy.charged(["inception_ensemble"]) == [
        "inception_ensemble",
        "inception_v4",
        "inception_resnet_v2",
    ]
    admission = gateway.policy.admission

    async def admitted() -> Lease:
        return await gateway.policy.reserve("a", images=10, models=["inception_ensemble"])

    with asyncio.run(admitted()):
        assert admission.load("inception_v4").in_flight == 10
        # A victim on a member sees the ensemble's load: its request overshoots nothing
        # but its share.
        assert admission.load("inception_v4").share("victim") == 4
    assert admission.load("inception_v4").in_flight == 0


def test_a_clients_slots_are_capped() -> None:
    gateway = Gateway(Settings(max_concurrency_per_client=2))

    async def scenario() -> None:
        policy = gateway.policy
        async with await policy.reserve("a", requests=1), await policy.reserve("a", requests=1):
            with pytest.raises(Overloaded, match="2 requests in flight"):
                async with await policy.reserve("a", requests=1):
                    pass
            async with await policy.reserve("b", requests=1):
                assert policy.ledger.holders("requests") == {"a": 2, "b": 1}
        assert not policy.ledger.holders("requests")

    asyncio.run(scenario())


def test_one_clients_large_uploads_do_not_keep_another_out_of_the_buffer() -> None:
    """Slow chunked uploads are charged the largest body: two of one client fill the
    buffer budget; that client's third is shed, another client's small body gets in."""
    gateway = Gateway(Settings(buffer_budget_bytes=64 * 2**20, memory_budget_bytes=512 * 2**20))

    async def scenario() -> None:
        policy = gateway.policy
        async with (
            await policy.reserve("uploader", body_bytes=32 * 2**20),
            await policy.reserve("uploader", body_bytes=32 * 2**20),
        ):
            with pytest.raises(Overloaded):
                async with await policy.reserve("uploader", body_bytes=32 * 2**20):
                    pass
            async with await policy.reserve("victim", body_bytes=100_000):
                assert policy.ledger.held("victim", "body_bytes") == 100_000
        assert not policy.ledger.holders("body_bytes") and policy.body_bytes == 0

    asyncio.run(scenario())


def bound_client(url: str, source: str) -> httpx.Client:
    """A client whose connections come from ``source`` (any 127/8 address is loopback)."""
    return httpx.Client(base_url=url, timeout=60, transport=httpx.HTTPTransport(local_address=source))


@pytest.mark.integration
def test_a_greedy_client_leaves_another_its_answers(gateway_triton: TritonEndpoint, tmp_path: Path) -> None:
    """16 requests kept in flight from 127.0.0.2 (the review: the victim got 0.8 % of its
    answers); a victim sending one at a time from 127.0.0.1 gets at least 90 % 200."""
    image = photo("chelsea.png").read_bytes()
    env = {"GATEWAY_MODELS": MODEL, "GATEWAY_DEFAULT_MODEL": MODEL}
    with running_gateway(gateway_triton.grpc_url, tmp_path / "gateway.log", env=env) as gateway:
        stop = threading.Event()

        def greedy() -> None:
            with bound_client(gateway.url, "127.0.0.2") as client:
                while not stop.is_set():
                    client.post("/v1/classify", content=image, headers={"Content-Type": "image/png"})

        attackers = [threading.Thread(target=greedy) for _ in range(16)]
        for thread in attackers:
            thread.start()
        try:
            time.sleep(2)  # the attack is at full strength
            statuses = []
            with bound_client(gateway.url, "127.0.0.1") as victim:
                for _ in range(12):
                    answer = victim.post("/v1/classify", content=image, headers={"Content-Type": "image/png"})
                    statuses.append(answer.status_code)
                    time.sleep(0.3)
        finally:
            stop.set()
            for thread in attackers:
                thread.join()
    assert statuses.count(200) >= 0.9 * len(statuses), statuses


def test_a_client_is_its_key_or_else_its_address() -> None:
    """Fair shares are per API key when keys are on (hashed: the key is never kept), else
    per address, which uvicorn takes from X-Forwarded-For when the peer is trusted."""
    from starlette.requests import Request

    def client_id(request: Request, gateway: Gateway) -> str:
        return gateway.policy.client_of(request.headers, request.client.host if request.client else None)

    def request(headers: dict[str, str], host: str = "10.0.0.7") -> Request:
        raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        return Request({"type": "http", "headers": raw, "client": (host, 5000)})

    open_gateway = Gateway(Settings())
    assert client_id(request({}), open_gateway) == "addr:10.0.0.7"
    keyed = Gateway(Settings(api_keys=["k1", "k2"]))
    one = client_id(request({"Authorization": "Bearer k1"}), keyed)
    assert one == client_id(request({"X-API-Key": "k1"}, host="10.9.9.9"), keyed)  # the key, not the address
    assert one != client_id(request({"X-API-Key": "k2"}), keyed)
    assert "k1" not in one
