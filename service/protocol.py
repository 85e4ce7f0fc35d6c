"""Bounded HTTP/1.1 connections: the uvicorn protocol every way of running the gateway uses
(``--http service.protocol:BoundedH11Protocol``, in ``embedded/gateway.py`` and the image's
entrypoint).

uvicorn's default parser (httptools) has no limit on a header's size and no deadline for
the headers, and joins a header's pieces in quadratic time on the event loop: one 64 MiB
header held a worker's loop for 4.8 s, and 1,000 connections holding 1 MiB of unfinished
headers each OOM-killed a worker of a 1 GiB pod. h11 parses in linear time and bounds its
buffer. Each refusal here is the gateway's JSON error (431, 408, 400, or 503 with
Retry-After), written before the connection is closed; the other connections pay nothing.

uvicorn's own options were weighed first (uvicorn 0.55, h11 0.16); each would change what a
client sees, so this protocol keeps what they cannot do:

- ``--limit-concurrency`` answers uvicorn's 503, ``text/plain`` "Service Unavailable" with
  no Retry-After, and only once a request's head is parsed (``H11Protocol.handle_events``):
  a connection that sends nothing is never refused, a keep-alive client already in is
  refused mid-session, and every connection counts, the refusals held here included, so
  held refusals would turn everyone's requests into 503s. It is per worker (each worker
  runs its own ``Server``), like ours. Not set: ``GATEWAY_MAX_CONNECTIONS`` and
  ``GATEWAY_MAX_CONNECTIONS_PER_PEER`` (no such option in uvicorn) refuse at accept, with
  the JSON 503 and Retry-After, and count held refusals apart.
- ``--h11-max-incomplete-event-size`` sets h11's bound on an unfinished event; uvicorn
  answers a breach with a plain-text 400 (h11's hint of 431 is dropped), and h11 checks it
  only while an event is unfinished after a read, so a whole head larger than the bound in
  one read passes (a 120 kB head passed a 16 KiB bound), and it counts no lines. The value
  given is honoured for what the gateway does not count (chunk-size lines, trailers); for
  heads it is raised to ``GATEWAY_MAX_HEADER_BYTES``, so that h11 never cuts a head the
  gateway admits and the count here, exact and before buffering, answers 431.
- Headers have no deadline in uvicorn: its keep-alive timeout is armed only after a
  response, so a connection that sends nothing, or trickles a head, is held for ever;
  ``GATEWAY_HEADER_TIMEOUT_S`` bounds it here (408).
- What h11 cannot parse, uvicorn answers in plain text; here it is the JSON 400.

A head is counted by its parser (:class:`BoundedHeads`), which knows where each head
starts: a pipelined head behind another request's body too, which a count of what arrives
between requests misses (it let a request of 500 headers through behind a good one).

The bounds and the counts of one worker are one ``WorkerConnections``
(service/connections.py), in the state uvicorn hands every connection of that worker.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from . import metrics
from .connections import Limits, WorkerConnections
from .errors import ApiError, BadHttp, HeadersTooLarge, HeaderTimeout, raw_error_response

#: The end of a head as h11 finds it (h11/_receivebuffer.py): a bare LF ends lines too.
_HEAD_END = re.compile(b"\n\r?\n")
#: Bytes of one scan kept for the next, so that a head's end split between reads is found.
_TAIL = 2


class BoundedHeads(h11.Connection):
    """h11's server side with each request head's bytes and lines counted. A head is
    awaited from the connection's start, and again from the end of each request's body:
    what h11 holds past a body, or what arrives before the answer, is the next request's
    head (HTTP/1.1 pipelining), which h11 parses without another read once the answer is
    sent. Each read is counted (:meth:`count`) before h11 is given it, by the protocol,
    which answers a breach itself rather than through uvicorn's warning for a bad request;
    what h11 holds past a body is counted here. Past a bound :attr:`breach` says which,
    and h11 is not let parse the head."""

    def __init__(self, limits: Limits, max_incomplete_event_size: int | None = None) -> None:
        """``max_incomplete_event_size``: uvicorn's option, if given (see the module)."""
        given = max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        super().__init__(h11.SERVER, max(given, limits.header_bytes))
        self.limits = limits
        self.counting = True  # the bytes arriving are a head's
        self.head_bytes = 0
        self.head_lines = 0
        self.tail = b""
        self.breach: str | None = None

    def count(self, data: bytes) -> bool:
        """Counts what of ``data`` belongs to the head awaited, if one is; False past a
        bound (then and from then on)."""
        if self.breach is not None:
            return False
        if not self.counting or not data:
            return True
        seen = self.tail + data
        end = _HEAD_END.search(seen)
        head = data if end is None else data[: end.end() - len(self.tail)]
        self.tail = seen[-_TAIL:] if end is None else b""
        self.counting = end is None
        self.head_bytes += len(head)
        # Lines: the request line, the headers and the empty line ending the head.
        self.head_lines += head.count(b"\n")
        if self.head_bytes > self.limits.header_bytes:
            self.breach = f"the request's headers are larger than {self.limits.header_bytes} bytes"
        elif self.head_lines > self.limits.header_count + 2:
            self.breach = f"the request has more than {self.limits.header_count} headers"
        return self.breach is None

    def next_event(self) -> Any:
        if self.breach is not None and self.their_state is h11.IDLE:
            raise h11.RemoteProtocolError(self.breach, error_status_hint=431)
        event = super().next_event()
        if isinstance(event, h11.Request):
            self.counting, self.head_bytes, self.head_lines, self.tail = False, 0, 0, b""
        elif isinstance(event, h11.EndOfMessage) and self.their_state is h11.DONE:
            self.counting = True  # what h11 holds past the body begins the next head
            self.count(self.trailing_data[0])
        return event


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
        self.worker = WorkerConnections.of(app_state)
        self.limits = self.worker.limits
        self.conn: BoundedHeads = BoundedHeads(self.limits, config.h11_max_incomplete_event_size)
        self.peer: str | None = None
        self.header_timer: asyncio.TimerHandle | None = None
        self.hold_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.peer = self.client[0] if self.client else None
        refusal = self.worker.opened(self.peer, len(self.connections))
        if refusal is not None:
            self.refuse_later(*refusal)
        else:
            self.arm_header_timer()

    def refuse_later(self, error: ApiError, reason: str) -> None:
        """A refusal for the number of connections, answered after ``refusal_pause_s`` (the
        error pacing's pause, service/policy/ledger.py) with nothing read meanwhile. Refused at
        once, a client keeping 800 connections open reopened the refused ones as fast as
        they closed, 1,400 a second, and their accepting and closing took half a core from
        inference; held, it gets them back at the pause's pace. Past as many held as the
        worker may hold connections, the refusal is at once."""
        if not self.worker.hold():
            self.refuse(error, reason)
            return
        self.transport.pause_reading()
        self.hold_timer = self.loop.call_later(self.limits.refusal_pause_s, self.release, error, reason)

    def release(self, error: ApiError, reason: str) -> None:
        self.unhold()
        self.refuse(error, reason)

    def unhold(self) -> None:
        if self.hold_timer is not None:
            self.hold_timer.cancel()
            self.hold_timer = None
            self.worker.unhold()

    def connection_lost(self, exc: Exception | None) -> None:
        self.unhold()
        self.disarm_header_timer()
        self.worker.closed(self.peer)
        self.peer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:  # a request's head is arriving
            self.arm_header_timer()
        if not self.conn.count(data):
            if self.conn.their_state is h11.IDLE:
                self.send_400_response("")
            else:  # behind a request still answered: refused once h11 reaches it
                self.flow.pause_reading()
            return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is whole: its bounds are met
            self.disarm_header_timer()

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
        """What h11 refuses, as the gateway's JSON error rather than uvicorn's text: a head
        past the bounds is a 431, anything else a 400."""
        if self.conn.breach is not None:
            self.refuse(HeadersTooLarge(self.conn.breach), "headers_too_large")
        else:
            self.refuse(BadHttp(f"not a valid HTTP/1.1 request: {msg}"), "bad_http")

    def refuse(self, error: ApiError, reason: str) -> None:
        """Answers ``error`` and closes the connection; nothing more is read from it."""
        self.disarm_header_timer()
        metrics.CONNECTIONS_REFUSED.labels(reason).inc()
        if not self.transport.is_closing():
            self.transport.write(raw_error_response(error, self.limits.retry_after_s))
            self.transport.close()
