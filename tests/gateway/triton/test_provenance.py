"""Weights whose provenance nobody recorded are never passed off as trained: a config that
no export wrote (the committed contract, served without --model-config-name) makes the
gateway say `unknown` and warn, as it does for random weights."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from embedded.tritonserver import TritonServer
from inception.contract import CPU_VARIANT, GENERATED_PARAMS
from inception.repository import parse, render

from ..helpers import MODEL, classify, copied_repository, photo, running_gateway

pytestmark = pytest.mark.integration


def unexported_repository(tmp_path: Path) -> Path:
    """The CPU variant stripped of what an export records, beside the real model file."""
    repository = copied_repository(tmp_path)
    variant = repository / MODEL / "configs" / f"{CPU_VARIANT}.pbtxt"
    config = parse(variant.read_text())
    for key in GENERATED_PARAMS:
        del config.parameters[key]
    variant.write_text(render(config))
    return repository


def test_unrecorded_provenance_is_unknown_and_warned(tmp_path: Path) -> None:
    repository = unexported_repository(tmp_path)
    env = {"GATEWAY_MODELS": MODEL, "GATEWAY_DEFAULT_MODEL": MODEL}
    with (
        TritonServer(repository, log_path=tmp_path / "triton.log") as triton,
        running_gateway(triton.grpc_url, tmp_path / "gateway.log", env=env) as gateway,
        gateway.client() as client,
    ):
        answer = classify(client, photo("chelsea.png").read_bytes(), "image/png")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["weights"] == "unknown" and body["random_init"] is False
        assert "unknown provenance" in body["warning"]
        listed = client.get("/v1/models").json()
        assert "unknown" in str(listed)


def listed_sha256(client: httpx.Client) -> str | None:
    models = client.get("/v1/models").json()["models"]
    return next(m["weights_sha256"] for m in models if m["name"] == MODEL)


def test_new_provenance_reaches_the_gateway_without_a_restart(tmp_path: Path) -> None:
    """Triton polls its repository (as compose and Kubernetes run it) and loads what an export
    rewrote; the gateway reads the configs again every GATEWAY_CONFIG_MAX_AGE_S, so the
    provenance it publishes follows with no failed call to tell it."""
    repository = copied_repository(tmp_path)
    variant = repository / MODEL / "configs" / f"{CPU_VARIANT}.pbtxt"
    env = {"GATEWAY_MODELS": MODEL, "GATEWAY_DEFAULT_MODEL": MODEL, "GATEWAY_CONFIG_MAX_AGE_S": "1"}
    poll = ["--model-control-mode=poll", "--repository-poll-secs=1"]
    with (
        TritonServer(repository, log_path=tmp_path / "triton.log", extra_args=poll) as triton,
        running_gateway(triton.grpc_url, tmp_path / "gateway.log", env=env) as gateway,
        gateway.client() as client,
    ):
        before = listed_sha256(client)
        new = "f" * 64
        assert before != new
        config = parse(variant.read_text())
        config.parameters["weights_sha256"].string_value = new
        variant.write_text(render(config))
        deadline = time.monotonic() + 60
        while listed_sha256(client) != new:
            assert time.monotonic() < deadline, f"the gateway still lists {listed_sha256(client)}"
            assert classify(client, photo("chelsea.png").read_bytes(), "image/png").status_code == 200
            time.sleep(0.5)
        # The answers say so too (issue 25, item 4): the rollout is visible to a client whose
        # `weights` string stays the same.
        answer = classify(client, photo("chelsea.png").read_bytes(), "image/png")
        assert answer.json()["weights_sha256"] == new
