"""Dependencies of the routes: the app's gateway state and the API-key check.

All ``async def``, though none of them waits: FastAPI runs a plain ``def`` dependency in
its thread pool, a hand-off to another thread and back for each one on every request, and
that hand-off cost more CPU than the check itself (bench/README.md, "The gateway's own
cost per image")."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from .errors import Unauthorized
from .gateway import Gateway
from .policy import given_key


async def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


Authorization = Annotated[str, Header(include_in_schema=False)]


async def require_api_key(
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


async def require_metrics_key(
    gateway: GatewayDep, authorization: Authorization = "", x_api_key: Authorization = ""
) -> None:
    """/metrics behind the keys too when the operator asks (GATEWAY_METRICS_REQUIRE_KEY):
    open by default, so that the shipped Prometheus configurations scrape it."""
    if gateway.settings.metrics_require_key:
        await require_api_key(gateway, authorization, x_api_key)
