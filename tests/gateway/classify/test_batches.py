"""Batches of images in one ``POST /v1/classify`` (issue 21, item 1), end to end: a real
gateway and a real Triton, the cheapest model, a few images."""

from __future__ import annotations

import base64
import io
import time

import httpx
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image

from service.options import MAX_IMAGES

from ...helpers import TritonEndpoint
from ..helpers import MODEL, classify, encode, photo, probabilities

pytestmark = pytest.mark.integration

CHELSEA = photo("chelsea.png").read_bytes()
COFFEE = photo("coffee.png").read_bytes()
NOT_AN_IMAGE = b"GIF89a this is no image at all"


def _counts(grpc_url: str) -> tuple[int, int]:
    """Triton's inference and execution counts of the model: one execution of n images is
    one batched request."""
    triton = grpcclient.InferenceServerClient(grpc_url)
    stats = triton.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def _settled_counts(grpc_url: str, at_least: tuple[int, int]) -> tuple[int, int]:
    """Triton records statistics after it has sent the responses: poll briefly."""
    deadline = time.monotonic() + 30
    counts = _counts(grpc_url)
    while counts[0] < at_least[0] and time.monotonic() < deadline:
        time.sleep(0.2)
        counts = _counts(grpc_url)
    return counts


def _multipart(*images: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (f"{i}.png", data, "application/octet-stream")) for i, data in enumerate(images)]


def _scores(predictions: list[dict]) -> dict[int, float]:
    return {p["class_id"]: p["score"] for p in predictions}


def test_a_multipart_batch_answers_each_image_in_order_with_its_own_error(
    client: httpx.Client, gateway_triton: TritonEndpoint
) -> None:
    """Three parts, the second no image: two answers equal to the images sent alone (within
    float32's batch noise), one error in its place, and the two images in ONE Triton request."""
    alone = [
        probabilities(classify(client, data, "image/png", model=MODEL, top_k=1000))
        for data in (CHELSEA, COFFEE)
    ]
    before = _settled_counts(gateway_triton.grpc_url, (0, 0))
    answer = client.post(
        "/v1/classify",
        files=_multipart(CHELSEA, NOT_AN_IMAGE, COFFEE),
        params={"model": MODEL, "top_k": 1000},
        headers={"Cache-Control": "no-store"},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert "predictions" not in body and body["model"] == MODEL
    first, bad, third = body["results"]
    assert bad["predictions"] is None and bad["error"]["code"] in {
        "invalid_image",
        "unsupported_image_format",
    }
    for result, expected in zip((first, third), alone, strict=True):
        assert result["error"] is None and result["cached"] is False
        scores = _scores(result["predictions"])
        assert scores.keys() == expected.keys()
        assert max(abs(scores[k] - expected[k]) for k in scores) < 1e-4
    after = _settled_counts(gateway_triton.grpc_url, (before[0] + 2, 0))
    assert (after[0] - before[0], after[1] - before[1]) == (2, 1), "two images, one Triton execution"
    assert set(body["timing_ms"]) >= {"read", "decode", "preprocess", "triton", "postprocess", "total"}


def test_a_json_batch_and_a_single_image_keep_their_forms(client: httpx.Client) -> None:
    encoded = [base64.b64encode(d).decode() for d in (COFFEE, CHELSEA)]
    batch = client.post("/v1/classify", json={"images": encoded, "model": MODEL, "top_k": 3})
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert [len(r["predictions"]) for r in results] == [3, 3]
    single = client.post("/v1/classify", json={"image": encoded[0], "model": MODEL, "top_k": 3})
    assert single.status_code == 200, single.text
    assert "results" not in single.json()
    assert [p["class_id"] for p in single.json()["predictions"]] == [
        p["class_id"] for p in results[0]["predictions"]
    ]
    # An array of one is a batch: the client asked for results.
    one = client.post("/v1/classify", json={"images": encoded[:1], "model": MODEL})
    assert one.status_code == 200 and len(one.json()["results"]) == 1


def test_batch_mistakes_are_4xx_with_a_json_body(client: httpx.Client) -> None:
    tiny = base64.b64encode(encode(Image.new("RGB", (4, 4)), "PNG")).decode()
    cases = [
        ({"images": [tiny] * (MAX_IMAGES + 1)}, 422),
        ({"image": tiny, "images": [tiny]}, 422),
        ({"images": []}, 422),
        ({"images": [tiny, "not base64!"]}, 422),
        ({}, 422),
    ]
    for document, status in cases:
        answer = client.post("/v1/classify", json={**document, "model": MODEL})
        assert answer.status_code == status, (document.keys(), answer.text)
        assert answer.json()["error"]["code"] == "invalid_request"
    parts = _multipart(*[CHELSEA] * (MAX_IMAGES + 1))
    too_many = client.post("/v1/classify", files=parts, params={"model": MODEL})
    assert too_many.status_code == 422 and "error" in too_many.json()
    # One part alone is answered as before batches: its error is the request's.
    alone = client.post("/v1/classify", files=_multipart(NOT_AN_IMAGE), params={"model": MODEL})
    assert alone.status_code in (400, 415) and "error" in alone.json()


def test_a_batch_weighs_its_images_against_the_deadline(client: httpx.Client) -> None:
    """Admission counts a batch as its images: once the model's rate is measured, a batch
    that cannot be served within its deadline is refused at once (503), where one image
    within the same deadline is served."""
    for _ in range(3):  # a measured service rate
        assert classify(client, CHELSEA, "image/png", model=MODEL).status_code == 200
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, "PNG")
    small = base64.b64encode(buffer.getvalue()).decode()
    headers = {"X-Request-Timeout": "0.5", "Cache-Control": "no-store"}
    started = time.monotonic()
    batch = client.post(
        "/v1/classify", json={"images": [small] * MAX_IMAGES, "model": MODEL}, headers=headers
    )
    assert batch.status_code == 503, batch.text
    assert (
        batch.json()["error"]["code"] == "over_capacity" and "64 image(s)" in batch.json()["error"]["message"]
    )
    assert "Retry-After" in batch.headers and time.monotonic() - started < 0.5
    one = client.post(
        "/v1/classify", json={"image": small, "model": MODEL}, headers={"X-Request-Timeout": "5"}
    )
    assert one.status_code == 200, one.text
