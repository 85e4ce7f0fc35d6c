"""Bounded HTTP/1.1 connections: the uvicorn protocol every way of running the gateway uses
(``--http service.protocol:BoundedH11Protocol``, in ``embedded/gateway.py`` and the image's
entrypoint).

uvicorn's default parser (httptools) has no limit on a header's size and no deadline for
the headers, and joins a header's pieces in quadratic time on the event loop: one 64 MiB
header held a worker's loop for 4.8 s, and 1,000 connections holding 1 MiB of unfinished
headers each OOM-killed a worker of a 1 GiB pod. h11 parses in linear time and bounds its
buffer; on top of it this protocol bounds, per request, the header bytes
(``GATEWAY_MAX_HEADER_BYTES``), the header lines (``GATEWAY_MAX_HEADER_COUNT``) and the time
the headers may take (``GATEWAY_HEADER_TIMEOUT_S``), and per worker the connections it holds
(``GATEWAY_MAX_CONNECTIONS``, and from one peer address ``GATEWAY_MAX_CONNECTIONS_PER_PEER``).
What breaks a bound is counted as the bytes arrive, before the parser buffers them, and
answered with the gateway's JSON error (431, 408, 400 or 503 with Retry-After) before the
connection is closed: the other connections pay nothing for it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from . import metrics
from .errors import ApiError, BadHttp, HeadersTooLarge, HeaderTimeout, TooManyConnections, raw_error_response
from .settings import get_settings

#: End of a request's head.
_HEAD_END = b"\r\n\r\n"


@dataclass(frozen=True)
class Limits:
    """The bounds of one worker's connections, from the settings."""

    header_bytes: int
    header_count: int
    header_timeout_s: float
    connections: int
    connections_per_peer: int
    retry_after_s: dict[int, int]
    refusal_pause_s: float


@lru_cache(maxsize=1)
def limits() -> Limits:
    s = get_settings()
    return Limits(
        s.max_header_bytes,
        s.max_header_count,
        s.header_timeout_s,
        s.max_connections,
        s.max_connections_per_peer,
        s.retry_after_s,
        s.error_pause_s if s.error_rate_per_s > 0 else 0.0,
    )


#: Connections this worker holds per peer address.
_per_peer: Counter[str] = Counter()
#: Connections refused for their number whose refusal is held (``refuse_later``): held apart
#: from the worker's connections, so that an attacker's cannot fill its count, and at most
#: as many as it may hold.
_held = 0


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with bounded headers and connections (see the module)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits()
        # h11's own bound is a backstop above ours, so that ours answers first.
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=2 * self.limits.header_bytes)
        self.peer: str | None = None
        self.head_bytes = 0
        self.head_lines = 0
        self.head_tail = b""
        self.header_timer: asyncio.TimerHandle | None = None
        self.hold_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.peer = self.client[0] if self.client else None
        if self.peer is not None:
            _per_peer[self.peer] += 1
        if len(self.connections) - _held > self.limits.connections:
            refused = TooManyConnections("the gateway holds too many connections; retry later")
            self.refuse_later(refused, "connections")
        elif (
            self.peer is not None
            and self.limits.connections_per_peer
            and _per_peer[self.peer] > self.limits.connections_per_peer
        ):
            self.refuse_later(
                TooManyConnections("too many connections from this address; retry later"), "peer_connections"
            )
        else:
            self.arm_header_timer()

    def refuse_later(self, error: ApiError, reason: str) -> None:
        """A refusal for the number of connections, answered after ``refusal_pause_s`` (the
        error pacing's pause, service/pacing.py) with nothing read meanwhile. Refused at
        once, a client keeping 800 connections open reopened the refused ones as fast as
        they closed, 1,400 a second, and their accepting and closing took half a core from
        inference; held, it gets them back at the pause's pace. Past as many held as the
        worker may hold connections, the refusal is at once."""
        global _held
        if self.limits.refusal_pause_s <= 0 or _held >= self.limits.connections:
            self.refuse(error, reason)
            return
        _held += 1
        self.transport.pause_reading()
        self.hold_timer = self.loop.call_later(self.limits.refusal_pause_s, self.release, error, reason)

    def release(self, error: ApiError, reason: str) -> None:
        self.unhold()
        self.refuse(error, reason)

    def unhold(self) -> None:
        global _held
        if self.hold_timer is not None:
            self.hold_timer.cancel()
            self.hold_timer = None
            _held -= 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.unhold()
        self.disarm_header_timer()
        if self.peer is not None:
            _per_peer[self.peer] -= 1
            if _per_peer[self.peer] <= 0:
                del _per_peer[self.peer]
            self.peer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:  # a request's head is arriving
            self.arm_header_timer()
            if not self.count_head(data):
                return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is whole: its bounds are met
            self.disarm_header_timer()
            self.head_bytes = self.head_lines = 0
            self.head_tail = b""

    def count_head(self, data: bytes) -> bool:
        """Counts the head's bytes and lines in ``data`` (up to its end); False, once the
        client is answered, when they break a bound."""
        seen = self.head_tail + data
        end = seen.find(_HEAD_END)
        head = data if end < 0 else data[: max(0, end + len(_HEAD_END) - len(self.head_tail))]
        self.head_tail = seen[-(len(_HEAD_END) - 1) :]
        self.head_bytes += len(head)
        self.head_lines += head.count(b"\n")
        # Lines: the request line, the headers and the empty line ending the head.
        if self.head_bytes > self.limits.header_bytes:
            message = f"the request's headers are larger than {self.limits.header_bytes} bytes"
        elif self.head_lines > self.limits.header_count + 2:
            message = f"the request has more than {self.limits.header_count} headers"
        else:
            return True
        self.refuse(HeadersTooLarge(message), "headers_too_large")
        return False

    def arm_header_timer(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.limits.header_timeout_s, self.header_timed_out)

    def disarm_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def header_timed_out(self) -> None:
        self.header_timer = None
        if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE:
            timeout = self.limits.header_timeout_s
            self.refuse(HeaderTimeout(f"the headers did not arrive within {timeout:g} s"), "timeout")

    def timeout_keep_alive_handler(self) -> None:
        """An idle keep-alive connection closes as uvicorn closes it; its header deadline,
        armed for the next request, goes with it."""
        self.disarm_header_timer()
        super().timeout_keep_alive_handler()

    def send_400_response(self, msg: str) -> None:
        """What h11 cannot parse, as the gateway's JSON error rather than uvicorn's text."""
        self.refuse(BadHttp(f"not a valid HTTP/1.1 request: {msg}"), "bad_http")

    def refuse(self, error: ApiError, reason: str) -> None:
        """Answers ``error`` and closes the connection; nothing more is read from it."""
        self.disarm_header_timer()
        metrics.CONNECTIONS_REFUSED.labels(reason).inc()
        if not self.transport.is_closing():
            self.transport.write(raw_error_response(error, self.limits.retry_after_s))
            self.transport.close()
