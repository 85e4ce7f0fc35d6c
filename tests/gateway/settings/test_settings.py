"""The gateway's settings, read from the environment and checked at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.app import create_app
from service.settings import Settings

from ...helpers import ROOT
from ..helpers import UNREACHABLE


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_API_KEYS", "a, b")
    monkeypatch.setenv("GATEWAY_CORS_ORIGINS", "https://app.example")
    monkeypatch.setenv("GATEWAY_MAX_BODY_BYTES", "1000")
    monkeypatch.setenv("GATEWAY_DEFAULT_MODEL", "inception_resnet_v2")
    s = Settings()
    assert s.api_keys == ["a", "b"] and s.cors_origins == ["https://app.example"]
    assert s.max_body_bytes == 1000 and s.default_model == "inception_resnet_v2"
    assert s.labels_path is not None and s.labels_path.is_file()


def test_internal_model_cannot_be_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_DEFAULT_MODEL", "inception_ensemble_mean")
    with pytest.raises(ValueError):
        Settings()


def test_labels_file_is_the_exporters(tmp_path: Path) -> None:
    labels = (ROOT / "inception" / "data" / "imagenet_labels.txt").read_text().splitlines()
    assert len(labels) == 1000 and labels[0].startswith("tench")
    short = tmp_path / "labels.txt"
    short.write_text("a\nb\n")
    with pytest.raises(RuntimeError):
        create_app(Settings(triton_grpc_url=UNREACHABLE, labels_path=short))


KEY = "k3y-0123456789abcdefghijklmnopqr"


@pytest.mark.parametrize(
    ("variable", "value"),
    [("GATEWAY_DEFAULT_MODEL", "nope"), ("GATEWAY_MAX_BODY_BYTES", "lots"), ("GATEWAY_MODELS", " , ")],
    ids=["model-check", "field-type", "empty-models"],
)
def test_a_bad_setting_never_prints_the_keys(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv("GATEWAY_API_KEYS", f"{KEY},other-key-value")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError) as error:
        Settings()
    assert KEY[:8] not in str(error.value) and "other-key" not in str(error.value)


@pytest.mark.parametrize("value", [" ", ",", " , ,"], ids=["blank", "comma", "blanks-and-commas"])
def test_keys_set_to_nothing_stop_the_start(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("GATEWAY_API_KEYS", value)
    with pytest.raises(ValueError, match="names no key"):
        Settings()


def test_empty_keys_mean_no_authentication(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_API_KEYS", "")
    assert Settings().api_keys == []


def test_buffer_budget_defaults_to_a_quarter_of_a_workers_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.worker_share import worker_memory_bytes

    monkeypatch.setenv("WEB_CONCURRENCY", "1")
    one = worker_memory_bytes()
    assert Settings().buffer_budget_bytes == one // 4 > 0
    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    assert worker_memory_bytes() == one // 4


def test_the_routable_models_follow_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    """A network added to `inception.contract.NETWORKS` is routed with no edit in service/."""
    from inception import contract

    assert Settings().models == [*contract.NETWORKS, contract.ENSEMBLE_NAME]
    monkeypatch.setattr(contract, "NETWORKS", ("inception_v3", *contract.NETWORKS))
    settings = Settings()
    assert settings.models == [*contract.NETWORKS, contract.ENSEMBLE_NAME]
    assert settings.default_model == "inception_v3"
    assert settings.ensemble_model == contract.ENSEMBLE_NAME


def test_retry_after_by_status(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_RETRY_AFTER_OVERLOADED_S", "2")
    monkeypatch.setenv("GATEWAY_RETRY_AFTER_UNAVAILABLE_S", "11")
    assert Settings().retry_after_s == {429: 2, 503: 11}
