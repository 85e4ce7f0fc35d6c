"""Admission control: admit only what can be answered within the latency objective, and
refuse the rest at once.

Past capacity a queue only grows: every admitted request waits for all those ahead of it,
until they all time out together and the server computes answers nobody waits for
(goodput collapses). So each worker keeps, per Triton model, a limit on the images in
flight, set by AIMD on the latency it observes (admission to answer): while the limit is
in use (half of it in flight or more), every answer within the objective raises it by one
image per limit's worth of answers (one step per round trip); an answer past the
objective cuts it by a fifth, at most once per round trip.
The limit settles where latency meets the objective, which is where the server is busy
all the time and nothing queues beyond what the objective allows. docs/architecture.md
says why this and not a limit computed from the measured rate (the first version).

The service rate is measured too (images answered per second of busy time, time with at
least one image of that model in flight), for what a refused client is told: the
``Retry-After`` is the time the work in flight takes to drain, and a request whose own
deadline is shorter than its expected wait is refused at once. The event loop is one
thread, so checking and taking a place are one step, and a request needing several
models (a per-request ensemble) takes a place in each or in none. The places a request
holds are its :class:`Ticket`.
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
#: The multiplicative decrease of the limit when an answer misses the objective.
BACKOFF = 0.8


@dataclass
class ModelLoad:
    """One model's images in flight in this worker, its limit, and its measured service
    rate (images per busy second: a 144-crop request weighs 144 single-crop ones)."""

    objective_s: float
    initial_limit: int
    min_limit: int = 1
    in_flight: int = 0
    rate: float | None = None  # completions per busy second, once measured
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    _limit: float = field(init=False)
    _last_cut: float = field(default=float("-inf"), repr=False)
    _busy_since: float | None = field(default=None, repr=False)
    _busy_s: float = field(default=0.0, repr=False)
    _completed: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self._limit = float(max(self.min_limit, self.initial_limit))

    @property
    def limit(self) -> int:
        return max(self.min_limit, math.floor(self._limit))

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

    def leave(self, images: int, latency_s: float | None) -> None:
        """``latency_s`` is None for failures and cancellations: they say nothing about how
        fast the server answers (an instant failure would read as speed)."""
        busy = self.in_flight  # images in flight while this one was: was the limit in use?
        self.in_flight -= images
        now = self.clock()
        if self._busy_since is not None:
            self._busy_s += now - self._busy_since
            self._busy_since = now if self.in_flight else None
        if latency_s is None:
            return
        self._completed += images
        if self._completed >= SAMPLE_COMPLETIONS and self._busy_s >= SAMPLE_BUSY_S:
            sample = self._completed / self._busy_s
            self.rate = sample if self.rate is None else (1 - SMOOTHING) * self.rate + SMOOTHING * sample
            self._completed, self._busy_s = 0, 0.0
        if latency_s > self.objective_s:
            if now - self._last_cut >= latency_s:  # once per round trip
                self._limit = max(float(self.min_limit), self._limit * BACKOFF)
                self._last_cut = now
        elif 2 * busy >= self._limit:  # raise only a limit in use, not one an idle hour inflated
            self._limit += images / self._limit


@dataclass(frozen=True)
class Refusal:
    """Why a request was not admitted, and when to come back."""

    model: str
    reason: str  # "capacity" or "deadline"
    retry_after_s: int


class Ticket:
    """One request's places in the models it needs, taken on creation. The holder calls
    :meth:`complete` once the answer is whole: a request that fails or is cancelled leaves
    without a latency, so that it feeds neither the limit nor the rate."""

    def __init__(self, loads: Sequence[ModelLoad], images: int) -> None:
        self.loads = list(loads)
        self.images = images
        self.completed = False
        self._started = self.loads[0].clock() if self.loads else time.monotonic()
        for load in self.loads:
            load.enter(images)

    def complete(self) -> None:
        self.completed = True

    def leave(self) -> None:
        """Gives the places back, once."""
        loads, self.loads = self.loads, []
        for load in loads:
            load.leave(self.images, load.clock() - self._started if self.completed else None)


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
            load = self.loads[model] = ModelLoad(self.objective_s, self.initial_limit, self.min_limit)
        return load

    def refusal(self, models: Sequence[str], images: int, budget_s: float | None) -> Refusal | None:
        """Why these models cannot take a request of ``images`` images now (None: they can).

        A model with nothing in flight always admits: an idle server is never refused,
        whatever the estimate says."""
        for model in models:
            load = self.load(model)
            if load.in_flight == 0:
                continue
            retry = max(1, math.ceil(load.drain_s()))
            if load.in_flight + images > load.limit:
                return Refusal(model, "capacity", retry)
            if budget_s is not None and load.expected_wait_s(images) > budget_s:
                return Refusal(model, "deadline", retry)
        return None

    @contextmanager
    def admitted(self, models: Sequence[str], images: int) -> Iterator[Ticket]:
        """Holds places in every model while the request runs, and gives them back however
        it ends; only a ticket completed by then feeds the limit and the rate."""
        ticket = Ticket([self.load(m) for m in models], images)
        try:
            yield ticket
        finally:
            ticket.leave()
