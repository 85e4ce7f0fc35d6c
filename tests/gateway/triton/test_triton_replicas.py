"""Triton replicas get traffic: two real tritonservers behind one gRPC target, and a real
gateway whose requests reach both.

In Kubernetes the gateway names a headless Service (`dns:///triton-headless:8001`), which
resolves to one address per Triton pod. Here the nearest faithful equivalent is a target
that lists both servers' addresses (`ipv4:127.0.0.1:P1,127.0.0.1:P2`): gRPC's resolver hands
the same address list to the same load-balancing policy. Each Triton's own counter
(`nv_inference_request_success` on its metrics port) says what it served.

The control case proves the test can fail: with `GATEWAY_TRITON_LB_POLICY=pick_first`, gRPC's
default, one server gets every request and the other none, which is what a gateway with one
long-lived channel did to every Triton pod added by the autoscaler.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from embedded.tritonserver import TritonServer

from ...helpers import ROOT
from ..helpers import MODEL, GatewayProcess, classify, photo

pytestmark = pytest.mark.integration

REQUESTS = 8


@pytest.fixture(scope="module")
def two_tritons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[TritonServer]]:
    """Two tritonservers that load only the cheapest model (explicit model control)."""
    source = ROOT / "model_repository"
    if not (source / MODEL / "configs" / "cpu.pbtxt").is_file():
        pytest.skip(f"no model repository at {source}: run `make repository`")
    work = tmp_path_factory.mktemp("replicas")
    repository = work / "repository"
    repository.mkdir()
    (repository / MODEL).symlink_to((source / MODEL).resolve(), target_is_directory=True)
    args = ["--model-control-mode=explicit", f"--load-model={MODEL}"]
    servers = [TritonServer(repository, log_path=work / f"triton-{i}.log", extra_args=args) for i in range(2)]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready(timeout=300)
        yield servers
    finally:
        for server in servers:
            server.stop()


def served(server: TritonServer) -> int:
    """Inferences this server counted for the model, from its own metrics endpoint."""
    text = httpx.get(f"http://{server.metrics_url}/metrics", timeout=10).text
    match = re.search(rf'^nv_inference_request_success\{{[^}}]*model="{MODEL}"[^}}]*\}} (\S+)$', text, re.M)
    return int(float(match.group(1))) if match else 0


def spread(servers: list[TritonServer], policy: str, log: Path) -> tuple[list[int], str]:
    """Sends REQUESTS classify requests through one gateway worker; returns what each
    server served meanwhile, and the gateway's metrics."""
    target = "ipv4:" + ",".join(s.grpc_url for s in servers)
    env = {
        "GATEWAY_MODELS": MODEL,
        "GATEWAY_DEFAULT_MODEL": MODEL,
        "GATEWAY_TRITON_LB_POLICY": policy,
    }
    before = [served(s) for s in servers]
    data = photo("chelsea.png").read_bytes()
    gateway = GatewayProcess(target, log, env=env)
    try:
        gateway.start().wait("/readyz", timeout=120)
        with gateway.client() as client:
            for _ in range(REQUESTS):
                answer = classify(client, data, "image/png")
                assert answer.status_code == 200, answer.text
            exposition = client.get("/metrics").text
    finally:
        gateway.stop()
    # The counters are the servers' own; give them a moment to be exported.
    deadline = time.monotonic() + 10
    while True:
        counts = [served(s) - b for s, b in zip(servers, before, strict=True)]
        if sum(counts) >= REQUESTS or time.monotonic() > deadline:
            return counts, exposition
        time.sleep(0.5)


def test_round_robin_reaches_every_replica(two_tritons: list[TritonServer], tmp_path: Path) -> None:
    counts, exposition = spread(two_tritons, "round_robin", tmp_path / "gateway.log")
    print(f"round_robin: {REQUESTS} requests -> per replica {counts}")
    assert sum(counts) == REQUESTS
    # Round robin over two ready subchannels alternates: an even split.
    assert counts == [REQUESTS // 2, REQUESTS // 2], counts
    # The provenance the gateway read is published for the alerts (both replicas serve
    # the same export here, so one series).
    published = re.findall(
        rf'^inception_model_weights_info\{{([^}}]*model="{MODEL}"[^}}]*)\}} 1\.0$', exposition, re.M
    )
    assert len(published) == 1, exposition
    assert 'random_init="' in published[0] and 'weights="' in published[0]


def test_pick_first_leaves_a_replica_idle(two_tritons: list[TritonServer], tmp_path: Path) -> None:
    """The old behaviour, kept as a control: one channel, one server, the other idle."""
    counts, _ = spread(two_tritons, "pick_first", tmp_path / "gateway.log")
    print(f"pick_first: {REQUESTS} requests -> per replica {counts}")
    assert sum(counts) == REQUESTS
    assert sorted(counts) == [0, REQUESTS], counts


def test_ended_connections_cost_no_request(one_model_repository: Path, tmp_path: Path) -> None:
    """Triton ends each connection at its maximum age (--grpc-max-connection-age, as
    deployed), which is when the gateway resolves its target again and finds new pods.
    Requests that cross those ends all succeed: in-flight calls finish within the grace,
    and the next call reconnects."""
    age_ms = 500
    args = [f"--grpc-max-connection-age={age_ms}", "--grpc-max-connection-age-grace=5000"]
    server = TritonServer(one_model_repository, log_path=tmp_path / "triton.log", extra_args=args)
    env = {"GATEWAY_MODELS": MODEL, "GATEWAY_DEFAULT_MODEL": MODEL}
    gateway = GatewayProcess(server.grpc_url, tmp_path / "gateway.log", env=env)
    data = photo("chelsea.png").read_bytes()
    try:
        server.start().wait_ready(timeout=300)
        gateway.start().wait("/readyz", timeout=120)
        before = served(server)  # the warm-up counts too
        with gateway.client() as client:
            started = time.monotonic()
            statuses = []
            while time.monotonic() - started < 8 * age_ms / 1000:
                statuses.append(classify(client, data, "image/png").status_code)
                time.sleep(0.1)
        assert len(statuses) >= 4 and set(statuses) == {200}, statuses
        assert served(server) - before == len(statuses)
    finally:
        gateway.stop()
        server.stop()
