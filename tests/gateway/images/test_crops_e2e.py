"""The ``crops`` option end to end: a real gateway, a real Triton, the cheapest model."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from service.crops import PROTOCOLS
from service.imaging import configure_pillow, prepare
from service.model_inputs import Preprocessing

from ...helpers import TritonEndpoint
from ..helpers import MODEL, classify, encode, photo, running_gateway, symmetric_photo, vector

pytestmark = pytest.mark.integration
LIMIT = 50_000_000


def _crops_on_triton(grpc_url: str, model: str, batch: np.ndarray) -> np.ndarray:
    """Per-crop probabilities, sent by this test in requests of at most 64."""
    triton = grpcclient.InferenceServerClient(grpc_url)
    rows = []
    for start in range(0, len(batch), 64):
        part = batch[start : start + 64]
        tensor = grpcclient.InferInput("image__0", list(part.shape), "UINT8")
        tensor.set_data_from_numpy(part)
        result = triton.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput("probabilities__0")])
        rows.append(result.as_numpy("probabilities__0").astype(np.float64))
    return np.concatenate(rows)


def _preprocessing(client: httpx.Client, model: str) -> Preprocessing:
    listing = client.get("/v1/models").json()
    entry = {m["name"]: m for m in listing["models"]}[model]
    return Preprocessing(**entry["preprocessing"])


def test_models_list_the_crop_protocols(client: httpx.Client) -> None:
    listing = client.get("/v1/models").json()
    assert {int(k): v for k, v in listing["crops"].items()} == PROTOCOLS
    assert "Szegedy" in listing["crops"]["144"] and "Krizhevsky" in listing["crops"]["10"]


def test_ten_crops_are_the_mean_of_the_crops_and_mirrors_agree(
    client: httpx.Client, gateway_triton: TritonEndpoint
) -> None:
    """On a left-right symmetric photo each mirrored crop is the opposite corner's crop
    (within Pillow's rounding, one grey level), so their probabilities are equal; the
    answer is the mean of the ten crops' probabilities."""
    data = encode(symmetric_photo(), "PNG")
    answer = classify(client, data, "image/png", model=MODEL, crops=10, top_k=1000)
    assert answer.json()["crops"] == 10
    configure_pillow(LIMIT)
    pre = _preprocessing(client, MODEL)
    batch = prepare(data, [pre], max_pixels=LIMIT, crops=10).batches[pre]
    rows = _crops_on_triton(gateway_triton.grpc_url, MODEL, batch)
    for plain, mirrored in ((1, 5), (0, 6), (3, 7), (2, 8), (4, 9)):
        assert np.abs(rows[plain] - rows[mirrored]).max() <= 1e-5, (plain, mirrored)
    assert np.abs(np.array(vector(answer)) - rows.mean(axis=0)).max() <= 1e-5
    single = classify(client, data, "image/png", model=MODEL, top_k=1000)
    assert single.json()["crops"] == 1
    assert np.abs(np.array(vector(single)) - rows[4]).max() <= 1e-5  # the centre crop


def test_144_crops_go_to_triton_in_batches_and_average(
    client: httpx.Client, gateway_triton: TritonEndpoint, tmp_path: Path
) -> None:
    """144 crops are three requests (64, 64, 16); on two shared CPU cores they take longer
    than the default 30 s round trip, so this gateway allows more (README: multi-crop)."""
    data = photo("chelsea.png").read_bytes()
    text = base64.b64encode(data).decode()
    env = {"GATEWAY_TRITON_TIMEOUT_S": "600"}
    with (
        running_gateway(gateway_triton.grpc_url, tmp_path / "gateway.log", env=env) as gateway,
        httpx.Client(base_url=gateway.url, timeout=660) as patient,
    ):
        started = time.monotonic()
        answer = patient.post(
            "/v1/classify", json={"image": text, "model": MODEL, "crops": 144, "top_k": 1000}
        )
        took = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    assert answer.json()["crops"] == 144
    print(f"144 crops of {MODEL}: {took:.1f} s through the gateway")
    configure_pillow(LIMIT)
    pre = _preprocessing(client, MODEL)
    batch = prepare(data, [pre], max_pixels=LIMIT, crops=144).batches[pre]
    rows = _crops_on_triton(gateway_triton.grpc_url, MODEL, batch)
    assert np.abs(np.array(vector(answer)) - rows.mean(axis=0)).max() <= 1e-5


@pytest.mark.parametrize("crops", ["12", "0", "ten"])
def test_other_crop_counts_are_422(client: httpx.Client, crops: str) -> None:
    answer = classify(client, photo("chelsea.png").read_bytes(), "image/png", model=MODEL, crops=crops)
    assert answer.status_code == 422, answer.text
    form = client.post(
        "/v1/classify",
        files={"image": ("c.png", photo("chelsea.png").read_bytes(), "image/png")},
        data={"crops": crops},
    )
    assert form.status_code == 422 and form.json()["error"]["code"] == "invalid_request"
