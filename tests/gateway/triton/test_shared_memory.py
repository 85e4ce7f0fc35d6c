"""Inputs through Triton's system shared memory (service/input_regions.py), against the real
tritonserver: a same-host gateway writes its tensors into registered regions by default, the
answers are the payload's to the bit, and regions are cleaned up however they end: a stopped
worker unregisters and unlinks its own, a Triton that forgot them gets them again, the
registrations of a killed worker's objects are dropped by the next, and a Triton that cannot
map them turns them off."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import time
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from embedded.gateway import serving
from inception.contract import INPUT_NAME
from service.input_regions import PREFIX, SHM_DIR, InputRegions, is_loopback, is_lost_region, region_bytes

from ...helpers import TritonEndpoint
from ..helpers import GRACE_HOPPER, MODEL, GatewayProcess, classify, photo, running_gateway, vector

NO_STORE = {"Cache-Control": "no-store"}  # every request reaches Triton


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("127.0.0.1:8001", True),
        ("localhost:8001", True),
        ("127.0.0.2:8001", True),
        ("[::1]:8001", True),
        ("dns:///localhost:8001", True),
        ("triton:8001", False),
        ("dns:///triton.default.svc:8001", False),
        ("10.0.0.7:8001", False),
        ("[2001:db8::1]:8001", False),
    ],
)
def test_auto_means_a_loopback_address(url: str, loopback: bool) -> None:
    assert is_loopback(url) is loopback
    assert InputRegions("auto", url, 1 << 20).enabled is (loopback and SHM_DIR.is_dir())
    assert InputRegions("off", url, 1 << 20).enabled is False
    assert InputRegions("on", url, 1 << 20).enabled is True


def test_regions_come_in_powers_of_two_from_half_a_mebibyte() -> None:
    one_image = 299 * 299 * 3
    assert region_bytes(1) == region_bytes(one_image) == 512 * 1024
    assert region_bytes(3 * one_image) == 1 << 20
    assert region_bytes(32 * one_image) == 16 << 20
    assert region_bytes(512 * 1024 + 1) == 1 << 20


@pytest.fixture(scope="module")
def endpoint(gateway_triton: TritonEndpoint) -> TritonEndpoint:
    if not is_loopback(gateway_triton.grpc_url):
        pytest.skip("Triton is not on this host: shared memory is off by design")
    return gateway_triton


@pytest.fixture(scope="module")
def triton_client(endpoint: TritonEndpoint) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(endpoint.grpc_url)
    yield client
    client.close()


def regions_of(client: grpcclient.InferenceServerClient, pid: int | None = None) -> dict[str, str]:
    """The gateway's regions Triton has registered (name -> key), of one worker or all."""
    status = client.get_system_shared_memory_status(as_json=True).get("regions", {})
    mine = f"{PREFIX}{pid}-" if pid is not None else PREFIX
    return {name: r["key"] for name, r in status.items() if name.startswith(mine)}


def owners(client: grpcclient.InferenceServerClient) -> set[int]:
    """The pids of the workers whose regions Triton has registered (names carry them)."""
    return {int(name[len(PREFIX) :].split("-", 1)[0]) for name in regions_of(client)}


def transports(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(
            r'^inception_gateway_triton_inputs_total\{transport="(\w+)"\} (\S+)$', text, re.M
        )
    }


def test_a_same_host_gateway_sends_its_inputs_through_shared_memory_bit_for_bit(
    endpoint: TritonEndpoint, triton_client: grpcclient.InferenceServerClient, tmp_path: Path
) -> None:
    data = GRACE_HOPPER.read_bytes()
    env = {"GATEWAY_MODELS": MODEL, "GATEWAY_DEFAULT_MODEL": MODEL}
    others = owners(triton_client)  # the session's shared gateway, say
    with (
        running_gateway(endpoint.grpc_url, tmp_path / "shm.log", env=env) as shm,
        running_gateway(
            endpoint.grpc_url, tmp_path / "payload.log", env={**env, "GATEWAY_TRITON_SHARED_MEMORY": "off"}
        ) as payload,
        shm.client(headers=NO_STORE) as through_shm,
        payload.client(headers=NO_STORE) as through_payload,
    ):
        answers = [classify(c, data, top_k=1000) for c in (through_shm, through_payload)]
        assert vector(answers[0]) == vector(answers[1])
        three = [data, photo("chelsea.png").read_bytes(), photo("coffee.png").read_bytes()]
        batch = through_shm.post(
            "/v1/classify",
            files=[("image", (f"{i}", d, "application/octet-stream")) for i, d in enumerate(three)],
        )
        assert batch.status_code == 200, batch.text
        assert [r["error"] for r in batch.json()["results"]] == [None] * 3
        assert transports(through_shm).get("shared_memory", 0) >= 2
        assert transports(through_shm).get("grpc", 0) == 0
        assert transports(through_payload).get("grpc", 0) >= 1
        assert transports(through_payload).get("shared_memory", 0) == 0
        (worker,) = owners(triton_client) - others
        registered = regions_of(triton_client, worker)
        assert len(registered) == 2  # one region per size class: a single image, a batch of 3
        assert all((SHM_DIR / key.lstrip("/")).exists() for key in registered.values())
    # A stopped worker unregisters and unlinks what it made.
    assert regions_of(triton_client, worker) == {}
    assert not list(SHM_DIR.glob(f"{PREFIX}{worker}-*"))


