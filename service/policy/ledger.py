"""What each client holds of the worker, and its budget of error answers: one table, one
pruning rule (service/policy/worker.py takes and gives through it).

**Error pacing.** An error costs the server CPU however cheap the decision: a connection
accepted, headers parsed, an answer written. A client that resends at once whatever the
answer turns errors into a loop as fast as the server can answer: one client holding 16
requests in flight was refused about 500 times a second on two cores, and a client
resending a refused JPEG about 400 times a second; the CPU those answers took slowed
Triton's inference for everyone else up to tenfold (issue 19, findings 4 and 6). Holding
the answer costs a sleeping coroutine and an open connection, both bounded by the
connection limits (service/protocol.py), and slows a client that waits for its answers
before sending again to the budget's rate.

The budget is a token bucket per client: ``burst`` errors at once, refilled at
``rate_per_s``. A client well within it (one that keeps to Retry-After, or a web app whose
user picked a bad file) is never held; past it, each error answer waits until the bucket
has a token again, and at most ``pause_s``. Which errors take a token is the policy's rule
(``paced``, service/policy/refusals.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

#: Clients kept at most before those that hold nothing and owe no error are dropped.
PRUNE_AT = 4096


@dataclass
class Entry:
    """One client's line: what it holds, and its error budget (tokens, counted at ``at``)."""

    held: Counter[str]
    tokens: float
    at: float


@dataclass
class Ledger:
    """What each client holds of the worker, and its budget of error answers."""

    rate_per_s: float  # error tokens earned a second; 0 turns pacing off
    burst: int
    pause_s: float
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    entries: dict[str, Entry] = field(default_factory=dict, repr=False)

    def _entry(self, client: str) -> Entry:
        entry = self.entries.get(client)
        if entry is None:
            if len(self.entries) >= PRUNE_AT:
                self.prune()
            entry = self.entries[client] = Entry(Counter(), float(self.burst), self.clock())
        return entry

    def _refill(self, entry: Entry, now: float) -> None:
        entry.tokens = min(float(self.burst), entry.tokens + (now - entry.at) * self.rate_per_s)
        entry.at = now

    def _idle(self, entry: Entry, now: float) -> bool:
        """The one pruning rule: nothing held, and the whole error budget earned back."""
        owed = entry.tokens + (now - entry.at) * self.rate_per_s < self.burst
        return not +entry.held and not (owed and self.rate_per_s > 0)

    def prune(self) -> None:
        now = self.clock()
        for client, entry in list(self.entries.items()):
            if self._idle(entry, now):
                del self.entries[client]

    def held(self, client: str, resource: str) -> int:
        entry = self.entries.get(client)
        return entry.held[resource] if entry is not None else 0

    def holders(self, resource: str) -> dict[str, int]:
        """Each client holding some of ``resource``, with what it holds."""
        return {c: e.held[resource] for c, e in self.entries.items() if e.held[resource] > 0}

    def take(self, client: str, resource: str, amount: int) -> None:
        self._entry(client).held[resource] += amount

    def give(self, client: str, resource: str, amount: int) -> None:
        entry = self.entries.get(client)
        if entry is None:
            return
        entry.held[resource] -= amount
        if entry.held[resource] <= 0:
            del entry.held[resource]
        if self._idle(entry, self.clock()):
            del self.entries[client]

    def pause_for(self, client: str) -> float:
        """Takes a token for one error answer to ``client`` and says how long to hold that
        answer: 0 within the budget, else the time until the token is earned (at most
        ``pause_s``; the budget goes into debt, so that a client sending faster waits
        longer, up to that bound)."""
        if self.rate_per_s <= 0 or self.pause_s <= 0:
            return 0.0
        entry = self._entry(client)
        self._refill(entry, self.clock())
        entry.tokens -= 1.0
        if entry.tokens >= 0:
            return 0.0
        # The debt is bounded by what ``pause_s`` earns back: a client held at the bound is
        # not held longer and longer for ever.
        entry.tokens = max(entry.tokens, -self.pause_s * self.rate_per_s)
        return min(self.pause_s, -entry.tokens / self.rate_per_s)

    async def hold(self, client: str) -> float:
        """Holds an error answer to ``client`` as :meth:`pause_for` says; returns the pause."""
        pause = self.pause_for(client)
        if pause > 0:
            await asyncio.sleep(pause)
        return pause
