"""Answers carry ``weights_sha256`` beside ``weights`` (issue 25, item 4): the provenance
string stays the same across a rollout that keeps the file's name, the sha256 does not, so
a client sees which weights computed its answer. End to end against the real stack, and
the ensemble's digest as a unit."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from service.model_config import ModelInfo
from service.model_inputs import Preprocessing
from service.provenance import weights_digest

from ..helpers import MODEL, classify, photo


def listed(client: httpx.Client) -> dict[str, dict]:
    return {m["name"]: m for m in client.get("/v1/models").json()["models"]}


@pytest.mark.integration
def test_an_answer_names_the_sha256_of_the_weights_that_computed_it(client: httpx.Client) -> None:
    # The suite's export is random (no weights can be downloaded here): its sha256 is the
    # listing's "" and the answer's null; test_provenance.py gives a config a real one and
    # sees the answers follow a rollout.
    sha = listed(client)[MODEL]["weights_sha256"] or None
    one = classify(client, photo("chelsea.png").read_bytes(), "image/png", model=MODEL)
    assert one.status_code == 200, one.text
    assert one.json()["weights_sha256"] == sha
    batch = client.post("/v1/classify", json={"images": ["45Tx9RqmdMtf", "chLEXA=="], "model": MODEL})
    assert batch.status_code == 200, batch.text
    assert batch.json()["weights_sha256"] == sha


@pytest.mark.integration
def test_an_ensemble_answer_names_each_members_sha256_and_their_digest(client: httpx.Client) -> None:
    models = listed(client)
    names = ["inception_resnet_v1", "inception_v4"]
    answer = client.post(
        "/v1/classify",
        content=photo("chelsea.png").read_bytes(),
        headers={"Content-Type": "image/png"},
        params={"models": ",".join(names)},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    shas = {n: models[n]["weights_sha256"] or None for n in names}
    assert {m["model"]: m["weights_sha256"] for m in body["members"]} == shas
    if all(shas.values()):
        lines = "".join(f"{n}:{shas[n]}\n" for n in sorted(names))
        assert body["weights_sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    else:
        assert body["weights_sha256"] is None


def _info(name: str, sha: str) -> ModelInfo:
    return ModelInfo(name, Preprocessing(0.875), "pretrained:test", checkpoint_sha256=sha)


def test_the_digest_follows_any_member_and_is_none_when_one_is_unknown() -> None:
    a, b = _info("a", "1" * 64), _info("b", "2" * 64)
    assert weights_digest([a]) == "1" * 64
    both = weights_digest([a, b])
    assert both == weights_digest([b, a]) and both not in (None, "1" * 64)
    assert weights_digest([a, _info("b", "3" * 64)]) != both
    assert weights_digest([a, _info("b", "")]) is None
