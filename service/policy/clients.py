"""Who a request comes from, resolved once per request (``Classification``) and asked by
everything per client: fair shares, the client's slots and bytes, error pacing. Its API
key, hashed, when keys are on, else its address (uvicorn takes it from ``X-Forwarded-For``
when the peer is a trusted proxy: ``--proxy-headers --forwarded-allow-ips``, README). The
connection limits (service/protocol.py) count TCP peers instead: they act before a
request, and so before a key, exists."""

from __future__ import annotations

import hashlib

from starlette.datastructures import Headers


def given_key(authorization: str, x_api_key: str) -> str:
    """The API key a request carries, ``Authorization: Bearer <key>`` first ("" if none)."""
    bearer = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
    return bearer or x_api_key


def client_of(headers: Headers, peer: str | None, keyed: bool) -> str:
    """Who a request comes from: its API key (hashed, never kept) when keys are on
    (``keyed``), else its address."""
    if keyed:
        key = given_key(headers.get("authorization", ""), headers.get("x-api-key", ""))
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    return "addr:" + (peer or "unknown")
