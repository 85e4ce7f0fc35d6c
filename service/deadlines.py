"""Deadlines end to end, and no work for clients that have gone.

A request's deadline is the earlier of the client's own (``X-Request-Timeout: <seconds>``,
the HTTP form of gRPC's ``grpc-timeout``) and the gateway's round-trip limit
(``GATEWAY_TRITON_TIMEOUT_S``), counted from its arrival. It lives in a context variable
so that every Triton call of the request, however deep, sends what remains of it: as the
call's gRPC deadline, and as Triton's own request timeout, so that Triton's queue policy
drops a request whose client will no longer read the answer (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Header
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from .errors import InvalidRequest

T = TypeVar("T")

HEADER = "X-Request-Timeout"
#: The shortest deadline a client may give: no answer, not even a refusal, comes back sooner
#: than a millisecond, so a shorter one (``5e-324``) is a mistake, refused with 422 before any
#: work rather than decoded and then answered 504.
MIN_TIMEOUT_S = 0.001
DESCRIPTION = (
    "the client's deadline in seconds: a request that cannot be answered within it is refused "
    "at once (503) or ends with 504; Triton drops it from its queue once it passes"
)
#: Validated by FastAPI; documented by hand (service/openapi.py), because the schema
#: FastAPI derives from an optional parameter admits null, which no header can carry.
TimeoutHeader = Annotated[float | None, Header(alias=HEADER, gt=0, include_in_schema=False)]
#: The header as OpenAPI describes it.
PARAMETER = {
    "name": HEADER,
    "in": "header",
    "required": False,
    "schema": {"type": "number", "minimum": MIN_TIMEOUT_S},
    "description": DESCRIPTION,
}


@dataclass(frozen=True)
class Deadline:
    at: float  # time.monotonic() by which the answer is due
    budget_s: float
    client: bool  # the client's own deadline, shorter than the gateway's limit


#: The current request's deadline (None outside a request).
deadline_var: ContextVar[Deadline | None] = ContextVar("deadline", default=None)


def start(client_timeout_s: float | None, ceiling_s: float) -> Deadline:
    """Starts the current request's clock: the client's budget, if it gave one, capped by
    the gateway's own limit."""
    if client_timeout_s is not None and (not math.isfinite(client_timeout_s) or client_timeout_s <= 0):
        raise InvalidRequest(f"{HEADER} must be a positive number of seconds")
    if client_timeout_s is not None and client_timeout_s < MIN_TIMEOUT_S:
        raise InvalidRequest(
            f"{HEADER} of {client_timeout_s:g} s cannot be met: "
            f"no answer comes sooner than {MIN_TIMEOUT_S:g} s"
        )
    client = client_timeout_s is not None and client_timeout_s < ceiling_s
    budget = client_timeout_s if client_timeout_s is not None and client else ceiling_s
    deadline = Deadline(time.monotonic() + budget, budget, client)
    deadline_var.set(deadline)
    return deadline


def remaining_s() -> float | None:
    """Seconds left to the current request (negative once past), or None outside one."""
    deadline = deadline_var.get()
    return None if deadline is None else deadline.at - time.monotonic()


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has closed the connection. Called after the body has been
    read, when the server has nothing else to deliver but the disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """``work``'s result, or its cancellation (and ClientDisconnect, answered 499) as soon
    as the client goes away: cancelling a gRPC call cancels it in Triton, which drops it
    from its queue."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientDisconnect()
