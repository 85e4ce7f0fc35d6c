"""Schemathesis hooks for `test_schemathesis.py` (loaded by the CLI through
``SCHEMATHESIS_HOOKS``): what a JSON schema cannot say about this API.

- An image field is "binary" (or base64) to a schema, but valid data for this API is a
  picture: the image fields draw small real encoded images, so that "valid data is
  accepted" means something instead of failing on random bytes with 415.
- `weights` belongs to `models` (the counts must match, and not all may be zero): JSON
  schema cannot tie one query parameter to another, so generated requests that break the
  rule are dropped here; `tests/gateway/test_routing.py` tests the rule and its 422.
- A deadline (`X-Request-Timeout`) shorter than an inference cannot be met: such
  generated deadlines are dropped; `test_overload.py` tests deadlines.
- `crops=144` runs 144 crops per network, longer than the gateway's 30 s deadline on two
  CPU cores (504 by design there): such requests are dropped; `test_crops_e2e.py` tests
  them with a longer deadline.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import schemathesis
from hypothesis import strategies as st
from PIL import Image
from schemathesis.transport.serialization import Binary

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


@st.composite
def encoded_images(draw: st.DrawFn) -> bytes:
    """A small real image, from 1×1, in a format and mode the gateway decodes."""
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    fmt = draw(st.sampled_from(FORMATS))
    mode = draw(st.sampled_from(["RGB", "L"] if fmt == "JPEG" else ["RGB", "L", "RGBA", "P"]))
    shade = draw(st.integers(0, 255))
    image = Image.new("RGB", (width, height), (shade, 255 - shade, shade // 2)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


schemathesis.openapi.format("binary", encoded_images().map(Binary))
schemathesis.openapi.format("byte", encoded_images().map(lambda data: base64.b64encode(data).decode()))
schemathesis.openapi.media_type("image/*", encoded_images())


def _csv(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return [part for part in str(value).split(",") if part.strip()]


def keeps_the_weights_rule(options: dict[str, Any]) -> bool:
    """False for requests whose `weights` do not belong to their `models`."""
    weights = _csv(options.get("weights"))
    if not weights:
        return True
    models = _csv(options.get("models"))
    if len(models) != len(weights):
        return False
    try:
        return sum(float(w) for w in weights) > 0
    except ValueError:
        return True  # not numbers at all: the schema's business (a 422 either way)


def fits_the_deadline(options: dict[str, Any]) -> bool:
    """False for 144-crop requests, which a CPU cannot answer within the default deadline."""
    return str(options.get("crops")) != "144"


@schemathesis.hook
def filter_query(ctx: Any, query: dict[str, Any] | None) -> bool:
    return query is None or (keeps_the_weights_rule(query) and fits_the_deadline(query))


@schemathesis.hook
def filter_body(ctx: Any, body: Any) -> bool:
    return not isinstance(body, dict) or (keeps_the_weights_rule(body) and fits_the_deadline(body))


@schemathesis.hook
def filter_headers(ctx: Any, headers: dict[str, Any] | None) -> bool:
    """A client deadline shorter than an inference is answered 503 or 504 by design (it
    cannot be met); generated deadlines are kept to those an answer fits in."""
    timeout = (headers or {}).get("X-Request-Timeout")
    try:
        return timeout is None or float(timeout) >= 30
    except (TypeError, ValueError):
        return True  # not a number: the schema's business (a 422)
