"""A request body read whole within a byte limit: a declared ``Content-Length`` over the
limit is refused before a byte is read, and a streamed body as soon as it passes the limit,
so a client cannot make the gateway buffer more than the limit.

Apart from the forms (:mod:`service.inputs`) because the JSON form (:mod:`service.json_body`)
and the multipart parser's stream share it, whatever they parse.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import Request

from .errors import InvalidRequest, PayloadTooLarge

#: Room for the multipart boundaries and option fields beside the image.
MULTIPART_OVERHEAD = 64 * 1024

Message = MutableMapping[str, Any]


def too_large(limit: int) -> PayloadTooLarge:
    """The one 413 of an over-limit body, whichever form or check found it."""
    return PayloadTooLarge(f"the request body is larger than {limit} bytes", limit=limit)


def bounded_receive(
    receive: Callable[[], Awaitable[Message]], limit: int
) -> Callable[[], Awaitable[Message]]:
    """An ASGI ``receive`` that raises 413 once more than ``limit`` body bytes came in."""
    received = 0

    async def wrapped() -> Message:
        nonlocal received
        message = await receive()
        if message.get("type") == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large(limit)
        return message

    return wrapped


def check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise InvalidRequest("bad Content-Length") from None
        if length > limit:
            raise too_large(limit)


async def read_body(request: Request, limit: int, check: Callable[[bytes], None] | None = None) -> bytes:
    """The whole body, refused (413) as soon as it is over ``limit``, or as soon as ``check``
    raises on a chunk as it arrives."""
    check_declared_length(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        if check is not None:
            check(chunk)
        chunks.append(chunk)
    return b"".join(chunks)
