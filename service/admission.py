"""Admission control: admit only what can be answered within the latency objective, and
refuse the rest at once.

Past capacity a queue only grows: every admitted request waits for all those ahead of it,
until they all time out together and the server computes answers nobody waits for
(goodput collapses). So each worker keeps, per Triton model, a concurrency limit derived
from Little's law: ``limit = service rate × latency objective``, where the service rate is
measured, not configured: completions per second of *busy* time (time with at least one
request of that model in flight). Busy time, not wall time, so that a quiet minute does
not read as a slow server. A request that would wait longer than the objective, or than
its own deadline, is refused with 503 and a ``Retry-After`` of the time the backlog takes
to drain. docs/architecture.md says why this and not a gradient limiter.

The limit follows the server: a faster server (a GPU, more Triton replicas, bigger
batches) completes more per second and the limit rises with it; a slower one lowers it.
Until the first measurement the limit is ``initial_limit``. The event loop is one thread,
so checking and taking a place are one step, and a request needing several models (a
per-request ensemble) takes a place in each or in none.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

#: Completions and busy time that make one measurement of the service rate: enough to
#: average over a few batches, few enough to follow a change within seconds.
SAMPLE_COMPLETIONS, SAMPLE_BUSY_S = 4, 0.5
#: Weight of the newest measurement in the moving average of the rate.
SMOOTHING = 0.3


@dataclass
class ModelLoad:
    """One model's images in flight in this worker, and its measured service rate (images
    per busy second: a 144-crop request weighs 144 single-crop ones)."""

    initial_limit: int
    min_limit: int = 1
    in_flight: int = 0
    rate: float | None = None  # completions per busy second, once measured
    _busy_since: float | None = None
    _busy_s: float = 0.0
    _completed: int = 0
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def limit(self, objective_s: float) -> int:
        if self.rate is None:
            return max(self.min_limit, self.initial_limit)
        return max(self.min_limit, math.floor(self.rate * objective_s))

    def expected_wait_s(self, extra: int = 1) -> float:
        """Time until ``extra`` more images would be answered, at the measured rate."""
        if self.rate is None or self.rate <= 0:
            return 0.0
        return (self.in_flight + extra) / self.rate

    def drain_s(self) -> float:
        """Time for the requests in flight to finish: what a refused client should wait."""
        return self.expected_wait_s(extra=0)

    def enter(self, images: int) -> None:
        if self.in_flight == 0:
            self._busy_since = self.clock()
        self.in_flight += images

    def leave(self, images: int, completed: bool) -> None:
        """``completed`` is False for failures and cancellations: they say nothing about
        how fast the server answers."""
        self.in_flight -= images
        if completed:
            self._completed += images
        now = self.clock()
        if self._busy_since is not None:
            self._busy_s += now - self._busy_since
            self._busy_since = now if self.in_flight else None
        if self._completed >= SAMPLE_COMPLETIONS and self._busy_s >= SAMPLE_BUSY_S:
            sample = self._completed / self._busy_s
            self.rate = sample if self.rate is None else (1 - SMOOTHING) * self.rate + SMOOTHING * sample
            self._completed, self._busy_s = 0, 0.0


@dataclass(frozen=True)
class Refusal:
    """Why a request was not admitted, and when to come back."""

    model: str
    reason: str  # "capacity" or "deadline"
    retry_after_s: int


class Admission:
    """The worker's admission controller, one :class:`ModelLoad` per Triton model."""

    def __init__(self, objective_s: float, initial_limit: int, min_limit: int = 1) -> None:
        self.objective_s = objective_s
        self.initial_limit = initial_limit
        self.min_limit = min_limit
        self.loads: dict[str, ModelLoad] = {}

    def load(self, model: str) -> ModelLoad:
        load = self.loads.get(model)
        if load is None:
            load = self.loads[model] = ModelLoad(self.initial_limit, self.min_limit)
        return load

    def refusal(self, models: Sequence[str], images: int, budget_s: float | None) -> Refusal | None:
        """Why these models cannot take a request of ``images`` images now (None: they can).

        A model with nothing in flight always admits: an idle server is never refused,
        whatever the estimate says."""
        for model in models:
            load = self.load(model)
            if load.in_flight == 0:
                continue
            wait = load.expected_wait_s(images)
            retry = max(1, math.ceil(load.drain_s()))
            if load.in_flight + images > load.limit(self.objective_s):
                return Refusal(model, "capacity", retry)
            if budget_s is not None and wait > budget_s:
                return Refusal(model, "deadline", retry)
        return None

    @contextmanager
    def admitted(self, models: Sequence[str], images: int) -> Iterator[list[bool]]:
        """Holds places in every model; the caller sets ``outcome[0] = True`` once the
        answer is complete, so that only completions feed the rate."""
        loads = [self.load(m) for m in models]
        for load in loads:
            load.enter(images)
        outcome = [False]
        try:
            yield outcome
        finally:
            for load in loads:
                load.leave(images, outcome[0])
