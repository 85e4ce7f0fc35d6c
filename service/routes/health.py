"""Liveness, readiness and metrics: unversioned, unauthenticated, for probes and scrapers."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from .. import metrics
from ..deps import GatewayDep, require_metrics_key
from ..errors import NotReady
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
async def readyz(gateway: GatewayDep) -> dict[str, object]:
    readiness = await gateway.backend.readiness()
    if not readiness.ready:
        raise NotReady(
            "Triton or a routed model is not ready", triton=readiness.server, models=readiness.models
        )
    return {"status": "ready", "triton": True, "models": readiness.models}


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses=METRICS_RESPONSE,
    dependencies=[Depends(require_metrics_key)],
)
async def prometheus_metrics() -> Response:
    """Rendered in a thread: merging every worker's files takes milliseconds that classify
    requests waiting on the event loop should not pay."""
    payload, content_type = await asyncio.to_thread(metrics.render)
    return Response(payload, media_type=content_type)
