"""From prepared crops to one model's answer: fill each image input of the model with the
crops of its preprocessing, send them to Triton in requests of at most ``max_batch_size``
crops, and average the crops' probabilities.

A single crop is one request of batch 1, as before. 10 crops are one request; 144 crops
are three requests (64, 64, 16) sent one after another. Sent at once they would gain
nothing on one model instance, which runs them in turn anyway, and the later ones would
wait in Triton's queue while the first runs: its queue policy drops a request queued
longer than its default timeout (30 s, which a request may shorten but not lengthen),
and on two CPU cores 64 crops of one network take about that long.

The Triton ensemble with members that crop differently takes one input per distinct
preprocessing (``image__0``, ``image__1``, ...), each filled with the crops of its own
preprocessing (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping
from contextlib import AbstractAsyncContextManager

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from inception.contract import INPUT_NAME, OUTPUT_NAME

from .crops import uses_crop_pct
from .deadlines import deadline_var, remaining_s
from .errors import BackendTimeout
from .gateway import Gateway
from .imaging import Prepared, Preprocessing
from .model_config import ModelInfo
from .triton import TritonBackend, _deadline_passed, checked_output, map_triton_error

log = logging.getLogger("service.triton")


#: What one crop costs while a request holds it: the rendered uint8 crop, the bytes the
#: Triton client copies it into, and the serialised gRPC request.
CROP_COPIES = 3


def crops_buffer_bytes(crops: int, pres: Iterable[Preprocessing]) -> int:
    """The memory a multi-crop request holds beyond its body: 144 crops of 299² RGB are
    38.6 MB, three times that while they are sent (116 MB); 10 crops 8 MB per distinct
    crop. A single crop (0.8 MB) is not counted, as before."""
    if crops == 1:
        return 0
    geometries = {(p.interpolation, p.input_size, p.crop_pct if uses_crop_pct(crops) else None) for p in pres}
    return sum(crops * size * size * 3 * CROP_COPIES for _, size, _ in geometries)


def crops_reservation(
    gateway: Gateway, infos: list[ModelInfo], crops: int
) -> AbstractAsyncContextManager[None]:
    """The crops' memory taken from the worker's buffer budget (``Gateway.buffer``) once the
    request's ``crops`` are known, i.e. after its body is read: over the budget, the
    request is shed with 429 and Retry-After like a large body."""
    cost = crops_buffer_bytes(crops, (p for i in infos for p in i.preprocessings))
    return gateway.buffer(cost) if cost else contextlib.nullcontext()


def model_inputs(info: ModelInfo, prepared: Prepared) -> dict[str, np.ndarray]:
    """Each image input of the model, filled with the crops of its preprocessing."""
    return {name: prepared.batches[pre] for name, pre in info.inputs}


def chunks(count: int, max_batch_size: int) -> list[slice]:
    """Requests of at most ``max_batch_size`` crops (all of them when there is no limit)."""
    step = max_batch_size if max_batch_size > 0 else max(count, 1)
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def mean_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """The multi-crop answer: the mean of the crops' probabilities ``[n, 1000]`` as
    ``[1, 1000]``, summed in float64 so that 144 crops lose no precision."""
    return probabilities.astype(np.float64).mean(axis=0, keepdims=True)


async def infer_crops(
    backend: TritonBackend, info: ModelInfo, prepared: Prepared, request_id: str
) -> np.ndarray:
    """One model's probabilities ``[1, 1000]`` for the prepared crops: their mean. The
    requests go one after another (see the module's docstring)."""
    tensors = model_inputs(info, prepared)
    count = next(iter(tensors.values())).shape[0]
    outputs = [
        await _infer(backend, info.name, {k: v[part] for k, v in tensors.items()}, request_id)
        for part in chunks(count, info.max_batch_size)
    ]
    return mean_probabilities(np.concatenate(outputs))


async def _infer(
    backend: TritonBackend, name: str, tensors: Mapping[str, np.ndarray], request_id: str
) -> np.ndarray:
    if list(tensors) == [INPUT_NAME]:
        return await backend.infer(name, tensors[INPUT_NAME], request_id)
    return await infer_inputs(backend, name, tensors, request_id)


async def infer_inputs(
    backend: TritonBackend, name: str, tensors: Mapping[str, np.ndarray], request_id: str
) -> np.ndarray:
    """``TritonBackend.infer`` for a model with several image inputs (the ensemble whose
    members crop differently): the same deadline (gRPC deadline and Triton request timeout
    from what remains of the request's), error mapping and output checks. It lives here
    because ``service/triton.py`` takes one input; it belongs there once that takes named
    inputs."""
    remaining = remaining_s()
    budget = backend.settings.triton_timeout_s if remaining is None else remaining
    if budget <= 0:
        raise _deadline_passed()
    inputs = []
    for input_name, batch in tensors.items():
        tensor = grpcclient.InferInput(input_name, list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(batch)
        inputs.append(tensor)
    try:
        result = await backend.client.infer(
            name,
            inputs,
            outputs=[grpcclient.InferRequestedOutput(OUTPUT_NAME)],
            request_id=request_id[:128],
            timeout=max(1, int(budget * 1e6)),
            client_timeout=budget,
        )
    except InferenceServerException as exc:
        log.warning(
            "triton call failed",
            extra={"model": name, "triton_status": str(exc.status() or ""), "triton_message": exc.message()},
        )
        error = map_triton_error(exc, name, backend.settings)
        deadline = deadline_var.get()
        if isinstance(error, BackendTimeout) and deadline is not None and deadline.client:
            error = _deadline_passed()
        raise error from None
    try:
        probabilities = result.as_numpy(OUTPUT_NAME)
    except ValueError:
        probabilities = None
    return checked_output(probabilities, next(iter(tensors.values())).shape[0], name)
