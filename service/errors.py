"""Every error the gateway answers, and the one place that turns them into HTTP.

Handlers raise :class:`ApiError` subclasses; :func:`install_error_handlers` maps them, and
FastAPI's own validation and routing errors, to ``{"error": {"code", "message"}}`` with the
right status and headers. Unexpected exceptions become a bare 500 whose body says nothing
about the code (the traceback goes to the log with the request id, never to the client).

``Retry-After`` is written here only: every 429 and 503 carries one, the error's own
seconds where it knows when to come back (the backlog's drain time of an over-capacity
refusal) and else the operator's setting for its status.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    """An error with a stable machine-readable code; the message is safe to show a client."""

    status: int = 500
    code: str = "internal_error"
    #: The error is about the service (it ran out of something of its own), though its
    #: status is a 4xx: error pacing (service/policy/ledger.py) holds only what the client's own
    #: traffic causes, its mistakes and its excess, never the service's state.
    service_side: bool = False

    @property
    def clients_own(self) -> bool:
        """A client mistake or the client's own excess: every 4xx but the service's own."""
        return 400 <= self.status < 500 and not self.service_side

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: int | None = None,
        headers: dict[str, str] | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        #: When the client should come back, if the error knows better than the setting.
        self.retry_after_s = retry_after_s
        self.headers = headers or {}
        self.details = details


class InvalidImage(ApiError):
    status, code = 400, "invalid_image"


class EmptyBody(ApiError):
    status, code = 400, "empty_body"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class UnknownModel(ApiError):
    status, code = 404, "unknown_model"


class NotFound(ApiError):
    status, code = 404, "not_found"


class MethodNotAllowed(ApiError):
    status, code = 405, "method_not_allowed"


class BadHttp(ApiError):
    """Bytes that are not an HTTP/1.1 request: answered by the connection itself
    (service/protocol.py), before any route runs."""

    status, code = 400, "bad_http"


class RequestTimeout(ApiError):
    """The body did not arrive in time: the slot it held goes to someone else."""

    status, code = 408, "request_timeout"


class HeaderTimeout(ApiError):
    """The request's headers did not arrive in time: the connection is closed, so that a
    client trickling its headers cannot hold a connection (service/protocol.py)."""

    status, code = 408, "header_timeout"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class ImageTooLarge(ApiError):
    status, code = 413, "image_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class UnsupportedImageFormat(ApiError):
    status, code = 415, "unsupported_image_format"


class InvalidRequest(ApiError):
    status, code = 422, "invalid_request"


class HeadersTooLarge(ApiError):
    """More header bytes or header lines than a worker accepts (service/protocol.py)."""

    status, code = 431, "headers_too_large"


class Overloaded(ApiError):
    """The worker as a whole is at a limit of its own (its slots, its buffer or memory
    budget, its decode queue) or Triton's queue is full: the service's state, not the
    client's doing, so never paced; 429 with the operator's Retry-After (see README, "429 or
    503")."""

    status, code = 429, "overloaded"
    service_side = True


class ClientOverloaded(Overloaded):
    """This client holds its most requests in flight (``GATEWAY_MAX_CONCURRENCY_PER_CLIENT``):
    its own excess, paced like its mistakes."""

    service_side = False


class OverShare(ApiError):
    """Admission control refused a client that would hold more than its fair share of a
    model while other clients are served: 429, the client's own excess (paced when it
    resends without waiting), as against 503 ``over_capacity``, the service over capacity
    for everyone (never paced, so that a polite client at any load is refused at once)."""

    status, code = 429, "over_share"


class BackendError(ApiError):
    status, code = 502, "backend_error"


class BackendUnavailable(ApiError):
    status, code = 503, "backend_unavailable"


class ModelUnavailable(ApiError):
    status, code = 503, "model_unavailable"


class NotReady(ApiError):
    """Triton or a routed model is not ready: the answer of ``/readyz``, for probes."""

    status, code = 503, "not_ready"


class TemporarilyUnavailable(ApiError):
    """The gateway itself cannot take the request now (a resource of its own ran out)."""

    status, code = 503, "temporarily_unavailable"


class OverCapacity(ApiError):
    """Admission control refused the request: it would not be answered within the latency
    objective or its own deadline. Refused at once, with the time the backlog takes to
    drain as Retry-After, instead of queued until it times out."""

    status, code = 503, "over_capacity"


class TooManyConnections(ApiError):
    """The worker holds as many connections as it accepts (all of them, or all of one
    client's): the new one is answered and closed before a byte is read."""

    status, code = 503, "too_many_connections"


class BackendTimeout(ApiError):
    status, code = 504, "backend_timeout"


class DeadlineExceeded(ApiError):
    """The request's own deadline (X-Request-Timeout) passed before its answer was ready."""

    status, code = 504, "deadline_exceeded"


class InternalError(ApiError):
    status, code = 500, "internal_error"


def error_body(code: str, message: str, **details: Any) -> dict[str, Any]:
    """The JSON body of every error answer."""
    error: dict[str, Any] = {"code": code, "message": message}
    error.update(details)
    return {"error": error}


def error_headers(exc: ApiError, retry_after_s: Mapping[int, int] | None = None) -> dict[str, str]:
    """The headers of the answer to an :class:`ApiError`: its own, and ``Retry-After``, the
    error's own seconds or else ``retry_after_s`` of its status."""
    headers = dict(exc.headers)
    retry = exc.retry_after_s if exc.retry_after_s is not None else (retry_after_s or {}).get(exc.status)
    if retry is not None:
        headers["Retry-After"] = str(retry)
    return headers


def error_response(exc: ApiError, retry_after_s: Mapping[int, int] | None = None) -> JSONResponse:
    """The HTTP answer to an :class:`ApiError`: its body, status and headers."""
    return JSONResponse(
        error_body(exc.code, exc.message, **exc.details),
        status_code=exc.status,
        headers=error_headers(exc, retry_after_s),
    )


def raw_error_response(exc: ApiError, retry_after_s: Mapping[int, int] | None = None) -> bytes:
    """The same answer as :func:`error_response`, as the bytes of a whole HTTP/1.1 response
    that closes the connection: for the connection's own refusals (service/protocol.py),
    written before any request exists for the app to answer."""
    response = error_response(exc, retry_after_s)
    head = [f"HTTP/1.1 {exc.status} {HTTPStatus(exc.status).phrase}".encode()]
    head += [k + b": " + v for k, v in response.raw_headers if k.lower() != b"connection"]
    head.append(b"connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + response.body


def internal_error_response() -> JSONResponse:
    """What a client sees of a bug: a code and nothing else."""
    return error_response(InternalError("internal error; the request id identifies it in the logs"))


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(
    app: FastAPI,
    retry_after_s: Mapping[int, int],
    hold: Callable[[Request, ApiError], Awaitable[object]] | None = None,
) -> None:
    """Route every error FastAPI or the handlers raise through :func:`error_response`;
    ``retry_after_s`` is the operator's Retry-After by status (429 and 503). ``hold`` may
    delay an answer before it is sent (service/policy/ledger.py): here, once the route has given
    back every slot and budget it held."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        request.state.error_code = exc.code
        if hold is not None:
            await hold(request, exc)
        return error_response(exc, retry_after_s)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return await on_api_error(request, InvalidRequest(_validation_message(exc)))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        mapped: ApiError
        if exc.status_code == 404:
            mapped = NotFound(f"no route {request.url.path}")
        elif exc.status_code == 405:
            mapped = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
        else:
            mapped = ApiError(str(exc.detail))
            mapped.status, mapped.code = exc.status_code, "http_error"
        if exc.headers:
            mapped.headers.update(exc.headers)
        return await on_api_error(request, mapped)

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
