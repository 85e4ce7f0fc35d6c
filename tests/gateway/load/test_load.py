"""64 concurrent requests through the gateway, and Triton's statistics proving it batched.

The gateway's latency objective, round-trip limit, decode queue and per-client cap are generous here (a
batch client's, not an interactive one's): the gateway admits the whole burst of one
client, which is what this test is about; test_overload.py tests what is refused past the
objective, test_fair_admission.py and tests/gateway/images/test_decode_bounds.py the other bounds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
import tritonclient.grpc as grpcclient

from ...helpers import TritonEndpoint
from ..helpers import GatewayProcess, photo, running_gateway

pytestmark = pytest.mark.integration

MODEL = "inception_resnet_v1"


def _counts(triton: grpcclient.InferenceServerClient) -> tuple[int, int]:
    stats = triton.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


@pytest.fixture(scope="module")
def gateway(
    gateway_triton: TritonEndpoint, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    log = tmp_path_factory.mktemp("load") / "gateway.log"
    env = {
        "GATEWAY_LATENCY_TARGET_S": "300",
        "GATEWAY_ADMISSION_INITIAL_LIMIT": "64",
        "GATEWAY_DECODE_QUEUE": "64",
        "GATEWAY_MAX_CONCURRENCY_PER_CLIENT": "64",
        # 64 images at the rate Triton reports after the session's earlier work (2.1 images/s
        # in CI) take longer than the default 30 s round trip: the deadline check refused the
        # last of the burst at once, as it should for a client that cannot wait that long.
        "GATEWAY_TRITON_TIMEOUT_S": "120",
    }
    with running_gateway(gateway_triton.grpc_url, log, env=env) as process:
        yield process


def test_64_concurrent_requests_succeed_and_are_batched(
    gateway: GatewayProcess, gateway_triton: TritonEndpoint
) -> None:
    triton = grpcclient.InferenceServerClient(gateway_triton.grpc_url)
    before = _counts(triton)
    data = photo("chelsea.png").read_bytes()

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=300, limits=limits) as http:
            return await asyncio.gather(
                *(
                    http.post(
                        "/v1/classify",
                        content=data,
                        params={"model": MODEL},
                        headers={"Content-Type": "image/png", "X-Request-ID": f"load-{i}"},
                    )
                    for i in range(64)
                )
            )

    answers = asyncio.run(run())
    assert [a.status_code for a in answers] == [200] * 64, [a.text for a in answers if a.status_code != 200][
        :3
    ]
    assert {a.headers["X-Request-ID"] for a in answers} == {f"load-{i}" for i in range(64)}
    top = {a.json()["predictions"][0]["class_id"] for a in answers}
    assert len(top) == 1  # one image, one answer, whatever batch it rode in
    # Triton records statistics after it has sent the responses: poll briefly.
    deadline = time.monotonic() + 30
    after = _counts(triton)
    while after[0] - before[0] < 64 and time.monotonic() < deadline:
        time.sleep(0.2)
        after = _counts(triton)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == 64
    print(f"64 inferences in {executions} executions")
    assert executions < 64 / 2, f"{executions} executions for 64 inferences: Triton did not batch"
