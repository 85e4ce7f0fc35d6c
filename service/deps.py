"""Dependencies of the routes: the app's gateway state and the API-key check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from .errors import Unauthorized
from .gateway import Gateway


def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def require_api_key(
    gateway: GatewayDep,
    authorization: Annotated[str, Header(include_in_schema=False)] = "",
    x_api_key: Annotated[str, Header(include_in_schema=False)] = "",
) -> None:
    """``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` when keys are configured;
    compared in constant time so that a key cannot be guessed by timing."""
    keys = gateway.settings.api_keys
    if not keys:
        return
    bearer = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
    given = bearer or x_api_key
    if not given or not any(hmac.compare_digest(given.encode(), key.encode()) for key in keys):
        raise Unauthorized("a valid API key is required", headers={"WWW-Authenticate": "Bearer"})
