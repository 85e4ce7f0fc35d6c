"""From probabilities to the classify answer: one image's probabilities from its models'
outputs, then each image ranked and labelled beside the provenance every answer carries."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ApiError
from .gateway import Gateway
from .provenance import Served, provenance_warning
from .routing import Plan
from .schemas import BatchClassifyResponse, ClassifyResponse, ErrorDetail, ImageResult


def combine(plan: Plan, outputs: list[np.ndarray]) -> np.ndarray:
    """One image's probabilities ``[1000]`` from its models' ``[1, 1000]``: the model's own,
    or a per-request ensemble's weighted sum (in float64); float32 either way, as the cache
    keeps them, so that a hit answers exactly what the miss did."""
    if not plan.custom:
        return np.asarray(outputs[0][0], dtype=np.float32)
    probabilities = np.zeros(outputs[0].shape[1], dtype=np.float64)
    for coefficient, output in zip(plan.coefficients, outputs, strict=True):
        probabilities += coefficient * output[0].astype(np.float64)
    return probabilities.astype(np.float32)


def build_answer(
    gateway: Gateway,
    plan: Plan,
    served: Served,
    top_k: int,
    batch: bool,
    found: list[np.ndarray | None],
    computed: dict[int, np.ndarray],
    failed: dict[int, ApiError],
) -> ClassifyResponse | BatchClassifyResponse:
    """Rank and label each image; say which weights served it, warn unless they are known
    to be trained. One image sent alone is answered as before batches existed."""
    common: dict[str, Any] = {
        "model": plan.name,
        "weights": served.provenance,
        "weights_sha256": served.weights_sha256,
        "members": served.members,
        "random_init": any(i.random_init for i in served.involved),
        "warning": provenance_warning(served.involved),
        "timing_ms": {},
        "request_id": "",
    }
    results = []
    for index, hit in enumerate(found):
        probabilities = hit if hit is not None else computed.get(index)
        if probabilities is None:
            error = failed[index]
            results.append(ImageResult(error=ErrorDetail(code=error.code, message=error.message)))
        else:
            results.append(
                ImageResult(predictions=gateway.top_k(probabilities, top_k), cached=hit is not None)
            )
    if batch:
        return BatchClassifyResponse(**common, results=results)
    (only,) = results
    return ClassifyResponse(**common, predictions=only.predictions or [], cached=only.cached)
