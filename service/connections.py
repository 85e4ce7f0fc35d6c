"""One worker's connection limits and what it holds against them, for its HTTP protocol
(service/protocol.py).

They are one object per worker, kept in the state uvicorn hands every connection of that
worker (``app_state``: one dict per worker, its lifespan state, which uvicorn builds each
protocol with), made from the settings by the worker's first connection: nothing
module-wide, so that workers, and tests, each count their own, and a test hands a protocol
the limits it wants.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .errors import ApiError, TooManyConnections
from .settings import Settings, get_settings

#: The key of a worker's :class:`WorkerConnections` in the state uvicorn hands its connections.
STATE_KEY = "gateway.connections"


@dataclass(frozen=True)
class Limits:
    """The bounds of one worker's connections."""

    header_bytes: int
    header_count: int
    header_timeout_s: float
    connections: int
    connections_per_peer: int
    retry_after_s: dict[int, int]
    refusal_pause_s: float

    @classmethod
    def from_settings(cls, s: Settings) -> Limits:
        return cls(
            s.max_header_bytes,
            s.max_header_count,
            s.header_timeout_s,
            s.max_connections,
            s.max_connections_per_peer,
            s.retry_after_s,
            s.error_pause_s if s.error_rate_per_s > 0 else 0.0,
        )


@dataclass
class WorkerConnections:
    """One worker's bounds and what it holds against them: its connections per peer, and
    the refusals it holds before answering them (service/protocol.py), which are counted
    apart from its connections so that an attacker's cannot fill its count, and are at
    most as many as it may hold."""

    limits: Limits
    per_peer: Counter[str] = field(default_factory=Counter)
    held: int = 0

    @classmethod
    def of(cls, app_state: dict[str, Any]) -> WorkerConnections:
        """The worker's, from the state uvicorn hands each of its connections: one dict per
        worker, so that the workers count apart, as each holds its own connections."""
        worker = app_state.get(STATE_KEY)
        if worker is None:
            worker = app_state[STATE_KEY] = cls(Limits.from_settings(get_settings()))
        return worker

    def opened(self, peer: str | None, open_now: int) -> tuple[ApiError, str] | None:
        """Counts a new connection from ``peer`` (``open_now``: the worker's, this one and
        the held ones included); the refusal it gets, if any, and why."""
        if peer is not None:
            self.per_peer[peer] += 1
        if open_now - self.held > self.limits.connections:
            return TooManyConnections("the gateway holds too many connections; retry later"), "connections"
        cap = self.limits.connections_per_peer
        if peer is not None and cap and self.per_peer[peer] > cap:
            refused = TooManyConnections("too many connections from this address; retry later")
            return refused, "peer_connections"
        return None

    def closed(self, peer: str | None) -> None:
        if peer is not None:
            self.per_peer[peer] -= 1
            if self.per_peer[peer] <= 0:
                del self.per_peer[peer]

    def hold(self) -> bool:
        """Takes a place for a held refusal; False when pacing is off or all are taken."""
        if self.limits.refusal_pause_s <= 0 or self.held >= self.limits.connections:
            return False
        self.held += 1
        return True

    def unhold(self) -> None:
        self.held -= 1
