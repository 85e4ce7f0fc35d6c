"""The gateway's side of Triton without a Triton: config parsing against the contract and
the mapping of Triton's errors to the API's, with no internals in the messages."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from service.errors import ApiError, BackendError, error_response
from service.model_config import ConfigError, parse_model_config
from service.settings import Settings, default_models
from service.triton import TritonBackend
from service.triton_errors import checked_output, map_triton_error

from ..helpers import UNREACHABLE, model_config_json

ROUTABLE = default_models()


def test_parse_model_config() -> None:
    info = parse_model_config(
        model_config_json(crop_pct="0.8975", weights="pretrained:timm/x", weights_sha256="ab")
    )
    assert info.preprocessing.crop_pct == 0.8975 and info.provenance == "pretrained:timm/x"
    assert info.checkpoint_sha256 == "ab"
    assert not info.random_init and not info.is_ensemble and info.max_batch_size == 64


def test_parse_ensemble_config() -> None:
    ensemble = parse_model_config(model_config_json(members="a,b,c", member_weights="0.5,0.25,0.25"))
    assert ensemble.members == ("a", "b", "c") and ensemble.member_weights == (0.5, 0.25, 0.25)


def test_config_without_provenance_is_unknown() -> None:
    config = model_config_json()
    del config["config"]["parameters"]["weights"]
    info = parse_model_config(config)
    assert info.provenance == "unknown" and not info.random_init


def test_configs_that_break_the_contract_are_refused() -> None:
    with pytest.raises(ConfigError):
        parse_model_config(model_config_json(members="a,b", member_weights="1"))
    broken = model_config_json()
    broken["config"]["input"][0]["data_type"] = "TYPE_FP32"
    with pytest.raises(ConfigError):
        parse_model_config(broken)


@pytest.mark.parametrize(
    ("status", "message", "http", "code"),
    [
        (
            "StatusCode.UNAVAILABLE",
            "failed to connect to all addresses; 10.0.0.7:8001",
            503,
            "backend_unavailable",
        ),
        (
            "StatusCode.UNAVAILABLE",
            "Request for unknown model: 'x' has no available versions",
            503,
            "model_unavailable",
        ),
        ("StatusCode.UNAVAILABLE", "Exceeds maximum queue size", 429, "overloaded"),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", 504, "backend_timeout"),
        ("StatusCode.INTERNAL", "Traceback ... torch ... /opt/tritonserver", 502, "backend_error"),
    ],
    ids=["unreachable", "unknown-model", "queue-full", "deadline", "internal"],
)
def test_triton_errors_are_mapped_without_internals(status: str, message: str, http: int, code: str) -> None:
    settings = Settings(triton_grpc_url=UNREACHABLE)
    error = map_triton_error(InferenceServerException(msg=message, status=status), "inception_v4", settings)
    assert (error.status, error.code) == (http, code)
    assert "10.0.0.7" not in error.message and "torch" not in error.message
    retry_after = error_response(error, settings.retry_after_s).headers.get("Retry-After")
    assert retry_after == {429: "1", 503: "5"}.get(http)


@pytest.mark.parametrize(
    "output",
    [
        None,
        np.zeros((1, 999), np.float32),
        np.full((1, 1000), np.nan, np.float32),
        np.full((1, 1000), np.inf),
    ],
    ids=["missing", "wrong-shape", "nan", "inf"],
)
def test_unusable_triton_output_is_a_502(output: np.ndarray | None) -> None:
    with pytest.raises(BackendError) as error:
        checked_output(output, 1, "inception_v4")
    assert error.value.status == 502


def test_usable_triton_output_is_float32() -> None:
    got = checked_output(np.full((2, 1000), 1e-3, np.float64), 2, "inception_v4")
    assert got.dtype == np.float32 and got.shape == (2, 1000)


class FakeTriton:
    """Triton's health and config calls as the async client makes them, without a Triton:
    it serves the routable models, but those not ready and one whose config is broken."""

    def __init__(self, *, up: bool = True, not_ready: frozenset[str] = frozenset(), broken: str = "") -> None:
        self.up, self.not_ready, self.broken = up, not_ready, broken
        self.configs_read: list[str] = []

    def _answer(self, value: bool) -> bool:
        if not self.up:
            raise InferenceServerException(
                msg="failed to connect to all addresses", status="StatusCode.UNAVAILABLE"
            )
        return value

    async def is_server_live(self, client_timeout: float) -> bool:
        return self._answer(True)

    async def is_server_ready(self, client_timeout: float) -> bool:
        return self._answer(not self.not_ready)

    async def is_model_ready(self, name: str, client_timeout: float) -> bool:
        return self._answer(name in ROUTABLE and name not in self.not_ready)

    async def get_model_config(self, name: str, as_json: bool, client_timeout: float) -> dict:
        self._answer(True)
        if name not in ROUTABLE:
            raise InferenceServerException(
                msg=f"Request for unknown model: '{name}'", status="StatusCode.NOT_FOUND"
            )
        self.configs_read.append(name)
        config = model_config_json()
        config["config"]["name"] = name
        if name == self.broken:
            config["config"]["input"][0]["data_type"] = "TYPE_FP32"
        return config


def _backend(triton: FakeTriton, models: list[str] = ROUTABLE) -> TritonBackend:
    backend = TritonBackend(Settings(triton_grpc_url=UNREACHABLE, models=models))
    backend._client = triton  # type: ignore[assignment]
    return backend


@pytest.mark.parametrize(
    ("triton", "ready"),
    [
        (FakeTriton(), set(ROUTABLE)),
        (FakeTriton(not_ready=frozenset({"inception_resnet_v2"})), set(ROUTABLE) - {"inception_resnet_v2"}),
        (FakeTriton(broken="inception_v4"), set(ROUTABLE) - {"inception_v4"}),
        (FakeTriton(up=False), set()),
    ],
    ids=["all-ready", "model-not-loaded", "config-breaks-the-contract", "unreachable"],
)
def test_one_probe_says_what_is_ready(triton: FakeTriton, ready: set[str]) -> None:
    readiness = asyncio.run(_backend(triton).readiness())
    assert readiness.server == (triton.up and not triton.not_ready)
    assert {name for name, is_ready in readiness.models.items() if is_ready} == ready
    assert list(readiness.models) == ROUTABLE
    assert readiness.ready == (ready == set(ROUTABLE))
    if not triton.up:
        assert triton.configs_read == []  # no config fetch while Triton is unreachable


@pytest.mark.parametrize(("up", "code"), [(True, "model_unavailable"), (False, "backend_unavailable")])
def test_a_model_without_a_config_is_the_models_fault_only_while_triton_lives(up: bool, code: str) -> None:
    backend = _backend(FakeTriton(up=up), [*ROUTABLE, "not_in_triton"])
    with pytest.raises(ApiError) as error:
        asyncio.run(backend.model("not_in_triton"))
    assert (error.value.status, error.value.code) == (503, code)


def test_a_model_whose_config_breaks_the_contract_is_a_502() -> None:
    backend = _backend(FakeTriton(broken="inception_v4"))
    with pytest.raises(BackendError) as error:
        asyncio.run(backend.model("inception_v4"))
    assert error.value.status == 502 and "misconfigured" in error.value.message
