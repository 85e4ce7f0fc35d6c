"""Error pacing: each client has a budget of error answers (refusals included); past it,
its error answers are held before they are sent.

An error costs the server CPU however cheap the decision: a connection accepted, headers
parsed, an answer written. A client that resends at once whatever the answer turns errors
into a loop as fast as the server can answer: one client holding 16 requests in flight was
refused about 500 times a second on two cores, and a client resending a refused JPEG about
400 times a second; the CPU those answers took slowed Triton's inference for everyone else
up to tenfold (issue 19, findings 4 and 6). Holding the answer costs a sleeping coroutine
and an open connection, both bounded by the connection limits (service/protocol.py), and
slows a client that waits for its answers before sending again to the budget's rate.

The budget is a token bucket per client (API key, or address): ``burst`` errors at once,
refilled at ``rate_per_s``. A client well within it (one that keeps to Retry-After, or a
web app whose user picked a bad file) is never held; past it, each error answer waits
until the bucket has a token again, and at most ``pause_s``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

#: Clients kept at most before the full buckets (clients that have earned their budget
#: back) are dropped: a bucket is one small entry per recently failing client.
PRUNE_AT = 4096


@dataclass
class Bucket:
    tokens: float
    at: float  # when ``tokens`` was counted


@dataclass
class ErrorPacer:
    """One worker's error budgets, by client."""

    rate_per_s: float  # 0 turns pacing off
    burst: int
    pause_s: float
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    buckets: dict[str, Bucket] = field(default_factory=dict, repr=False)

    def _bucket(self, client: str, now: float) -> Bucket:
        bucket = self.buckets.get(client)
        if bucket is None:
            if len(self.buckets) >= PRUNE_AT:
                self._prune(now)
            bucket = self.buckets[client] = Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate_per_s)
            bucket.at = now
        return bucket

    def _prune(self, now: float) -> None:
        for name, bucket in list(self.buckets.items()):
            if bucket.tokens + (now - bucket.at) * self.rate_per_s >= self.burst:
                del self.buckets[name]

    def pause_for(self, client: str) -> float:
        """Takes a token for one error answer to ``client`` and says how long to hold that
        answer: 0 within the budget, else the time until the token is earned (at most
        ``pause_s``; the bucket goes into debt, so that a client sending faster waits longer,
        up to that bound)."""
        if self.rate_per_s <= 0 or self.pause_s <= 0:
            return 0.0
        now = self.clock()
        bucket = self._bucket(client, now)
        bucket.tokens -= 1.0
        if bucket.tokens >= 0:
            return 0.0
        # The debt is bounded by what ``pause_s`` would earn back: a client held at the bound
        # is not held longer and longer for ever.
        bucket.tokens = max(bucket.tokens, -self.pause_s * self.rate_per_s)
        return min(self.pause_s, -bucket.tokens / self.rate_per_s)

    async def hold(self, client: str) -> float:
        """Holds an error answer to ``client`` as :meth:`pause_for` says; returns the pause."""
        pause = self.pause_for(client)
        if pause > 0:
            await asyncio.sleep(pause)
        return pause
