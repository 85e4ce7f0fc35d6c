"""``POST /v1/classify``.

A request goes: its deadline starts → a raw image body is refused at once if admission
would refuse it (before a byte of it is read) → concurrency slot and buffer budget →
bounded read of the body and its options → routing → model configs (from Triton) →
admission to every model it needs → the crops' memory → decode and preprocess in the
thread pool → Triton (per model, its crops in batches of at most ``max_batch_size``; the
members of a per-request ensemble concurrently) → top-k and labels. Each stage is timed
into the answer and the metrics.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from starlette.datastructures import Headers

from inception.contract import PRETRAINED_PREFIX, RANDOM_INIT

from .. import deadlines, metrics
from ..batches import crops_reservation, infer_crops
from ..deps import GatewayDep, client_id, require_api_key
from ..errors import ApiError, BackendTimeout, DeadlineExceeded, RequestTimeout
from ..gateway import Gateway
from ..imaging import Prepared
from ..inputs import BodyForm, media_type, read_request
from ..model_config import ModelInfo
from ..openapi import CLASSIFY_BODY, ERROR_RESPONSES
from ..options import ClassifyQuery, parse_options
from ..routing import Plan, metric_label, resolve
from ..schemas import ClassifyResponse, Member
from ..settings import Settings

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=CLASSIFY_BODY,
    summary="Classify an image (multipart field `image`, raw image/* body, or JSON base64)",
)
async def classify(
    request: Request,
    gateway: GatewayDep,
    query: Annotated[ClassifyQuery, Query()],
    request_timeout: deadlines.TimeoutHeader = None,
) -> ClassifyResponse:
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
                data, options = await read_request(request, given, settings.max_body_bytes)
        except TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {body_s:.3g} s",
                headers={"Connection": "close"},
            ) from None
        stages["read"] = time.perf_counter() - read_started
        state.size = len(data)
        state.model_label = (
            metric_label(settings, options.model) if not options.models else metrics.CUSTOM_ENSEMBLE
        )
        plan = resolve(settings, options.model, options.models, options.weights)
        state.model_label = plan.label
        infos = list(await asyncio.gather(*(gateway.backend.model(t) for t in plan.targets)))
        # Admission before decoding: a refused request costs no CPU that admitted ones need.
        with gateway.admitted([i.name for i in infos], options.crops, client) as ticket:
            async with crops_reservation(gateway, infos, options.crops, cost, client):  # the crops' memory
                decode_started = time.perf_counter()
                try:
                    prepared = await gateway.prepare(
                        data, [p for i in infos for p in i.preprocessings], options.crops
                    )
                except ApiError:
                    stages["decode"] = time.perf_counter() - decode_started  # refused images cost too
                    raise
                stages["decode"] = prepared.timings["decode"]
                stages["preprocess"] = prepared.timings["preprocess"]
                triton_started = time.perf_counter()
                ticket.begin()
                try:
                    outputs = await deadlines.unless_disconnected(
                        request.receive, infer_all(gateway, infos, prepared, state.request_id)
                    )
                except (BackendTimeout, DeadlineExceeded):
                    ticket.time_out()  # a miss: it lowers the limit, as a late answer would
                    raise
                ticket.complete()
                post_started = time.perf_counter()
                stages["triton"] = post_started - triton_started
    answer = await _answer(gateway, plan, infos, outputs, options.top_k, state.request_id)
    stages["postprocess"] = time.perf_counter() - post_started
    answer.crops = prepared.crops
    answer.timing_ms = {k: round(v * 1000, 3) for k, v in stages.items()}
    answer.timing_ms["total"] = round((time.perf_counter() - started) * 1000, 3)
    return answer


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
    gateway: Gateway, infos: list[ModelInfo], prepared: Prepared, request_id: str
) -> list[np.ndarray]:
    """Every member of a request at once; the first failure cancels the others (a half
    answer is no answer, and Triton should not compute what nobody will read)."""
    try:
        async with asyncio.TaskGroup() as group:
            size = gateway.settings.crop_batch_size
            tasks = [
                group.create_task(infer_crops(gateway.backend, i, prepared, request_id, size)) for i in infos
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


async def _answer(
    gateway: Gateway,
    plan: Plan,
    infos: list[ModelInfo],
    outputs: list[np.ndarray],
    top_k: int,
    request_id: str,
) -> ClassifyResponse:
    """Combine, rank and label; say which weights served it, warn unless they are known
    to be trained."""
    if plan.custom:
        probabilities = np.zeros_like(outputs[0][0], dtype=np.float64)
        for coefficient, output in zip(plan.coefficients, outputs, strict=True):
            probabilities += coefficient * output[0].astype(np.float64)
        members = [
            Member(model=i.name, weight=w, weights=i.provenance)
            for i, w in zip(infos, plan.coefficients, strict=True)
        ]
        involved = infos
        provenance = combined_provenance(infos)
    else:
        probabilities = outputs[0][0]
        info = infos[0]
        members, involved = None, [info]
        if info.is_ensemble:
            member_infos = list(await asyncio.gather(*(gateway.backend.model(m) for m in info.members)))
            members = [
                Member(model=m.name, weight=w, weights=m.provenance)
                for m, w in zip(member_infos, info.member_weights, strict=True)
            ]
            involved = [info, *member_infos]
        random = any(i.random_init for i in involved)
        provenance = RANDOM_INIT if random else info.provenance
    return ClassifyResponse(
        model=plan.name,
        predictions=gateway.top_k(np.asarray(probabilities), top_k),
        weights=provenance,
        members=members,
        random_init=any(i.random_init for i in involved),
        warning=provenance_warning(involved),
        timing_ms={},
        request_id=request_id,
    )
