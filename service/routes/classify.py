"""``POST /v1/classify``.

A request goes: its deadline starts → a raw image body is refused at once if admission
would refuse it (before a byte of it is read) → concurrency slot and buffer budget →
bounded read of the body (one image, or a batch of up to ``GATEWAY_MAX_IMAGES``) and its
options → routing → model configs (from Triton) → the answer cache, by content (a hit
skips the rest) → admission to every model it needs, for as many images as missed → the
crops' memory → decode and preprocess in the thread pool → Triton (per model, the images'
crops as one batch, or in batches of ``GATEWAY_CROP_BATCH_SIZE`` when there are several
crops; the members of a per-request ensemble concurrently) → top-k and labels. Each stage
is timed into the answer and the metrics.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.datastructures import Headers

from inception.contract import PRETRAINED_PREFIX, RANDOM_INIT

from .. import deadlines, metrics
from ..batches import crops_reservation, infer_images
from ..cache import cache_key
from ..deps import GatewayDep, client_id, require_api_key
from ..errors import (
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
from ..gateway import Gateway
from ..imaging import Prepared, Preprocessing
from ..inputs import BodyForm, media_type, read_request
from ..model_config import ModelInfo
from ..openapi import CLASSIFY_BODY, ERROR_RESPONSES
from ..options import ClassifyQuery, parse_options
from ..routing import Plan, metric_label, resolve
from ..schemas import BatchClassifyResponse, ClassifyResponse, ErrorDetail, ImageResult, Member
from ..settings import Settings

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.post(
    "/classify",
    response_model=ClassifyResponse | BatchClassifyResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=CLASSIFY_BODY,
    summary="Classify an image, or a batch of up to 64 (multipart field `image`, raw image/* body, "
    "or JSON base64 `image` / `images`)",
    description="One image is answered with its predictions; several (repeated multipart `image` "
    "parts, or a JSON `images` array) with `results`, one per image in the order sent, each its "
    "predictions or its own error. Answers are cached by content unless the request says "
    "`Cache-Control: no-store`; the `X-Cache` header says `hit`, `miss`, `partial` (a batch) or "
    "`bypass`.",
)
async def classify(
    request: Request,
    response: Response,
    gateway: GatewayDep,
    query: Annotated[ClassifyQuery, Query()],
    request_timeout: deadlines.TimeoutHeader = None,
) -> ClassifyResponse | BatchClassifyResponse:
    settings = gateway.settings
    state = request.state
    stages: dict[str, float] = state.stages
    given = query.model_dump()  # the query's options, still text
    state.model_label = (
        metric_label(settings, given["model"]) if not given["models"] else metrics.CUSTOM_ENSEMBLE
    )
    started = time.perf_counter()
    deadlines.start(request_timeout, settings.triton_timeout_s)
    client = client_id(request, gateway)
    shed_before_reading(gateway, request.headers, given, client)
    cost = buffer_cost(request.headers, settings.max_body_bytes)
    # The wait for a slot counts in the total, not in a stage; the buffer budget is taken
    # only with a slot, and never waited for.
    async with gateway.slot(client), gateway.buffer(cost, client=client):
        read_started = time.perf_counter()
        try:
            # A client that sends headers and stalls its body must not hold a slot forever.
            body_s = body_deadline_s(request.headers, settings)
            async with asyncio.timeout(body_s):
                upload = await read_request(request, given, settings.max_body_bytes, settings.max_images)
        except TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {body_s:.3g} s",
                headers={"Connection": "close"},
            ) from None
        stages["read"] = time.perf_counter() - read_started
        options, images = upload.options, upload.images
        state.size = sum(map(len, images))
        state.model_label = (
            metric_label(settings, options.model) if not options.models else metrics.CUSTOM_ENSEMBLE
        )
        plan = resolve(settings, options.model, options.models, options.weights)
        state.model_label = plan.label
        infos = list(await asyncio.gather(*(gateway.backend.model(t) for t in plan.targets)))
        served = await served_by(gateway, plan, infos)
        keys = cache_keys(gateway, request.headers, plan, served, images, options.crops)
        found: list[np.ndarray | None] = (
            [gateway.cache.get(k) for k in keys]
            if keys and not revalidates(request.headers)
            else [None] * len(images)
        )
        todo = [i for i, hit in enumerate(found) if hit is None]
        count_lookups(plan.label, keys, len(todo))
        computed: dict[int, np.ndarray] = {}
        failed: dict[int, ApiError] = {}
        post_started = time.perf_counter()
        if todo:
            # Admission before decoding: a refused request costs no CPU that admitted ones need.
            with gateway.admitted([i.name for i in infos], len(todo) * options.crops, client) as ticket:
                async with crops_reservation(  # the crops' memory
                    gateway, infos, options.crops, cost, client, images=len(todo)
                ):
                    decode_started = time.perf_counter()
                    pres = [p for i in infos for p in i.preprocessings]
                    try:
                        prepared, failed = await prepare_all(
                            gateway, images, todo, pres, options.crops, upload.batch
                        )
                    except ApiError:
                        stages["decode"] = time.perf_counter() - decode_started  # refused images cost too
                        raise
                    decode_s, preprocess_s = decode_split(prepared, time.perf_counter() - decode_started)
                    stages["decode"] = decode_s
                    stages["preprocess"] = preprocess_s
                    # A batch whose every image failed to decode has nothing to send:
                    # each image's error is its answer, and Triton is not called.
                    outputs: list[list[np.ndarray]] = []
                    if prepared:
                        triton_started = time.perf_counter()
                        ticket.begin()
                        try:
                            outputs = await deadlines.unless_disconnected(
                                request.receive,
                                infer_all(gateway, infos, list(prepared.values()), state.request_id, client),
                            )
                        except (BackendTimeout, DeadlineExceeded):
                            ticket.time_out()  # a miss: it lowers the limit, as a late answer would
                            raise
                        ticket.complete()
                        post_started = time.perf_counter()
                        stages["triton"] = post_started - triton_started
            for position, index in enumerate(prepared):
                computed[index] = combine(plan, [output[position] for output in outputs])
                if keys:
                    gateway.cache.put(keys[index], computed[index])
            metrics.CACHE_BYTES.set(gateway.cache.bytes)
    answer = build_answer(gateway, plan, served, options.top_k, upload.batch, found, computed, failed)
    answer.request_id = state.request_id
    stages["postprocess"] = time.perf_counter() - post_started
    answer.crops = options.crops
    answer.timing_ms = {k: round(v * 1000, 3) for k, v in stages.items()}
    answer.timing_ms["total"] = round((time.perf_counter() - started) * 1000, 3)
    response.headers[CACHE_HEADER] = cache_status(keys, len(images), len(todo))
    return answer


#: The errors of one image of a batch, answered in its result rather than failing the
#: others: what is wrong with the image itself (undecodable, empty, too large, of a format
#: not served). Anything else (overload, deadline, Triton) fails the request, as for one.
IMAGE_ERRORS = (InvalidImage, EmptyBody, ImageTooLarge, PayloadTooLarge, UnsupportedImageFormat)
#: The answer's header saying how the cache served it.
CACHE_HEADER = "X-Cache"


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


def shed_before_reading(gateway: Gateway, headers: Headers, query: dict[str, Any], client: str) -> None:
    """A raw image body carries its options in the query alone, so admission can refuse it
    before a byte of the body is read: past capacity refusals are most of the traffic, and
    each read body would take CPU from the requests being served. Multipart and JSON
    bodies may name another model: they are decided once read."""
    if BodyForm.of(media_type(headers)) is not BodyForm.RAW_IMAGE:
        return
    try:
        options = parse_options(query)
        plan = resolve(gateway.settings, options.model, options.models, options.weights)
    except ApiError:
        return  # the request's own error is answered on the normal path
    gateway.refuse_if_over_capacity(list(plan.targets), options.crops, client)


async def infer_all(
    gateway: Gateway, infos: list[ModelInfo], prepared: list[Prepared], request_id: str, client: str = ""
) -> list[list[np.ndarray]]:
    """Every member of a request at once, each with all the images; per model, each
    image's probabilities ``[1, 1000]``. The first failure cancels the others (a half
    answer is no answer, and Triton should not compute what nobody will read). Single
    crops go as one batch of every image (at most ``max_batch_size``, which bounds the
    images of a request); several crops in batches of ``GATEWAY_CROP_BATCH_SIZE``, smaller
    while ``client`` shares the model with others (``Gateway.crop_batch``)."""

    def batch_size(info: ModelInfo) -> int | Callable[[], int]:
        if prepared[0].crops == 1:
            return 0
        return lambda: gateway.crop_batch([info.name], client)

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(infer_images(gateway.backend, i, prepared, request_id, batch_size(i)))
                for i in infos
            ]
    except* ApiError as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


#: What a body costs in memory once read, per byte on the wire: JSON holds the text, the
#: decoded bytes and the parser's copies (16 MiB of base64 JSON peaked at 80 MiB), the raw
#: and multipart forms their chunks and the joined bytes.
JSON_EXPANSION, BINARY_EXPANSION = 5, 2


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


def combined_provenance(infos: list[ModelInfo]) -> str:
    """One string for a per-request ensemble: its members' common provenance, or each
    source joined, or `random-init` if any member is (the conservative reading)."""
    kinds = {i.provenance for i in infos}
    if len(kinds) == 1:
        return kinds.pop()
    if any(i.random_init for i in infos):
        return RANDOM_INIT
    return "+".join(sorted(kinds))


def provenance_warning(involved: list[ModelInfo]) -> str | None:
    random = [i.name for i in involved if i.random_init]
    if random:
        return f"randomly initialised weights ({', '.join(random)}): the predictions carry no meaning"
    # A config that no export wrote (Triton started without --model-config-name).
    unknown = [i.name for i in involved if not i.provenance.startswith(PRETRAINED_PREFIX)]
    if unknown:
        return f"weights of unknown provenance ({', '.join(unknown)}): served from an unexported config"
    return None


@dataclass(frozen=True)
class Served:
    """What serves a request, whatever its images: the answer's provenance fields, and the
    networks whose weights compute it (the cache keys on their sha256)."""

    members: list[Member] | None
    involved: list[ModelInfo]
    provenance: str
    weights_sha256: str | None = None


def weights_digest(networks: list[ModelInfo]) -> str | None:
    """The answer's ``weights_sha256``: one network's own checkpoint sha256; for several
    (an ensemble), the sha256 of their ``name:sha256`` lines in name order, so that a client
    sees any member's rollout; None when a network's config records no sha256."""
    if not networks or not all(i.checkpoint_sha256 for i in networks):
        return None
    if len(networks) == 1:
        return networks[0].checkpoint_sha256
    lines = "".join(f"{i.name}:{i.checkpoint_sha256}\n" for i in sorted(networks, key=lambda i: i.name))
    return hashlib.sha256(lines.encode()).hexdigest()


async def served_by(gateway: Gateway, plan: Plan, infos: list[ModelInfo]) -> Served:
    """Which weights serve the plan: a per-request ensemble's members, or the model and,
    for the Triton ensemble, its members (the conservative reading of provenance)."""
    if plan.custom:
        own = [
            Member(model=i.name, weight=w, weights=i.provenance, weights_sha256=i.checkpoint_sha256 or None)
            for i, w in zip(infos, plan.coefficients, strict=True)
        ]
        return Served(own, infos, combined_provenance(infos), weights_digest(infos))
    info = infos[0]
    members: list[Member] | None = None
    involved = [info]
    if info.is_ensemble:
        member_infos = list(await asyncio.gather(*(gateway.backend.model(m) for m in info.members)))
        members = [
            Member(model=m.name, weight=w, weights=m.provenance, weights_sha256=m.checkpoint_sha256 or None)
            for m, w in zip(member_infos, info.member_weights, strict=True)
        ]
        involved = [info, *member_infos]
    random = any(i.random_init for i in involved)
    networks = [i for i in involved if not i.is_ensemble]
    return Served(members, involved, RANDOM_INIT if random else info.provenance, weights_digest(networks))


def cache_directives(headers: Headers) -> set[str]:
    return {d.strip().lower() for d in headers.get("cache-control", "").split(",")}


def revalidates(headers: Headers) -> bool:
    """``Cache-Control: no-cache`` (what a browser's ``fetch(..., {cache: "no-store"})``
    sends): no stored answer is used, as HTTP means it, but the computed one is stored."""
    return "no-cache" in cache_directives(headers)


def cache_keys(
    gateway: Gateway, headers: Headers, plan: Plan, served: Served, images: list[bytes], crops: int
) -> list[bytes]:
    """Each image's key in the answer cache (service/cache.py), or none when the answer
    is not to be cached: the cache is off, the client said ``Cache-Control: no-store``, or a
    network's weights have no sha256 to tell new weights from old. An ensemble's members
    are keyed with their weights (the Triton ensemble's from its config)."""
    networks = [i for i in served.involved if not i.is_ensemble]
    if (
        not gateway.settings.cache
        or "no-store" in cache_directives(headers)
        or not all(i.checkpoint_sha256 for i in networks)
    ):
        return []
    members = [(m.model, m.weight) for m in served.members or []]
    route = [plan.name, list(plan.targets), list(plan.coefficients), members]
    weights = [f"{i.name}:{i.checkpoint_sha256}" for i in networks]
    return [cache_key(image, route, crops, weights) for image in images]


def count_lookups(label: str, keys: list[bytes], misses: int) -> None:
    if keys:
        metrics.CACHE_HITS.labels(label).inc(len(keys) - misses)
        metrics.CACHE_MISSES.labels(label).inc(misses)


def cache_status(keys: list[bytes], images: int, misses: int) -> str:
    """``X-Cache``: every image from the cache, none, some (a batch), or the cache not used."""
    if not keys:
        return "bypass"
    return "miss" if misses == images else "hit" if misses == 0 else "partial"


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
