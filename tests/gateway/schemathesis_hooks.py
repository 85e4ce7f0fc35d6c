"""Schemathesis hooks for `http/test_schemathesis.py` (loaded by the CLI through
``SCHEMATHESIS_HOOKS``): what a JSON schema cannot say about this API.

- An image field is "binary" (or base64) to a schema, but valid data for this API is a
  picture: the image fields draw small real encoded images, so that "valid data is
  accepted" means something instead of failing on random bytes with 415.
- `weights` belongs to `models` (the counts must match, and not all may be zero): JSON
  schema cannot tie one query parameter to another, so a generated request that breaks the
  rule loses its `weights`; `tests/gateway/classify/test_routing.py` tests the rule and its 422.
- `model` and `models` exclude each other: a generated request with both loses `model`.
- A deadline (`X-Request-Timeout`) shorter than an inference cannot be met (503 or 504 by
  design): generated deadlines are raised to 30 s; `load/test_overload.py` tests deadlines.
- A batch (a JSON `images` array, or repeated multipart `image` parts) of up to 64 images
  is valid, but 64 forwards (640 with `crops=10`) take longer than the gateway's 30 s
  deadline on two CPU cores (503 or 504 by design there): generated batches keep their
  first 2 images; `classify/test_batches.py` tests the full 64 against admission.
- Schemathesis (4.32) labels some generated multipart bodies "negative" whose every part
  is valid once serialised (its fuzzing phase now meets one with two `image` parts and an
  empty `models`): such a body, valid against the multipart schema, gets one unknown field
  (the schema forbids additional properties), so that the check "invalid data is refused"
  tests a real refusal instead of flagging a valid batch answered 200.
- `crops=144` runs 144 crops per network, longer than the gateway's 30 s deadline on two
  CPU cores (504 by design there): it is sent as 10; `images/test_crops_e2e.py` tests 144 with a
  longer deadline.
"""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import jsonschema
import schemathesis
from hypothesis import strategies as st
from PIL import Image
from schemathesis.core.parameters import ParameterLocation
from schemathesis.transport.serialization import Binary

from service.options import MULTIPART_SCHEMA

#: One weight as the schema's pattern spells it (service/schemas.py).
WEIGHT = r"\d+(\.\d*)?|\.\d+"
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
BODY_LOCATION = ParameterLocation.BODY
#: The most images a generated batch keeps (see the module's docstring).
BATCH = 2


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
    """False for requests whose `weights`, valid numbers, do not belong to their `models`.
    Weights that are not numbers are left alone: that is the schema's business (a 422)."""
    weights = _csv(options.get("weights"))
    if not weights:
        return True
    try:
        values = [float(w) for w in weights]
    except ValueError:
        return True
    if not all(re.fullmatch(WEIGHT, w.strip()) for w in weights):
        return True  # "1e3", "inf", "nan": numbers to Python, not to the schema's pattern
    return len(_csv(options.get("models"))) == len(values) and sum(values) > 0


def _fit(options: dict[str, Any]) -> None:
    """Makes one container of options (query or JSON body) keep the rules above."""
    if not keeps_the_weights_rule(options):
        options.pop("weights", None)
    if options.get("model") not in (None, "") and _csv(options.get("models")):
        options.pop("model")  # either a model or an ensemble of models, not both
    if str(options.get("crops")) == "144":
        options["crops"] = 10
    for field in ("images", "image"):
        if isinstance(options.get(field), list):
            options[field] = options[field][:BATCH]


def _negative_body(meta: Any) -> bool:
    component = meta.components.get(BODY_LOCATION)
    return component is not None and component.mode.is_negative


def _valid_multipart(body: Any) -> bool:
    """Whether a generated multipart body is valid against the schema /docs publishes
    (its files as the strings they are to a schema)."""
    if not isinstance(body, dict):
        return False
    text = {
        k: ([("x" if isinstance(p, Binary) else p) for p in v] if isinstance(v, list) else v)
        for k, v in body.items()
    }
    return jsonschema.Draft202012Validator(MULTIPART_SCHEMA).is_valid(text)


@schemathesis.hook
def before_call(ctx: Any, case: Any, **kwargs: Any) -> None:
    """Brings a generated request within the rules above just before it is sent: a hook on
    the call, because the coverage phase applies no generation filters. Negative cases
    (invalid on purpose) are sent as generated: the gateway refuses them before any work."""
    meta = getattr(case, "meta", None)
    if meta is None or meta.generation.mode.is_positive:
        for options in (case.query, case.body):
            if isinstance(options, dict):
                _fit(options)
    elif _negative_body(meta) and case.media_type == "multipart/form-data" and _valid_multipart(case.body):
        case.body["not_an_option"] = "x"
    headers = case.headers or {}
    for name in list(headers):
        if name.lower() == "x-request-timeout":
            value = str(headers[name])
            # Only a plain positive number that is too short to be met; anything else (text,
            # blanks, signs) is the schema's business, a 422.
            if re.fullmatch(r"\d*\.?\d+([eE][-+]?\d+)?", value) and 0 < float(value) < 30:
                headers[name] = "30"
