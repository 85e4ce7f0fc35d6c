"""The gateway's side of Triton without a Triton: config parsing against the contract and
the mapping of Triton's errors to the API's, with no internals in the messages."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from service.errors import BackendError
from service.model_config import ConfigError, parse_model_config
from service.settings import Settings
from service.triton import checked_output, map_triton_error

from .helpers import UNREACHABLE, model_config_json


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
    assert ("Retry-After" in error.headers) == (http in (429, 503))


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
