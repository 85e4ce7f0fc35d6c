"""Batches of good and bad images in every mix (issue 25, item 1), end to end against a real
gateway and a real Triton: a batch is answered 200 with one result per image, each its
predictions or its own error, whatever the mix, the batch whose every image is
undecodable included (it was a 500: nothing prepared, and the Triton step read the first
prepared image). The good images are two real photos, so that after their first
computation the answer cache serves them and the property's examples cost a round trip."""

from __future__ import annotations

import base64

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..helpers import MODEL, photo

pytestmark = pytest.mark.integration

GOOD = {
    "chelsea": base64.b64encode(photo("chelsea.png").read_bytes()).decode(),
    "coffee": base64.b64encode(photo("coffee.png").read_bytes()).decode(),
}
#: The codes of an image's own fault in a batch (service/classification.py, IMAGE_ERRORS).
IMAGE_ERROR_CODES = {"invalid_image", "empty_body", "unsupported_image_format"}


def _garbage() -> st.SearchStrategy[str]:
    """Valid base64 of bytes that are no image: random bytes, the issue's two strings, a
    PNG signature with nothing after it, a truncated JPEG (an empty string is a 422 of the
    whole request, as documented)."""
    fixed = st.sampled_from(
        [
            "45Tx9RqmdMtf",
            "chLEXA==",
            base64.b64encode(b"\x89PNG\r\n\x1a\n").decode(),
            base64.b64encode(b"\xff\xd8\xff\xe0\x00\x10JFIF").decode(),
        ]
    )
    random = st.binary(min_size=1, max_size=64).map(lambda b: base64.b64encode(b).decode())
    return st.one_of(fixed, random)


IMAGE = st.one_of(
    st.sampled_from(sorted(GOOD)).map(lambda name: ("good", GOOD[name])), _garbage().map(lambda t: ("bad", t))
)


def test_a_batch_of_only_undecodable_images_is_answered_per_image(client: httpx.Client) -> None:
    """The issue's request, as sent: 200 and two errors, not a 500."""
    answer = client.post("/v1/classify", json={"images": ["45Tx9RqmdMtf", "chLEXA=="], "model": MODEL})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["error"]["code"] for r in results] == ["invalid_image", "invalid_image"]
    assert all(r["predictions"] is None for r in results)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(images=st.lists(IMAGE, min_size=1, max_size=5))
def test_any_mix_of_good_and_bad_images_answers_each_in_its_place(
    client: httpx.Client, images: list[tuple[str, str]]
) -> None:
    answer = client.post(
        "/v1/classify", json={"images": [data for _, data in images], "model": MODEL, "top_k": 3}
    )
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert len(results) == len(images)
    for (kind, _), result in zip(images, results, strict=True):
        if kind == "good":
            assert result["error"] is None
            assert len(result["predictions"]) == 3
        else:
            assert result["predictions"] is None
            assert result["error"]["code"] in IMAGE_ERROR_CODES, result
            assert result["error"]["message"]
