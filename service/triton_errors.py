"""Triton's failures and malformed answers as the gateway's :mod:`service.errors`, with
messages that name no internals: addresses, stack traces and Triton's own words go to the
log only.

Apart from the client (:mod:`service.triton`) because the mapping is a table of gRPC statuses
and Triton's wording, read and tested on its own, while the client is about when to call.
"""

from __future__ import annotations

import logging

import numpy as np
from tritonclient.utils import InferenceServerException

from inception.contract import NUM_CLASSES

from .deadlines import deadline_var
from .errors import (
    ApiError,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    DeadlineExceeded,
    ModelUnavailable,
    Overloaded,
)
from .settings import Settings

log = logging.getLogger(__name__)


def status_of(exc: InferenceServerException) -> str:
    """The gRPC status Triton's client reports ("" when none)."""
    return str(exc.status() or "")


def server_unavailable() -> BackendUnavailable:
    """Triton cannot be reached: the same answer whichever call found it out."""
    return BackendUnavailable("the inference server is unavailable; retry later")


def model_unavailable(model: str) -> ModelUnavailable:
    """Triton answers, but not for this model (not loaded, or loading)."""
    return ModelUnavailable(f"model {model} is not ready on the inference server")


def map_triton_error(exc: InferenceServerException, model: str, settings: Settings) -> ApiError:
    """Triton's failure as the gateway's error; Triton's own words are logged, not returned."""
    status, message = status_of(exc), str(exc.message() or "").lower()
    if "DEADLINE_EXCEEDED" in status or "timeout expired" in message:
        # The gRPC deadline passed, or Triton's queue policy dropped the request unrun
        # once the timeout the gateway sent with it had passed.
        return BackendTimeout(f"the inference server did not answer within {settings.triton_timeout_s:g} s")
    if "RESOURCE_EXHAUSTED" in status or "queue" in message:
        return Overloaded("the inference server's queue is full; retry later")
    if "NOT_FOUND" in status or ("UNAVAILABLE" in status and "model" in message):
        return model_unavailable(model)
    if "UNAVAILABLE" in status or "CANCELLED" in status:
        return server_unavailable()
    return BackendError("the inference server could not run the request")


def deadline_passed() -> DeadlineExceeded:
    """The request's own deadline (service/deadlines.py) passed before Triton answered."""
    deadline = deadline_var.get()
    budget = f" of {deadline.budget_s:g} s" if deadline is not None else ""
    return DeadlineExceeded(f"the request's deadline{budget} passed before its answer was ready")


def checked_output(probabilities: np.ndarray | None, batch_size: int, model: str) -> np.ndarray:
    """Triton's answer as probabilities, or a 502: a missing output, a wrong shape, or a
    NaN or infinity (which JSON would carry as `null`) is the server's fault, not an answer."""
    if probabilities is None or probabilities.shape != (batch_size, NUM_CLASSES):
        shape = None if probabilities is None else probabilities.shape
        log.error("unexpected triton output", extra={"model": model, "shape": str(shape)})
        raise BackendError("the inference server answered with an unexpected output")
    if not np.isfinite(probabilities).all():
        log.error("non-finite triton output", extra={"model": model})
        raise BackendError("the inference server answered with scores that are not finite numbers")
    return probabilities.astype(np.float32, copy=False)