def test_regions_triton_forgot_are_registered_again_and_the_request_is_answered(
    endpoint: TritonEndpoint, triton_client: grpcclient.InferenceServerClient, tmp_path: Path
) -> None:
    """What a Triton restart does to the gateway's regions, without the restart: each
    registration is dropped behind the worker's back. The next request's region is unknown
    (NOT_FOUND); it is answered all the same, as payload, and the one after goes through a
    region registered again."""
    data = GRACE_HOPPER.read_bytes()
    env = {"GATEWAY_MODELS": MODEL, "GATEWAY_DEFAULT_MODEL": MODEL}
    others = owners(triton_client)
    with (
        running_gateway(endpoint.grpc_url, tmp_path / "gateway.log", env=env) as gateway,
        gateway.client(headers=NO_STORE) as client,
    ):
        first = classify(client, data, top_k=1000)
        (worker,) = owners(triton_client) - others
        for name in regions_of(triton_client, worker):
            triton_client.unregister_system_shared_memory(name)
        assert regions_of(triton_client, worker) == {}
        again = classify(client, data, top_k=1000)
        assert vector(again) == vector(first)
        assert transports(client) == {"shared_memory": 2, "grpc": 1}  # the lost send, then payload
        third = classify(client, data, top_k=1000)
        assert vector(third) == vector(first)
        assert len(regions_of(triton_client, worker)) == 1
        assert transports(client) == {"shared_memory": 3, "grpc": 1}


def test_registrations_of_objects_gone_from_dev_shm_are_dropped_by_the_next_worker(
    endpoint: TritonEndpoint, triton_client: grpcclient.InferenceServerClient, tmp_path: Path
) -> None:
    """A killed worker's objects are unlinked by its resource tracker, but Triton still
    maps them: a new worker's first registration sweeps such registrations away."""
    name = f"{PREFIX}{2**22 + 17}-{secrets.token_hex(4)}-0"
    left = shared_memory.SharedMemory(name=name, create=True, size=1 << 19)
    try:
        triton_client.register_system_shared_memory(name, "/" + left.name, 1 << 19)
    finally:
        left.close()
        left.unlink()  # what the dead worker's resource tracker does
    assert name in regions_of(triton_client)
    env = {"GATEWAY_MODELS": MODEL, "GATEWAY_DEFAULT_MODEL": MODEL}
    with (
        running_gateway(endpoint.grpc_url, tmp_path / "gateway.log", env=env) as gateway,
        gateway.client(headers=NO_STORE) as client,
    ):
        assert classify(client, GRACE_HOPPER.read_bytes()).status_code == 200
        assert name not in regions_of(triton_client)


def test_what_a_killed_worker_leaves_is_dropped_by_its_successor(
    endpoint: TritonEndpoint, triton_client: grpcclient.InferenceServerClient, tmp_path: Path
) -> None:
    """SIGKILL runs none of the worker's clean-up, and the resource tracker it shares with
    uvicorn's supervisor lives on: the worker the supervisor starts in its place drops the
    dead one's objects and Triton's registrations of them, and serves through its own."""
    env = {"GATEWAY_MODELS": MODEL, "GATEWAY_DEFAULT_MODEL": MODEL}
    gateway = GatewayProcess(
        endpoint.grpc_url, tmp_path / "gateway.log", env=env, workers=2, multiproc_dir=tmp_path / "metrics"
    )
    data = GRACE_HOPPER.read_bytes()
    # A connection a request: the kernel spreads them over both workers.
    with serving(gateway), gateway.client(headers={**NO_STORE, "Connection": "close"}) as client:
        before = owners(triton_client)
        deadline = time.monotonic() + 60
        while len(owners(triton_client) - before) < 2 and time.monotonic() < deadline:
            assert classify(client, data).status_code == 200
        workers = owners(triton_client) - before
        assert len(workers) == 2, "both workers serve through regions"
        dead = min(workers)
        assert list(SHM_DIR.glob(f"{PREFIX}{dead}-*"))
        os.kill(dead, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not owners(triton_client) - before - workers and time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):  # a request the dead worker held
                assert classify(client, data).status_code in {200, 503}
        assert owners(triton_client) - before - workers, "the new worker serves through regions"
        assert dead not in owners(triton_client)
        assert not list(SHM_DIR.glob(f"{PREFIX}{dead}-*"))
    assert "leaked shared_memory" not in gateway.log()


def test_a_triton_that_cannot_map_the_regions_turns_them_off(endpoint: TritonEndpoint) -> None:
    """As from a Triton in another container: the region's object is not where Triton looks."""

    async def run() -> tuple[bool, bool]:
        client = grpcaio.InferenceServerClient(endpoint.grpc_url)
        regions = InputRegions("on", endpoint.grpc_url, 8 << 20)
        try:
            region = regions._create(region_bytes(1))
            region.memory.unlink()  # Triton opens the key: gone
            named = {INPUT_NAME: np.zeros((1, 299, 299, 3), np.uint8)}
            regions.give_back(region)
            tensors, lease = await regions.inputs(client, named)
            return lease is None and len(tensors) == 1, regions.enabled
        finally:
            await regions.close(client)  # the object is gone already: closed, nothing unlinked
            await client.close()

    sent_as_payload, enabled = asyncio.run(run())
    assert sent_as_payload and not enabled


def test_lost_regions_are_told_from_other_not_found_errors() -> None:
    assert is_lost_region(InferenceServerException("Unable to find shared memory region: 'x'"))
    assert not is_lost_region(InferenceServerException("Request for unknown model: 'x' is not found"))
