"""429 or 503, one rule, by whose limit a request reached; and which error answers are
paced (held while the client is past its error budget, service/policy/ledger.py).

- The client's own (its slots, its fair share of a model): 429, ``overloaded`` or
  ``over_share``, the client's own excess, paced like its mistakes.
- The worker's (its slots within the queue time, its memory, its decode queue; Triton's
  full queue, service/triton.py): 429 ``overloaded``, the service's state: retry soon, and
  never held.
- A model's (it cannot answer within the latency objective, or within the request's
  deadline): 503 ``over_capacity``, with the time the work in flight takes to drain as
  Retry-After, never held.

A 429 says "you, or this worker, now: retry soon"; a 503 says "the service cannot answer
this in time": a client that honours Retry-After meets 503s at any load and must hear them
at once, so no 5xx is ever held (docs/architecture.md, issue 25's figures).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from starlette.requests import Request

from .. import metrics
from ..errors import ApiError, ClientOverloaded, OverCapacity, Overloaded, OverShare

#: Whose limit a refusal reached: the client's, the worker's, or a model's.
Whose = Literal["client", "worker", "model"]
#: Paths whose errors are never held: the probes and the scrape, whose callers (a kubelet,
#: Prometheus) must hear at once that the gateway is not ready.
UNPACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


@dataclass(frozen=True)
class Refusal:
    """A request the policy does not take, and the error it is answered with."""

    whose: Whose
    message: str
    retry_after_s: int | None = None
    share: bool = False  # a model's fair share (``over_share``), not the client's slots

    def error(self) -> ApiError:
        if self.whose == "model":
            return OverCapacity(self.message, retry_after_s=self.retry_after_s)
        if self.whose == "worker":
            return Overloaded(self.message)
        if self.share:
            return OverShare(self.message, retry_after_s=self.retry_after_s)
        return ClientOverloaded(self.message)


def refuse(whose: Whose, message: str, retry_after_s: int | None = None, share: bool = False) -> ApiError:
    """The error of a refusal by :class:`Refusal`'s rule, ready to raise."""
    return Refusal(whose, message, retry_after_s, share).error()


def paced(exc: ApiError, path: str) -> bool:
    """The errors a client's own traffic causes: its mistakes, and its excess (its most
    requests in flight, more than its fair share: 429); never a 5xx, the service's state
    (over capacity, Triton down or slow), which a client that honours Retry-After meets too
    and must hear at once."""
    if path in UNPACED_PATHS:
        return False
    return exc.clients_own


async def hold_error(request: Request, exc: ApiError) -> None:
    """Holds an error answer while its client is past its error budget: the client the
    request resolved, or, for an error before that (a bad query, a wrong key), its own."""
    if not paced(exc, request.url.path):
        return
    policy = request.app.state.gateway.policy
    client = getattr(request.state, "client", None) or policy.client_of(
        request.headers, request.client.host if request.client else None
    )
    if await policy.ledger.hold(client):
        metrics.ERRORS_HELD.inc()
