"""Liveness, readiness and metrics: unversioned, unauthenticated, for probes and scrapers."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from .. import metrics
from ..deps import GatewayDep, require_metrics_key
from ..errors import error_body
from ..openapi import METRICS_RESPONSE
from ..schemas import ErrorResponse

router = APIRouter()


@router.get("/healthz", summary="The process lives")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Triton and every routed model are ready",
    responses={503: {"model": ErrorResponse}},
)
async def readyz(gateway: GatewayDep) -> JSONResponse:
    settings, backend = gateway.settings, gateway.backend
    server_ready, *models_ready = await asyncio.gather(
        backend.server_ready(), *(backend.model_ready(n) for n in settings.models)
    )
    if server_ready:
        await backend.refresh()
    models = {n: bool(r) and n in backend.models for n, r in zip(settings.models, models_ready, strict=True)}
    if server_ready and all(models.values()):
        return JSONResponse({"status": "ready", "triton": True, "models": models})
    body = error_body(
        "not_ready", "Triton or a routed model is not ready", triton=server_ready, models=models
    )
    return JSONResponse(
        body, status_code=503, headers={"Retry-After": str(settings.retry_after_unavailable_s)}
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses=METRICS_RESPONSE,
    dependencies=[Depends(require_metrics_key)],
)
async def prometheus_metrics() -> Response:
    payload, content_type = metrics.render()
    return Response(payload, media_type=content_type)
