"""The connection limits in process (service/protocol.py), without a server: the state each
worker hands its connections, a head's end found as h11 finds it, and why uvicorn's own
options are not used (what each would change for a client, checked on the installed
uvicorn and h11 so that an upgrade that changes it shows here). The same limits on a real
uvicorn: tests/gateway/http/test_bounded_http.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import h11
import pytest
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from embedded.gateway import ROOT, gateway_command
from service.connections import STATE_KEY, Limits, WorkerConnections
from service.protocol import BoundedH11Protocol, BoundedHeads
from service.settings import Settings

LIMITS = Limits(
    header_bytes=32 * 1024,
    header_count=100,
    header_timeout_s=10.0,
    connections=100,
    connections_per_peer=2,
    retry_after_s={429: 1, 503: 7},
    refusal_pause_s=0.0,
)


async def ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


class Transport(asyncio.Transport):
    """What a protocol writes, from a peer address."""

    def __init__(self, peer: str) -> None:
        super().__init__()
        self.peer = peer
        self.written = b""
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": (self.peer, 40000), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


class Worker:
    """One uvicorn worker's share of what uvicorn hands its connections: its server state
    and its app state, which carries the worker's connection limits."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits = LIMITS) -> None:
        self.loop = loop
        self.config = Config(app=ok_app, log_config=None, http=BoundedH11Protocol)
        self.server_state = ServerState()
        self.app_state: dict[str, Any] = {STATE_KEY: WorkerConnections(limits)}

    def connect(self, peer: str) -> Transport:
        protocol = BoundedH11Protocol(self.config, self.server_state, self.app_state, self.loop)
        transport = Transport(peer)
        protocol.connection_made(transport)
        return transport


def test_each_worker_counts_its_own_connections_from_the_state_it_is_handed(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Two workers, each with its limits in its own state (a cap of 2 connections from
    one address): the address's connections to one do not count in the other, as each
    holds its own; a module-wide count refused the first connection to the second."""
    a, b = Worker(loop), Worker(loop)
    assert [a.connect("10.0.0.1").written for _ in range(2)] == [b"", b""]
    assert b.connect("10.0.0.1").written == b""  # its first from that address
    refused = a.connect("10.0.0.1")
    assert refused.written.startswith(b"HTTP/1.1 503 ") and refused.closing
    assert b'"too_many_connections"' in refused.written and b"retry-after: 7\r\n" in refused.written
    assert a.app_state[STATE_KEY].per_peer["10.0.0.1"] == 3
    assert b.app_state[STATE_KEY].per_peer["10.0.0.1"] == 1


def test_a_workers_limits_are_made_once_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first connection of a worker makes its limits from the settings, into the state
    every later connection of the worker is handed; another worker makes its own."""
    read: list[Settings] = []

    def settings() -> Settings:
        read.append(Settings(max_header_count=9))
        return read[-1]

    monkeypatch.setattr("service.connections.get_settings", settings)
    state: dict[str, Any] = {}
    worker = WorkerConnections.of(state)
    assert WorkerConnections.of(state) is worker and state[STATE_KEY] is worker
    assert worker.limits.header_count == 9 and len(read) == 1
    assert WorkerConnections.of({}) is not worker and len(read) == 2


@pytest.mark.parametrize("split", range(1, 5))
def test_a_heads_end_split_between_reads_ends_the_count(split: int) -> None:
    """The head ends where h11 ends it, wherever the reads cut its blank line: the body
    after it (larger than the header bound here) is not counted as head."""
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 40000\r\n\r\n"
    conn = BoundedHeads(LIMITS)
    cut = len(head) - split
    assert conn.count(head[:cut]) and conn.count(head[cut:] + b"x" * 40000)
    assert conn.breach is None and conn.head_bytes == len(head)


def test_a_head_ending_in_bare_newlines_is_measured_as_h11_reads_it() -> None:
    conn = BoundedHeads(LIMITS)
    data = b"POST / HTTP/1.1\nHost: x\nContent-Length: 40000\n\n" + b"x" * 40000
    assert conn.count(data)
    conn.receive_data(data)
    assert isinstance(conn.next_event(), h11.Request)


def test_a_pipelined_head_is_counted_from_what_h11_holds_past_the_body() -> None:
    """A good request and, in the same read, one of 500 headers: the second is counted
    once h11 has read the first's body, and h11 is not let parse it."""
    conn = BoundedHeads(LIMITS)
    data = (
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"GET / HTTP/1.1\r\nHost: x\r\n" + b"a: b\r\n" * 500 + b"\r\n"
    )
    assert conn.count(data)  # the first head is within the bounds
    conn.receive_data(data)
    assert isinstance(conn.next_event(), h11.Request)
    assert isinstance(conn.next_event(), h11.EndOfMessage)
    assert conn.breach == "the request has more than 100 headers"
    conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
    conn.send(h11.EndOfMessage())
    conn.start_next_cycle()
    with pytest.raises(h11.RemoteProtocolError) as raised:
        conn.next_event()
    assert raised.value.error_status_hint == 431


def test_h11s_bound_never_cuts_a_head_the_gateway_admits() -> None:
    """uvicorn's default for h11 (16 KiB, no option given) is below the header bound (32
    KiB): an unfinished head of 20 KiB is still awaited, not refused by h11."""
    conn = BoundedHeads(LIMITS, None)
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000
    assert conn.count(head)
    conn.receive_data(head)
    assert conn.next_event() is h11.NEED_DATA
    plain = h11.Connection(h11.SERVER)  # what uvicorn builds without the option
    plain.receive_data(head)
    with pytest.raises(h11.RemoteProtocolError):
        plain.next_event()


def test_uvicorns_own_options_would_change_what_clients_see(loop: asyncio.AbstractEventLoop) -> None:
    """Why the module keeps its own limits: ``--limit-concurrency``'s 503 is plain text
    with no Retry-After; h11's bound (``--h11-max-incomplete-event-size``) lets a whole
    head of any size through in one read, and uvicorn answers its breach, and any bad
    request, with a plain-text 400, not a 431."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    loop.run_until_complete(service_unavailable({}, None, send))  # type: ignore[arg-type]
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 503 and headers[b"content-type"].startswith(b"text/plain")
    assert b"retry-after" not in headers

    bounded = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    bounded.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 120_000 + b"\r\n\r\n")
    assert isinstance(bounded.next_event(), h11.Request)

    protocol = H11Protocol(Config(app=ok_app, log_config=None), ServerState(), {}, loop)
    transport = Transport("10.0.0.1")
    protocol.connection_made(transport)
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000)
    assert transport.written.startswith(b"HTTP/1.1 400 ") and b"text/plain" in transport.written


def test_no_launcher_passes_uvicorns_limit_concurrency() -> None:
    """Its plain-text 503 would reach the clients of every launcher (the test above)."""
    entrypoint = (ROOT / "deploy" / "gateway-entrypoint.sh").read_text()
    commands = [line for line in entrypoint.splitlines() if not line.lstrip().startswith("#")]
    assert "--limit-concurrency" not in " ".join(gateway_command(8080) + commands)
