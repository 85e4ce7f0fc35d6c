"""The request context: request id, access log, classify metrics, the request's trace
(service/tracing.py), and the last guard against a leaked traceback.

A plain ASGI middleware (not BaseHTTPMiddleware) so that the body streams through
untouched and the request id context variable is visible to the handler.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics, tracing
from .errors import InternalError, internal_error_response
from .logs import request_id_var

log = logging.getLogger(__name__)
#: One line per request, under a name of its own rather than this module's: operators
#: filter and route the access log by it, as they do uvicorn's.
access_log = logging.getLogger("service.access")

CLASSIFY_PATH = "/v1/classify"
#: Status and error code in the metrics and logs of a request whose client went away
#: before its body was read (nginx's convention): neither a server error nor an answer.
CLIENT_CLOSED_STATUS, CLIENT_CLOSED_CODE = 499, "client_disconnected"
# Matched whole (`fullmatch`): `$` alone would let a trailing newline into the logs.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
#: The paths traced: the API, not the probes and scrapes that would bury its traces.
TRACED_PREFIX = "/v1/"


class RequestContextMiddleware:
    """Gives every request an id (the client's, when it is a sane one), echoes it, logs the
    request, records the classify metrics whatever the outcome, and, while tracing is on,
    makes the request's span and its stages' spans."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        state: dict[str, Any] = scope.setdefault("state", {})
        path = str(scope.get("path", ""))
        # The worker's tracing, built by the app's lifespan (after the fork): None while off.
        worker_tracing = tracing_of(scope) if path.startswith(TRACED_PREFIX) else None
        request_trace = None
        if worker_tracing is not None:
            headers = Headers(scope=scope)
            carrier = {k: headers[k] for k in tracing.TRACE_HEADERS if k in headers}
            request_trace = tracing.RequestTrace.start(
                worker_tracing, str(scope.get("method")), path, carrier
            )
        trace_token = tracing.active.set(worker_tracing)
        stages: dict[str, float] = tracing.StageClock() if worker_tracing is not None else {}
        state.update(request_id=request_id, stages=stages, error_code=None, size=None)
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
                MutableHeaders(scope=message)["x-request-id"] = request_id
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
            label = state.get("model_label")  # the route's label, or a function of what it got to
            model = label() if callable(label) else label
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
            tracing.active.reset(trace_token)
            if request_trace is not None:
                attributes = {"request.id": request_id, "error.code": state["error_code"], "model": model}
                try:
                    route = getattr(scope.get("route"), "path", None)  # set by the router
                    request_trace.finish(status, state["stages"], attributes, route)
                except Exception:  # a trace is never worth a failed request
                    log.exception("request trace not recorded")
            request_id_var.reset(token)


def tracing_of(scope: Scope) -> tracing.Tracing | None:
    """The tracing of the app serving the request (``app.state.tracing``), if any."""
    app = scope.get("app")
    state = getattr(app, "state", None)
    return getattr(state, "tracing", None)
