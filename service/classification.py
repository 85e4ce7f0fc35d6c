"""``POST /v1/classify`` as a pipeline: one :class:`Classification` a request runs its
stages in order, holding one lease of the worker's resources (service/policy.py) from its
slot to its answer, and times each stage once (:class:`StageTimer`), into the answer's
``timing_ms``, the metrics and the trace.

The stages: a raw image body is refused at once if admission would refuse it (before a
byte of it is read) → a slot and the body's memory → **read** the body (one image, or a
batch of up to ``GATEWAY_MAX_IMAGES``) and its options → **route** (the models, their
configs from Triton, the weights that serve them) → the answer **cache**, by content (a hit
skips the rest) → admission to every model it needs, for as many images as missed, and
the crops' memory → **decode** and **preprocess** in the thread pool → **triton** (per
model, the images' crops as one batch, or in batches of ``GATEWAY_CROP_BATCH_SIZE`` when
there are several crops; the members of a per-request ensemble concurrently) →
**postprocess**: top-k and labels (service/answers.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from starlette.datastructures import Headers
from starlette.requests import Request

from . import deadlines, metrics
from .answers import build_answer, combine
from .batches import crops_buffer_bytes, infer_all
from .cache import cache_keys, cache_status, count_lookups, revalidates
from .errors import (
    ApiError,
    BackendTimeout,
    DeadlineExceeded,
    EmptyBody,
    ImageTooLarge,
    InvalidImage,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedImageFormat,
)
from .gateway import Gateway
from .imaging import Prepared, Preprocessing
from .inputs import BodyForm, Upload, media_type, read_request
from .model_config import ModelInfo
from .options import ClassifyOptions, computed_options, parse_options
from .policy import Lease
from .provenance import served_by
from .routing import Plan, metric_label, resolve
from .schemas import BatchClassifyResponse, ClassifyResponse
from .settings import Settings

#: The errors of one image of a batch, answered in its result rather than failing the
#: others: what is wrong with the image itself (undecodable, empty, too large, of a format
#: not served). Anything else (overload, deadline, Triton) fails the request, as for one.
IMAGE_ERRORS = (InvalidImage, EmptyBody, ImageTooLarge, PayloadTooLarge, UnsupportedImageFormat)
#: The answer's header saying how the cache served it.
CACHE_HEADER = "X-Cache"
#: What a body costs in memory once read, per byte on the wire: JSON holds the text, the
#: decoded bytes and the parser's copies (16 MiB of base64 JSON peaked at 80 MiB), the raw
#: and multipart forms their chunks and the joined bytes.
JSON_EXPANSION, BINARY_EXPANSION = 5, 2


class StageTimer:
    """The request's stages, each timed once as it ends into ``stages`` (a dict, or the
    trace's ``StageClock``). A stage that fails is not recorded unless asked (a refused
    decode cost CPU all the same)."""

    def __init__(self, stages: dict[str, float]) -> None:
        self.stages = stages
        self.started = time.perf_counter()

    @contextmanager
    def __call__(self, name: str, on_error: bool = False) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        except ApiError:
            if on_error:
                self.stages[name] = time.perf_counter() - started
            raise
        self.stages[name] = time.perf_counter() - started

    def timing_ms(self) -> dict[str, float]:
        timing = {k: round(v * 1000, 3) for k, v in self.stages.items()}
        timing["total"] = round((time.perf_counter() - self.started) * 1000, 3)
        return timing


class Classification:
    """One classify request, from the route's call to its answer."""

    def __init__(
        self, gateway: Gateway, request: Request, query: dict[str, Any], timeout_s: float | None
    ) -> None:
        self.gateway = gateway
        self.settings: Settings = gateway.settings
        self.request = request
        self.query = query  # the query's options, still text
        self.timeout_s = timeout_s
        state = request.state
        self.request_id: str = state.request_id
        self.timer = StageTimer(state.stages)
        # Who the client is, once: fair shares, its slots and error pacing all ask this.
        self.client = state.client = gateway.policy.client_of(
            request.headers, request.client.host if request.client else None
        )
        self.options: ClassifyOptions | None = None
        self.plan: Plan | None = None
        self.cache_status = "bypass"
        state.model_label = self.metric_label  # asked when the request ends, whatever it got to

    def metric_label(self) -> str:
        """The model label of the request's metrics, from the furthest it got: its plan, its
        options, or its query."""
        if self.plan is not None:
            return self.plan.label
        given = self.options.model_dump() if self.options is not None else self.query
        return metrics.CUSTOM_ENSEMBLE if given["models"] else metric_label(self.settings, given["model"])

    async def answer(self) -> ClassifyResponse | BatchClassifyResponse:
        gateway, settings, headers = self.gateway, self.settings, self.request.headers
        deadlines.start(self.timeout_s, settings.triton_timeout_s)
        self.shed_before_reading()
        cost = buffer_cost(headers, settings.max_body_bytes)
        # The wait for a slot counts in the total, not in a stage; the body's memory is taken
        # only with a slot, and never waited for.
        async with await gateway.policy.reserve(self.client, requests=1, body_bytes=cost) as lease:
            with self.timer("read"):
                upload = await self.read()
            options = self.options = upload.options
            plan = self.plan = resolve(settings, options.model, options.models, options.weights)
            infos = list(await asyncio.gather(*(gateway.backend.model(t) for t in plan.targets)))
            served = await served_by(gateway.backend, plan, infos)
            keys = cache_keys(settings.cache, headers, plan, served, upload.images, computed_options(options))
            found: list[np.ndarray | None] = (
                [gateway.cache.get(k) for k in keys]
                if keys and not revalidates(headers)
                else [None] * len(upload.images)
            )
            todo = [i for i, hit in enumerate(found) if hit is None]
            count_lookups(plan.label, keys, len(todo))
            computed: dict[int, np.ndarray] = {}
            failed: dict[int, ApiError] = {}
            post_started = time.perf_counter()
            if todo:
                computed, failed, post_started = await self.compute(lease, upload, infos, todo)
                if keys:
                    for index, probabilities in computed.items():
                        gateway.cache.put(keys[index], probabilities)
                metrics.CACHE_BYTES.set(gateway.cache.bytes)
        answer = build_answer(gateway, plan, served, options.top_k, upload.batch, found, computed, failed)
        answer.request_id = self.request_id
        self.timer.stages["postprocess"] = time.perf_counter() - post_started
        answer.crops = options.crops
        answer.timing_ms = self.timer.timing_ms()
        self.cache_status = cache_status(keys, len(upload.images), len(todo))
        return answer

    def shed_before_reading(self) -> None:
        """A raw image body carries its options in the query alone, so admission can refuse it
        before a byte of the body is read: past capacity refusals are most of the traffic, and
        each read body would take CPU from the requests being served. Multipart and JSON
        bodies may name another model: they are decided once read."""
        if BodyForm.of(media_type(self.request.headers)) is not BodyForm.RAW_IMAGE:
            return
        try:
            options = parse_options(self.query)
            plan = resolve(self.settings, options.model, options.models, options.weights)
        except ApiError:
            return  # the request's own error is answered on the normal path
        self.gateway.policy.refuse_if_over_capacity(list(plan.targets), options.crops, self.client)

    async def read(self) -> Upload:
        """The body, bounded in size and in time: a client that sends headers and stalls its
        body must not hold a slot for ever."""
        settings = self.settings
        body_s = body_deadline_s(self.request.headers, settings)
        try:
            async with asyncio.timeout(body_s):
                upload = await read_request(
                    self.request, self.query, settings.max_body_bytes, settings.max_images
                )
        except TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {body_s:.3g} s", headers={"Connection": "close"}
            ) from None
        self.request.state.size = sum(map(len, upload.images))
        return upload

    async def compute(
        self, lease: Lease, upload: Upload, infos: list[ModelInfo], todo: list[int]
    ) -> tuple[dict[int, np.ndarray], dict[int, ApiError], float]:
        """The images the cache did not answer: admitted, decoded, run; each image's
        probabilities, each image's own error (a batch), and when postprocessing began."""
        gateway, crops = self.gateway, upload.options.crops
        assert self.plan is not None
        # Admission before decoding: a refused request costs no CPU that admitted ones need.
        await lease.reserve(images=len(todo) * crops, models=[i.name for i in infos])
        ticket = lease.ticket
        assert ticket is not None
        pres = [p for i in infos for p in i.preprocessings]
        extra = crops_buffer_bytes(crops, pres, len(todo))
        if extra:
            await lease.reserve(body_bytes=extra)  # the crops' memory
        decode_started = time.perf_counter()
        with self.timer("decode", on_error=True):  # refused images cost too
            prepared, failed = await prepare_all(gateway, upload.images, todo, pres, crops, upload.batch)
        decode_s, preprocess_s = decode_split(prepared, time.perf_counter() - decode_started)
        self.timer.stages["decode"] = decode_s
        self.timer.stages["preprocess"] = preprocess_s
        post_started = time.perf_counter()
        # A batch whose every image failed to decode has nothing to send: each image's error
        # is its answer, and Triton is not called.
        outputs: list[list[np.ndarray]] = []
        if prepared:
            ticket.begin()
            with self.timer("triton"):
                try:
                    outputs = await deadlines.unless_disconnected(
                        self.request.receive,
                        infer_all(gateway, infos, list(prepared.values()), self.request_id, self.client),
                    )
                except (BackendTimeout, DeadlineExceeded):
                    ticket.time_out()  # a miss: it lowers the limit, as a late answer would
                    raise
            ticket.complete()
            post_started = time.perf_counter()
        computed = {
            index: combine(self.plan, [output[position] for output in outputs])
            for position, index in enumerate(prepared)
        }
        return computed, failed, post_started


