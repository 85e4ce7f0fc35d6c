"""A worker that has measured nothing of a model yet takes Triton's own service rate, so that
its deadline checks work from its first request (issue 19, finding 9: a worker that saw
only requests timing out never measured a rate, and admitted every 10-crop request with a
0.4 s deadline to run for nothing)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from service.gateway import Gateway
from service.model_config import parse_model_config
from service.model_load import SAMPLE_COMPLETIONS, ModelLoad
from service.settings import Settings
from service.triton import TritonBackend

from ...helpers import TritonEndpoint
from ..helpers import UNREACHABLE, model_config_json

NETWORK = parse_model_config(model_config_json())
ENSEMBLE = parse_model_config(model_config_json(members="a,b,c", member_weights="0.5,0.25,0.25"))


class Rates:
    """A stand-in for Triton's statistics (the function under test is what the worker does
    with them)."""

    def __init__(self, rates: dict[str, float | None]) -> None:
        self.rates = rates
        self.asked: list[str] = []

    async def __call__(self, name: str) -> float | None:
        self.asked.append(name)
        return self.rates.get(name)


def gateway_knowing(rates: Rates) -> Gateway:
    gateway = Gateway(Settings(triton_grpc_url=UNREACHABLE))
    gateway.backend.models = {
        "net": replace(NETWORK, name="net"),
        "measured": replace(NETWORK, name="measured"),
        "silent": replace(NETWORK, name="silent"),
        "ens": replace(ENSEMBLE, name="ens"),
    }
    gateway.backend.service_rate = rates  # type: ignore[method-assign]
    measured = gateway.policy.admission.load("measured")
    measured.rate, measured.measured = 50.0, True
    return gateway


def test_an_unmeasured_network_takes_tritons_rate() -> None:
    rates = Rates({"net": 7.5, "measured": 1.0, "silent": None, "ens": 3.0})
    gateway = gateway_knowing(rates)
    asyncio.run(gateway.seed_rates())
    assert gateway.policy.admission.load("net").rate == 7.5
    assert gateway.policy.admission.load("measured").rate == 50.0  # its own measurement stands
    assert gateway.policy.admission.load("silent").rate is None  # Triton has computed nothing yet
    assert "ens" not in rates.asked  # an ensemble's rate is its members'
    assert gateway.policy.admission.load("ens").rate is None


def test_a_seeded_rate_refuses_what_cannot_meet_its_deadline() -> None:
    """Unmeasured, a 10-image request with 0.4 s left is admitted; seeded with 8 images a
    second, it is refused at once."""
    gateway = gateway_knowing(Rates({"net": 8.0}))
    assert gateway.policy.admission.refusal(["net"], 10, 0.4) is None
    asyncio.run(gateway.seed_rates())
    refusal = gateway.policy.admission.refusal(["net"], 10, 0.4)
    assert refusal is not None and refusal.reason == "deadline"


def test_tritons_statistics_give_images_per_compute_second(gateway_triton: TritonEndpoint) -> None:
    model = "inception_resnet_v1"
    with grpcclient.InferenceServerClient(gateway_triton.grpc_url) as triton:
        tensor = grpcclient.InferInput("image__0", [2, 299, 299, 3], "UINT8")
        tensor.set_data_from_numpy(np.zeros((2, 299, 299, 3), np.uint8))
        triton.infer(model, [tensor])
        stats = triton.get_inference_statistics(model, as_json=True)["model_stats"][0]

    async def read() -> tuple[float | None, float | None]:
        backend = TritonBackend(Settings(triton_grpc_url=gateway_triton.grpc_url))
        try:
            return await backend.service_rate(model), await backend.service_rate("no_such_model")
        finally:
            await backend.close()

    rate, unknown = asyncio.run(read())
    inference = stats["inference_stats"]
    compute_s = (
        sum(int(inference[k]["ns"]) for k in ("compute_input", "compute_infer", "compute_output")) / 1e9
    )
    assert rate is not None and unknown is None
    # At least what had been computed when the statistics were read (more since, at its rate).
    assert rate > 0
    assert abs(rate - int(stats["inference_count"]) / compute_s) / rate < 0.5


def test_a_seeded_rate_is_read_again_until_the_worker_measures_its_own() -> None:
    rates = Rates({"net": 2.0})
    gateway = gateway_knowing(rates)
    asyncio.run(gateway.seed_rates())
    rates.rates["net"] = 8.0  # Triton got faster (or the slow history is behind it)
    asyncio.run(gateway.seed_rates())
    load = gateway.policy.admission.load("net")
    assert load.rate == 8.0 and not load.measured
    load.rate, load.measured = 5.0, True
    rates.rates["net"] = 1.0
    asyncio.run(gateway.seed_rates())
    assert load.rate == 5.0


def test_the_first_own_measurement_replaces_tritons_figure() -> None:
    clock = [0.0]
    load = ModelLoad(objective_s=0.5, initial_limit=8, clock=lambda: clock[0])
    load.rate = 1.0  # Triton's, from a slow past
    for _ in range(SAMPLE_COMPLETIONS):
        load.enter(1)
        clock[0] += 0.25
        load.leave(1, 0.25)
    assert load.measured and load.rate == pytest.approx(4.0)  # its own, not a mix with 1.0


class Statistics:
    """Triton's cumulative statistics, as the gRPC client returns them, one snapshot a call."""

    def __init__(self, snapshots: list[tuple[int, float]]) -> None:
        self.snapshots = iter(snapshots)

    async def get_inference_statistics(self, name: str, **kwargs: object) -> dict:
        images, compute_s = next(self.snapshots)
        ns = str(int(compute_s * 1e9))
        stats = {k: {"ns": "0"} for k in ("compute_input", "compute_output")} | {"compute_infer": {"ns": ns}}
        return {"model_stats": [{"inference_count": str(images), "inference_stats": stats}]}


def test_tritons_rate_is_the_recent_one_when_enough_was_computed() -> None:
    backend = TritonBackend(Settings(triton_grpc_url=UNREACHABLE))
    # 100 images in 100 s since its start; then 40 more in 4 s; then 2 more in 1 s.
    backend._client = Statistics([(100, 100.0), (140, 104.0), (142, 105.0)])  # type: ignore[assignment]
    rates = [asyncio.run(backend.service_rate("m")) for _ in range(3)]
    assert rates[0] == pytest.approx(1.0)  # since its start: nothing to compare with yet
    assert rates[1] == pytest.approx(10.0)  # since the last read
    assert rates[2] == pytest.approx(142 / 105.0)  # too few since: since its start again
