"""The gateway's settings, read from the environment and checked at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.app import create_app
from service.settings import Settings

from .helpers import ROOT, UNREACHABLE


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
