"""The FastAPI app: ``uvicorn service.app:app`` or ``create_app(settings)``.

A classify request goes: concurrency slot → bounded read → routing → model configs (from
Triton) → decode and preprocess in the thread pool → Triton (one call, or one per member
of a per-request ensemble, concurrently) → top-k and labels. Each stage is timed into the
answer and the metrics.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from . import __version__, metrics
from .errors import (
    ApiError,
    InternalError,
    Overloaded,
    Unauthorized,
    error_body,
    install_error_handlers,
    internal_error_response,
)
from .imaging import Prepared, Preprocessing, configure_pillow, prepare
from .inputs import read_request
from .logs import configure_logging, request_id_var
from .routing import ENSEMBLE_ALIAS, Plan, metric_label, resolve
from .schemas import (
    ClassifyJson,
    ClassifyResponse,
    ErrorResponse,
    Member,
    ModelEntry,
    ModelsResponse,
    Prediction,
    Preprocess,
)
from .settings import Settings, get_settings
from .triton import ModelInfo, TritonBackend

log = logging.getLogger("service.app")
access_log = logging.getLogger("service.access")

CLASSIFY_PATH = "/v1/classify"
#: Status and error code in the metrics and logs of a request whose client went away
#: before its body was read (nginx's convention): neither a server error nor an answer.
CLIENT_CLOSED_STATUS, CLIENT_CLOSED_CODE = 499, "client_disconnected"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def load_labels(path: Path | None) -> list[str]:
    """The ImageNet labels, one per line; the gateway refuses to start without all 1000."""
    if path is None:
        raise RuntimeError("no labels file: set GATEWAY_LABELS_PATH to inception/data/imagenet_labels.txt")
    labels = Path(path).read_text(encoding="utf-8").splitlines()
    if len(labels) != 1000:
        raise RuntimeError(f"{path} has {len(labels)} labels, expected 1000")
    return labels


class RequestContextMiddleware:
    """Request id, access log, classify metrics, and the last guard against leaked tracebacks.

    A plain ASGI middleware (not BaseHTTPMiddleware) so that the body streams through
    untouched and the request id context variable is visible to the handler.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        state: dict[str, Any] = scope.setdefault("state", {})
        state.update(request_id=request_id, stages={}, error_code=None, size=None)
        is_classify = scope.get("path") == CLASSIFY_PATH and scope.get("method") == "POST"
        if is_classify:
            state["model_label"] = metrics.UNKNOWN_MODEL
            metrics.IN_FLIGHT.inc()
        status = 500
        started_response = False
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status = int(message["status"])
                started_response = True
                message.setdefault("headers", [])
                message["headers"] = [
                    *[(k, v) for k, v in message["headers"] if k.lower() != b"x-request-id"],
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:  # the client left mid-body: no answer to send, and no bug
            state["error_code"] = CLIENT_CLOSED_CODE
            status = CLIENT_CLOSED_STATUS
        except Exception:
            log.exception("unhandled error", extra={"path": scope.get("path")})
            state["error_code"] = InternalError.code
            if not started_response:
                await internal_error_response()(scope, receive, send_with_id)
            status = 500
        finally:
            elapsed = time.perf_counter() - start
            model = state.get("model_label")
            if is_classify:
                metrics.IN_FLIGHT.dec()
                metrics.observe(
                    model or metrics.UNKNOWN_MODEL,
                    status,
                    elapsed,
                    state["stages"],
                    state["size"],
                    state["error_code"],
                )
            access_log.info(
                "request",
                extra={
                    "method": scope.get("method"),
                    "path": scope.get("path"),
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "model": model,
                    "error_code": state["error_code"],
                },
            )
            request_id_var.reset(token)


class Gateway:
    """Per-app state: Triton client, labels, thread pool, concurrency slots."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.labels = load_labels(settings.labels_path)
        self.backend = TritonBackend(settings)
        self.pool: ThreadPoolExecutor | None = None
        self.slots = asyncio.Semaphore(settings.max_concurrency)

    async def start(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=self.settings.decode_threads, thread_name_prefix="decode")
        await self.backend.start()
        log.info(
            "gateway started",
            extra={
                "triton": self.settings.triton_grpc_url,
                "models_known": ",".join(sorted(self.backend.models)) or "none yet",
                "pid": os.getpid(),
            },
        )

    async def stop(self) -> None:
        await self.backend.close()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        metrics.mark_process_dead(os.getpid())

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """A classify slot, waited for at most ``queue_timeout_s`` (then 429).

        A free slot is taken at once: ``wait_for`` with a timeout of 0 would cancel the
        acquire before it ran, refusing every request when ``queue_timeout_s`` is 0."""
        if self.slots.locked():
            try:
                await asyncio.wait_for(self.slots.acquire(), timeout=self.settings.queue_timeout_s)
            except TimeoutError:
                raise Overloaded(
                    "too many requests in flight; retry later",
                    headers={"Retry-After": str(self.settings.retry_after_overloaded_s)},
                ) from None
        else:
            await self.slots.acquire()
        try:
            yield
        finally:
            self.slots.release()

    async def prepare(self, data: bytes, pres: list[Preprocessing]) -> Prepared:
        loop = asyncio.get_running_loop()
        s = self.settings
        return await loop.run_in_executor(
            self.pool,
            lambda: prepare(
                data, pres, max_pixels=s.max_pixels, draft=s.draft, oversample=s.draft_oversample
            ),
        )

    def top_k(self, probabilities: np.ndarray, k: int) -> list[Prediction]:
        """The k best classes, by score then class id: a full stable sort of 1000 floats costs
        tens of microseconds and makes ties (common with random weights) deterministic."""
        order = np.lexsort((np.arange(probabilities.shape[0]), -probabilities))[:k]
        return [
            Prediction(label=self.labels[i], class_id=int(i), score=float(probabilities[i])) for i in order
        ]


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def require_api_key(request: Request) -> None:
    """``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` when keys are configured."""
    keys = _gateway(request).settings.api_keys
    if not keys:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not given or not any(hmac.compare_digest(given.encode(), key.encode()) for key in keys):
        raise Unauthorized("a valid API key is required", headers={"WWW-Authenticate": "Bearer"})


def _provenance(infos: list[ModelInfo]) -> str:
    kinds = {i.weights for i in infos}
    if len(kinds) == 1:
        return kinds.pop()
    if any(i.random_init for i in infos):
        return "random-init"
    return "+".join(sorted(kinds))


_CLASSIFY_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "model": {"type": "string"},
                        "top_k": {"type": "integer"},
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": ClassifyJson.model_json_schema()},
        },
    }
}

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "undecodable, truncated or empty image",
        401: "missing or wrong API key",
        404: "unknown model",
        413: "body or pixel count over the limit",
        415: "unsupported media type or image format",
        422: "bad options",
        429: "overloaded (Retry-After)",
        502: "Triton failed the request",
        503: "Triton or the model unavailable (Retry-After)",
        504: "Triton did not answer in time",
    }.items()
}


def build_router() -> APIRouter:
    """The versioned API; every route behind the API key check (when keys are set)."""
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

    @router.post(
        "/classify",
        response_model=ClassifyResponse,
        responses=_ERRORS,
        openapi_extra=_CLASSIFY_BODY,
        summary="Classify an image (multipart field `image`, raw image/* body, or JSON base64)",
    )
    async def classify(
        request: Request,
        model: str | None = Query(None, description="model name, `ensemble`, or omitted for the default"),
        models: str | None = Query(
            None, description="per-request ensemble, e.g. `inception_v4,inception_resnet_v2`"
        ),
        weights: str | None = Query(None, description="weights of `models`, e.g. `0.5,0.5`"),
        top_k: int | None = Query(None, ge=1, le=1000, description="how many classes (default 5)"),
    ) -> ClassifyResponse:
        gateway = _gateway(request)
        settings = gateway.settings
        state = request.state
        stages: dict[str, float] = state.stages
        state.model_label = metric_label(settings, model) if not models else metrics.CUSTOM_ENSEMBLE
        started = time.perf_counter()
        async with gateway.slot():  # the wait for a slot counts in the total, not in a stage
            read_started = time.perf_counter()
            query = {"model": model, "models": models, "weights": weights, "top_k": top_k}
            data, options = await read_request(request, query, settings.max_body_bytes)
            stages["read"] = time.perf_counter() - read_started
            state.size = len(data)
            state.model_label = (
                metric_label(settings, options.model) if not options.models else metrics.CUSTOM_ENSEMBLE
            )
            plan = resolve(settings, options.model, options.models, options.weights)
            state.model_label = plan.label
            infos = list(await asyncio.gather(*(gateway.backend.model(t) for t in plan.targets)))
            decode_started = time.perf_counter()
            try:
                prepared = await gateway.prepare(data, [i.preprocessing for i in infos])
            except ApiError:
                stages["decode"] = time.perf_counter() - decode_started  # refused images cost too
                raise
            stages["decode"] = prepared.timings["decode"]
            stages["preprocess"] = prepared.timings["preprocess"]
            triton_started = time.perf_counter()
            outputs = await asyncio.gather(
                *(
                    gateway.backend.infer(i.name, prepared.inputs[i.preprocessing][None], state.request_id)
                    for i in infos
                )
            )
            post_started = time.perf_counter()
            stages["triton"] = post_started - triton_started
        answer = await _answer(gateway, plan, infos, outputs, options.top_k, request)
        stages["postprocess"] = time.perf_counter() - post_started
        answer.timing_ms = {k: round(v * 1000, 3) for k, v in stages.items()}
        answer.timing_ms["total"] = round((time.perf_counter() - started) * 1000, 3)
        return answer

    @router.get("/models", response_model=ModelsResponse, responses=_ERRORS, summary="The routable models")
    async def list_models(request: Request) -> ModelsResponse:
        gateway = _gateway(request)
        settings = gateway.settings
        await gateway.backend.refresh()
        names = list(settings.models)
        ready = await asyncio.gather(*(gateway.backend.model_ready(n) for n in names))
        entries = []
        for name, is_ready in zip(names, ready, strict=True):
            info = gateway.backend.models.get(name)
            entry = ModelEntry(
                name=name,
                kind="ensemble"
                if (info and info.is_ensemble) or name == settings.ensemble_model
                else "model",
                state="ready" if is_ready and info else "unavailable",
                default=name == settings.default_model,
                aliases=[ENSEMBLE_ALIAS] if name == settings.ensemble_model else [],
            )
            if info is not None:
                pre = info.preprocessing
                entry.preprocessing = Preprocess(
                    crop_pct=pre.crop_pct, interpolation=pre.interpolation, input_size=pre.input_size
                )
                entry.weights, entry.weights_sha256 = info.weights, info.weights_sha256
                entry.max_batch_size = info.max_batch_size
                if info.is_ensemble:
                    entry.members = [
                        Member(
                            model=m,
                            weight=w,
                            weights=(
                                gateway.backend.models[m].weights
                                if m in gateway.backend.models
                                else "unknown"
                            ),
                        )
                        for m, w in zip(info.members, info.member_weights, strict=True)
                    ]
            entries.append(entry)
        return ModelsResponse(models=entries, default=settings.default_model)

    return router


async def _answer(
    gateway: Gateway,
    plan: Plan,
    infos: list[ModelInfo],
    outputs: list[np.ndarray],
    top_k: int,
    request: Request,
) -> ClassifyResponse:
    """Combine, rank and label; say which weights served it, warn on random weights."""
    if plan.custom:
        probabilities = np.zeros_like(outputs[0][0], dtype=np.float64)
        for weight, output in zip(plan.weights, outputs, strict=True):
            probabilities += weight * output[0].astype(np.float64)
        members = [
            Member(model=i.name, weight=w, weights=i.weights)
            for i, w in zip(infos, plan.weights, strict=True)
        ]
        involved = infos
    else:
        probabilities = outputs[0][0]
        info = infos[0]
        members, involved = None, [info]
        if info.is_ensemble:
            member_infos = list(await asyncio.gather(*(gateway.backend.model(m) for m in info.members)))
            members = [
                Member(model=m.name, weight=w, weights=m.weights)
                for m, w in zip(member_infos, info.member_weights, strict=True)
            ]
            involved = [info, *member_infos]
    random = [i.name for i in involved if i.random_init]
    # One string for the whole answer: a mixed per-request ensemble names every source, and
    # any random member makes the whole answer "random-init" (the conservative reading).
    provenance = _provenance(involved) if plan.custom else ("random-init" if random else infos[0].weights)
    unknown = [i.name for i in involved if not i.random_init and not i.weights.startswith("pretrained:")]
    warning = None
    if random:
        warning = f"randomly initialised weights ({', '.join(random)}): the predictions carry no meaning"
    elif unknown:
        # A config that no export wrote (Triton started without --model-config-name).
        warning = f"weights of unknown provenance ({', '.join(unknown)}): served from an unexported config"
    return ClassifyResponse(
        model=plan.name,
        predictions=gateway.top_k(np.asarray(probabilities), top_k),
        weights=provenance,
        members=members,
        random_init=bool(random),
        warning=warning,
        timing_ms={},
        request_id=request.state.request_id,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; nothing here touches Triton (the lifespan does, and tolerates its absence)."""
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.json_logs)
    configure_pillow(settings.max_pixels)
    gateway = Gateway(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(
        title="Inception gateway",
        version=__version__,
        description="Image classification with Inception-v4, Inception-ResNet-v1/v2 and their ensemble, "
        "served by Triton.",
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    install_error_handlers(app)
    app.include_router(build_router())

    @app.get("/healthz", summary="The process lives")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Triton and every routed model are ready",
        responses={503: {"model": ErrorResponse}},
    )
    async def readyz() -> JSONResponse:
        backend = gateway.backend
        server_ready, *models_ready = await asyncio.gather(
            backend.server_ready(), *(backend.model_ready(n) for n in settings.models)
        )
        if server_ready:
            await backend.refresh()
        models = {
            n: bool(r) and n in backend.models for n, r in zip(settings.models, models_ready, strict=True)
        }
        if server_ready and all(models.values()):
            return JSONResponse({"status": "ready", "triton": True, "models": models})
        body = error_body(
            "not_ready", "Triton or a routed model is not ready", triton=server_ready, models=models
        )
        return JSONResponse(
            body, status_code=503, headers={"Retry-After": str(settings.retry_after_unavailable_s)}
        )

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=True)
    async def prometheus_metrics() -> Response:
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
            max_age=600,
        )
    app.add_middleware(RequestContextMiddleware, settings=settings)
    return app


def __getattr__(name: str) -> Any:
    """``service.app:app`` built on first access, so importing the module has no side effects."""
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)


__all__ = ["ApiError", "create_app"]