async def prepare_all(
    gateway: Gateway, images: list[bytes], todo: list[int], pres: list[Preprocessing], crops: int, batch: bool
) -> tuple[dict[int, Prepared], dict[int, ApiError]]:
    """Decodes and preprocesses the images at ``todo``, as many at once as the worker has
    decode threads (so that one batch never fills the decode queue, which refuses past
    ``GATEWAY_DECODE_QUEUE``, alone). In a batch an image's own fault (:data:`IMAGE_ERRORS`)
    is its result; any other error, or any error of a single image, fails the request."""
    threads = asyncio.Semaphore(gateway.settings.decode_threads)

    async def one(index: int) -> Prepared:
        async with threads:
            if not images[index]:
                raise EmptyBody("the image carries no data")
            return await gateway.prepare(images[index], pres, crops)

    results = await asyncio.gather(*(one(i) for i in todo), return_exceptions=True)
    prepared: dict[int, Prepared] = {}
    failed: dict[int, ApiError] = {}
    for index, result in zip(todo, results, strict=True):
        if isinstance(result, Prepared):
            prepared[index] = result
        elif batch and isinstance(result, IMAGE_ERRORS):
            failed[index] = result
        else:
            raise result
    return prepared, failed


def decode_split(prepared: dict[int, Prepared], wall_s: float) -> tuple[float, float]:
    """The decode and preprocess stages: one image's own timings, or for a batch, decoded
    on several threads at once, the wall time of the whole step split as its images' time
    was, so that the two stages follow one another and fill the step (the traces draw them)."""
    if len(prepared) == 1:
        (one,) = prepared.values()
        return one.timings["decode"], one.timings["preprocess"]
    decode = sum(p.timings["decode"] for p in prepared.values())
    preprocess = sum(p.timings["preprocess"] for p in prepared.values())
    share = decode / (decode + preprocess) if decode + preprocess > 0 else 1.0
    return wall_s * share, wall_s * (1 - share)


def body_deadline_s(headers: Headers, settings: Settings) -> float:
    """The time a body may take: ``body_timeout_s``, plus its declared length (the limit when
    chunked) at ``min_body_rate_bytes_s``, so that a steady upload slower than the whole
    body in ``body_timeout_s`` (12 MiB at 1 MiB/s got 408) is served, and a stalled one is not
    kept past what its size allows (each client's slots are capped besides)."""
    try:
        declared = min(int(headers.get("content-length", "")), 2 * settings.max_body_bytes)
    except ValueError:
        declared = settings.max_body_bytes
    return settings.body_timeout_s + max(0, declared) / settings.min_body_rate_bytes_s


def buffer_cost(headers: Headers, max_body_bytes: int) -> int:
    """The bytes a request will hold, from its declared length (the limit when chunked)."""
    try:
        declared = int(headers.get("content-length", ""))
    except ValueError:
        declared = max_body_bytes
    is_json = BodyForm.of(media_type(headers)) is BodyForm.JSON
    return max(0, min(declared, 2 * max_body_bytes)) * (JSON_EXPANSION if is_json else BINARY_EXPANSION)
