"""What FastAPI cannot infer for /docs: the three bodies of ``POST /v1/classify`` (the
route reads the body itself, to bound it; their options derive from
:class:`service.options.ClassifyOptions`) and the error answers of every route."""

from __future__ import annotations

from typing import Any

from . import deadlines
from .options import MULTIPART_SCHEMA, json_body_schema
from .schemas import ErrorResponse

CLASSIFY_BODY: dict[str, Any] = {
    "parameters": [deadlines.PARAMETER],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": MULTIPART_SCHEMA},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": json_body_schema()},
        },
    },
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "undecodable, truncated or empty image",
        401: "missing or wrong API key",
        404: "unknown model",
        408: "the body did not arrive in time",
        413: "body or pixel count over the limit",
        415: "unsupported media type or image format",
        422: "bad options",
        429: "this client over its fair share of a model (over_share) or at its most requests in "
        "flight, this worker's requests or buffered bytes at their limit, or Triton's queue full "
        "(overloaded) (Retry-After)",
        502: "Triton failed the request",
        503: "over capacity (refused at once by admission control), Triton or the model unavailable, "
        "or the upload cannot be buffered (Retry-After)",
        504: "Triton did not answer in time, or the X-Request-Timeout deadline passed",
    }.items()
}

# /metrics answers Prometheus' text exposition format, not JSON.
METRICS_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus text exposition format",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}
