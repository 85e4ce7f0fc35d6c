"""Dependencies of the routes: the app's gateway state and the API-key check."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from . import metrics
from .errors import ApiError, Unauthorized
from .gateway import Gateway


def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


Authorization = Annotated[str, Header(include_in_schema=False)]


def given_key(authorization: str, x_api_key: str) -> str:
    """The API key a request carries, ``Authorization: Bearer <key>`` first ("" if none)."""
    bearer = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
    return bearer or x_api_key


def client_id(request: Request, gateway: Gateway) -> str:
    """Who a request comes from, for fair shares: its API key (hashed, never kept) when
    keys are on, else its address, which uvicorn takes from ``X-Forwarded-For`` when the
    peer is a trusted proxy (``--proxy-headers --forwarded-allow-ips``, README)."""
    if gateway.settings.api_keys:
        key = given_key(request.headers.get("authorization", ""), request.headers.get("x-api-key", ""))
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    return "addr:" + (request.client.host if request.client else "unknown")


def require_api_key(
    gateway: GatewayDep, authorization: Authorization = "", x_api_key: Authorization = ""
) -> None:
    """``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` when keys are configured,
    compared in constant time so that a key cannot be guessed by timing."""
    keys = gateway.settings.api_keys
    if not keys:
        return
    given = given_key(authorization, x_api_key)
    if not given or not any(hmac.compare_digest(given.encode(), key.encode()) for key in keys):
        raise Unauthorized("a valid API key is required", headers={"WWW-Authenticate": "Bearer"})


def require_metrics_key(
    gateway: GatewayDep, authorization: Authorization = "", x_api_key: Authorization = ""
) -> None:
    """/metrics behind the keys too when the operator asks (GATEWAY_METRICS_REQUIRE_KEY):
    open by default, so that the shipped Prometheus configurations scrape it."""
    if gateway.settings.metrics_require_key:
        require_api_key(gateway, authorization, x_api_key)


#: Paths whose errors are never held: the probes and the scrape, whose callers (a kubelet,
#: Prometheus) must hear at once that the gateway is not ready.
UNPACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def paced(exc: ApiError, path: str) -> bool:
    """The errors a client's own traffic causes: its mistakes, and its excess (its most
    requests in flight, more than its fair share: 429); never a 5xx, the service's state
    (over capacity, Triton down or slow), which a client that honours Retry-After meets too
    and must hear at once."""
    if path in UNPACED_PATHS:
        return False
    return exc.clients_own


async def hold_error(request: Request, exc: ApiError) -> None:
    """Holds an error answer while its client is past its error budget (service/pacing.py)."""
    if not paced(exc, request.url.path):
        return
    gateway = get_gateway(request)
    if await gateway.pacer.hold(client_id(request, gateway)):
        metrics.ERRORS_HELD.inc()
