"""The Triton ensemble and per-request ensembles, checked against their members."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from inception.registry import get_spec
from service.imaging import configure_pillow, prepare
from service.model_inputs import Preprocessing

from ...helpers import TritonEndpoint
from ..helpers import classify, photo, vector

pytestmark = pytest.mark.integration


def _infer(triton: grpcclient.InferenceServerClient, model: str, tensor: np.ndarray) -> np.ndarray:
    inputs = grpcclient.InferInput("image__0", [1, *tensor.shape], "UINT8")
    inputs.set_data_from_numpy(tensor[None])
    result = triton.infer(model, [inputs], outputs=[grpcclient.InferRequestedOutput("probabilities__0")])
    return result.as_numpy("probabilities__0")[0].astype(np.float64)


def test_triton_ensemble_is_the_weighted_mean_of_its_members(
    client: httpx.Client, gateway_triton: TritonEndpoint
) -> None:
    data = photo("grace_hopper.jpg").read_bytes()
    answer = classify(client, data, model="ensemble", top_k=1000)
    body = answer.json()
    assert body["model"] == "inception_ensemble" and body["crops"] == 1
    ensemble = np.array(vector(answer))
    listing = {m["name"]: m for m in client.get("/v1/models").json()["models"]}["inception_ensemble"]
    members = [(m["model"], m["weight"]) for m in listing["members"]]
    assert [(m["model"], m["weight"]) for m in body["members"]] == members
    assert {name: pre["crop_pct"] for name, pre in listing["inputs"].items()} == {
        "image__0": 0.875,
        "image__1": 0.8975,
    }
    assert {m["model"] for m in body["members"]} == {
        "inception_v4",
        "inception_resnet_v1",
        "inception_resnet_v2",
    }
    # Each member on its own preprocessing, as the ensemble's inputs feed them.
    configure_pillow(50_000_000)
    crop = {name: get_spec(name).crop_pct for name, _ in members}
    assert crop["inception_resnet_v2"] == 0.8975 and crop["inception_v4"] == 0.875
    pres = {name: Preprocessing(c) for name, c in crop.items()}
    prepared = prepare(data, list(pres.values()), max_pixels=50_000_000)
    triton = grpcclient.InferenceServerClient(gateway_triton.grpc_url)
    expected = sum(w * _infer(triton, name, prepared.inputs[pres[name]]) for name, w in members)
    assert np.abs(ensemble - expected).max() <= 1e-5
    assert ensemble.sum() == pytest.approx(sum(w for _, w in members), abs=1e-4)


@pytest.mark.parametrize("crops", [1, 10])
def test_triton_ensemble_equals_the_per_request_ensemble_of_its_members(
    client: httpx.Client, crops: int
) -> None:
    """`model=ensemble` (Triton's fan-out, one input per preprocessing) and
    `models=inception_v4,inception_resnet_v1,inception_resnet_v2` (the gateway's fan-out,
    each member with its own preprocessing) are the same function of the image."""
    data = photo("coffee.png").read_bytes()
    triton_side = classify(client, data, "image/png", model="ensemble", top_k=1000, crops=crops)
    members = ",".join(m["model"] for m in triton_side.json()["members"])
    assert members == "inception_v4,inception_resnet_v1,inception_resnet_v2"
    gateway_side = classify(client, data, "image/png", models=members, top_k=1000, crops=crops)
    assert triton_side.json()["crops"] == gateway_side.json()["crops"] == crops
    assert np.abs(np.array(vector(triton_side)) - np.array(vector(gateway_side))).max() <= 1e-5


@pytest.mark.parametrize("weights", [None, "1,3"])
def test_per_request_ensemble_is_the_mean_of_its_members(client: httpx.Client, weights: str | None) -> None:
    data = photo("coffee.png").read_bytes()
    names = ["inception_v4", "inception_resnet_v2"]
    params = {"models": ",".join(names), "top_k": 1000}
    if weights:
        params["weights"] = weights
    answer = classify(client, data, "image/png", **params)
    body = answer.json()
    assert body["model"] == "ensemble(inception_v4,inception_resnet_v2)"
    w = np.array([1.0, 3.0]) / 4 if weights else np.array([0.5, 0.5])
    assert [m["weight"] for m in body["members"]] == pytest.approx(list(w))
    assert all(m["weights"] for m in body["members"])
    if any(m["weights"] == "random-init" for m in body["members"]):
        assert body["random_init"] is True and body["weights"] == "random-init" and body["warning"]
    members = [np.array(vector(classify(client, data, "image/png", model=n, top_k=1000))) for n in names]
    expected = w[0] * members[0] + w[1] * members[1]
    assert np.abs(np.array(vector(answer)) - expected).max() <= 1e-5
    # The same per-request ensemble as JSON options.
    import base64

    again = client.post(
        "/v1/classify",
        json={"image": base64.b64encode(data).decode(), "models": names, "weights": list(w), "top_k": 1000},
    )
    assert np.abs(np.array(vector(again)) - expected).max() <= 1e-5
