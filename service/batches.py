"""From prepared crops to one model's answer: fill each image input of the model with the
crops of its preprocessing, send them to Triton in requests of at most ``max_batch_size``
crops, and average the crops' probabilities.

A single crop is one request of batch 1, as before. More crops go in requests of at most
``GATEWAY_CROP_BATCH_SIZE`` (8 by default, and never more than ``max_batch_size``) sent
one after another: 144 crops are 18 requests. Sent at once they would gain nothing on one
model instance, which runs them in turn anyway, and the later ones would wait in Triton's
queue while the first runs: its queue policy drops a request queued longer than its
default timeout (30 s, which a request may shorten but not lengthen). Small batches let
other clients' images into Triton's queue between them: in batches of 64, a client
sending one photo behind a 144-crop request waited a whole 64-crop batch (6 s on two CPU
cores; issue 19), in batches of 8 it waits one of 8. And while other clients send to the
model, the batches shrink to what the model computes in a quarter of the latency
objective at its measured rate (``Policy.crop_batch``): a batch of 8 takes a second on
two CPU cores, so there a photo beside a 144-crop request waited that second; in slices of
one crop it waits one crop's time. A GPU computes 8 crops well within the slice, and a
request alone on its model keeps the full batches, whose throughput on a CPU is 1.6 times
that of single crops.

The Triton ensemble with members that crop differently takes one input per distinct
preprocessing (``image__0``, ``image__1``, ...), each filled with the crops of its own
preprocessing (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from .crops import uses_crop_pct
from .errors import ApiError
from .gateway import Gateway
from .imaging import Prepared, Preprocessing
from .model_config import ModelInfo
from .triton import TritonBackend

#: What one crop costs while a request holds it: the rendered uint8 crop, the bytes the
#: Triton client copies it into, and the serialised gRPC request.
CROP_COPIES = 3


def crops_buffer_bytes(crops: int, pres: Iterable[Preprocessing], images: int = 1) -> int:
    """The memory a multi-crop or multi-image request holds beyond its body: 144 crops of
    299² RGB are 38.6 MB, three times that while they are sent (116 MB); 10 crops 8 MB per
    distinct crop; a batch of images as many times its crops, one copy more for the
    concatenation of its images. A single crop of a single image (0.8 MB) is not counted,
    as before."""
    if crops * images == 1:
        return 0
    copies = CROP_COPIES + (images > 1)
    geometries = {(p.interpolation, p.input_size, p.crop_pct if uses_crop_pct(crops) else None) for p in pres}
    return sum(images * crops * size * size * 3 * copies for _, size, _ in geometries)


def model_inputs(info: ModelInfo, prepared: Prepared) -> dict[str, np.ndarray]:
    """Each image input of the model, filled with the crops of its preprocessing."""
    return {name: prepared.batches[pre] for name, pre in info.inputs}


def mean_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """The multi-crop answer: the mean of the crops' probabilities ``[n, 1000]`` as
    ``[1, 1000]``, summed in float64 so that 144 crops lose no precision."""
    return probabilities.astype(np.float64).mean(axis=0, keepdims=True)


async def infer_images(
    backend: TritonBackend,
    info: ModelInfo,
    prepared: Sequence[Prepared],
    request_id: str,
    batch_size: int | Callable[[], int] = 0,
) -> list[np.ndarray]:
    """One model's probabilities ``[1, 1000]`` for each prepared image: the mean of its
    crops. The images' crops go together, one image after another, in requests of at most
    ``batch_size`` crops (0: the model's ``max_batch_size``; a function: asked before each
    request, so that the batches follow the model's load), sent one after another (see the
    module's docstring): a batch of single crops is one Triton request."""
    tensors = {
        name: np.concatenate([p.batches[pre] for p in prepared])
        if len(prepared) > 1
        else prepared[0].batches[pre]
        for name, pre in info.inputs
    }
    count = next(iter(tensors.values())).shape[0]
    parts, start = [], 0
    while start < count:
        wanted = batch_size() if callable(batch_size) else batch_size
        limits = [b for b in (wanted, info.max_batch_size) if b > 0]
        stop = min(count, start + min(limits)) if limits else count  # no limit: all of them
        parts.append(
            await backend.infer(info.name, {k: v[start:stop] for k, v in tensors.items()}, request_id)
        )
        start = stop
    outputs = np.concatenate(parts)
    _, pre = info.inputs[0]
    ends = np.cumsum([p.batches[pre].shape[0] for p in prepared])
    return [mean_probabilities(rows) for rows in np.split(outputs, ends[:-1])]


async def infer_all(
    gateway: Gateway, infos: list[ModelInfo], prepared: list[Prepared], request_id: str, client: str = ""
) -> list[list[np.ndarray]]:
    """Every member of a request at once, each with all the images; per model, each
    image's probabilities ``[1, 1000]``. The first failure cancels the others (a half
    answer is no answer, and Triton should not compute what nobody will read). Single
    crops go as one batch of every image (at most ``max_batch_size``, which bounds the
    images of a request); several crops in batches of ``GATEWAY_CROP_BATCH_SIZE``, smaller
    while ``client`` shares the model with others (``Policy.crop_batch``)."""

    def batch_size(info: ModelInfo) -> int | Callable[[], int]:
        if prepared[0].crops == 1:
            return 0
        return lambda: gateway.policy.crop_batch([info.name], client)

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(infer_images(gateway.backend, i, prepared, request_id, batch_size(i)))
                for i in infos
            ]
    except* ApiError as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]
