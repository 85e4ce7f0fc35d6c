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
models (a per-request ensemble, or the Triton ensemble and each of its members, whose
work it is) takes a place in each or in none. The places a request holds are its
:class:`Ticket`.

The deadline is checked against the measured rate even on an idle model: a request of
144 crops that the model cannot answer within the request's deadline is refused at once
with a 503 that says so, instead of running until it ends in 504.

Fair shares: each model's places are shared between the clients (API key, or address)
that hold some. While several do, a client may hold at most its share of the limit
(``limit // clients``), and no more than the model computes in a quarter of the objective
at its measured rate, and a client holding none is admitted within its share even when
the model is full, overshooting the limit until the greedy client's requests drain: one
client cannot keep another out by holding every place, nor fill the batch another's
photo waits for. The clients counted are those of every worker of the gateway
(service/board.py), not this worker's alone. A timeout counts as a miss
(the limit is cut), and a ticket's latency counts from the moment it is sent to Triton,
so that slow uploads and decodes lower no one's limit.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from .board import ACTIVE_S, Board, hashes

#: Completions and busy time that make one measurement of the service rate: enough to
#: average over a few batches, few enough to follow a change within seconds.
SAMPLE_COMPLETIONS, SAMPLE_BUSY_S = 4, 0.5
#: Weight of the newest measurement in the moving average of the rate.
SMOOTHING = 0.3
#: The multiplicative decrease of the limit when an answer misses the objective.
BACKOFF = 0.8
#: The share of the latency objective that one client's images in flight may take to compute
#: while other clients send to the model (and one multi-crop call, service/batches.py).
SLICE_OF_OBJECTIVE = 0.25


@dataclass
class ModelLoad:
    """One model's images in flight in this worker, its limit, and its measured service
    rate (images per busy second: a 144-crop request weighs 144 single-crop ones)."""

    objective_s: float
    initial_limit: int
    min_limit: int = 1
    in_flight: int = 0
    rate: float | None = None  # completions per busy second, once measured (or Triton's)
    measured: bool = False  # the rate is this worker's own measurement, not Triton's figure
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    _limit: float = field(init=False)
    _last_cut: float = field(default=float("-inf"), repr=False)
    _busy_since: float | None = field(default=None, repr=False)
    _busy_s: float = field(default=0.0, repr=False)
    _completed: int = field(default=0, repr=False)
    clients: Counter[str] = field(default_factory=Counter, repr=False)  # images in flight by client
    seen: dict[str, float] = field(default_factory=dict, repr=False)  # client -> when it last left
    name: str = ""
    board: Board | None = field(default=None, repr=False)  # the other workers' clients

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

    def fair_wait_s(self, client: str, images: int, sharing: int | None = None) -> float:
        """Time until ``client``'s ``images`` would be answered when the model serves its
        clients in turn (multi-crop requests go to Triton in small batches, one after
        another, so the others' images ahead of these are at most a share each, not all
        they hold: a photo arriving beside a 144-crop request waits for a batch, not 144).
        ``sharing``: :meth:`active`, where the caller has it already."""
        if self.rate is None or self.rate <= 0:
            return 0.0
        share = self.share(client, sharing)
        ahead = sum(min(held, share) for name, held in self.clients.items() if name != client)
        return (ahead + self.clients[client] + images) / self.rate

    def drain_s(self) -> float:
        """Time for the requests in flight to finish: what a refused client should wait."""
        return self.expected_wait_s(extra=0)

    def active(self, client: str) -> int:
        """The clients sharing the model with ``client``, itself included: those holding
        places, and those that held some within :data:`ACTIVE_S` (a client sending one
        request at a time holds none between them, yet its next one must not find a
        greedy client's requests filling the limit and Triton's queue before it)."""
        now = self.clock()
        for name, left in list(self.seen.items()):
            if now - left > ACTIVE_S:
                del self.seen[name]
        here = set(self.clients) | set(self.seen) | {client}
        if self.board is None:
            return len(here)
        return len(hashes(here) | self.board.clients(self.name))

    def held(self, client: str) -> int:
        """The images ``client`` holds here, or one if it holds none here but some in
        another worker (the board knows that it holds, not how many)."""
        mine = self.clients[client]
        if mine == 0 and self.board is not None and self.board.holding(self.name, client):
            return 1
        return mine

    def in_slice(self) -> int | None:
        """The images the model computes in :data:`SLICE_OF_OBJECTIVE` of the objective at its
        measured rate, at least one (None before a rate is known): what one client may hold
        while it shares the model, and one multi-crop call's crops (``Gateway.crop_batch``)."""
        if not self.rate:
            return None
        return max(1, math.floor(self.rate * self.objective_s * SLICE_OF_OBJECTIVE))

    def share(self, client: str, sharing: int | None = None) -> int:
        """The images ``client`` may hold while the others active hold theirs: its part of the
        limit, and no more than :meth:`in_slice`. Triton runs what is queued in one batch it
        cannot stop, and a newcomer waits for that batch: four images of another client are
        half a second on two CPU cores, beside a photo's own tenth; on a GPU the slice holds
        hundreds, and only the limit counts. ``sharing``: :meth:`active`, where the caller
        has it already (it reads the workers' board)."""
        sharing = self.active(client) if sharing is None else sharing
        share = max(1, self.limit // sharing)
        in_slice = self.in_slice()
        if sharing > 1 and in_slice is not None:
            share = min(share, in_slice)
        return share

    def enter(self, images: int, client: str = "") -> None:
        if self.in_flight == 0:
            self._busy_since = self.clock()
        self.in_flight += images
        self.clients[client] += images
        if self.board is not None:
            self.board.note(self.name, client, holding=True)

    def miss(self) -> None:
        """A request that ran out of time: the limit is cut as for an answer past the
        objective (at most once per objective's worth of time)."""
        now = self.clock()
        if now - self._last_cut >= self.objective_s:
            self._limit = max(float(self.min_limit), self._limit * BACKOFF)
            self._last_cut = now

    def leave(self, images: int, latency_s: float | None, client: str = "") -> None:
        """``latency_s`` is None for failures and cancellations: they say nothing about how
        fast the server answers (an instant failure would read as speed)."""
        busy = self.in_flight  # images in flight while this one was: was the limit in use?
        self.in_flight -= images
        self.clients[client] -= images
        if self.clients[client] <= 0:
            del self.clients[client]
            self.seen[client] = self.clock()
        if self.board is not None:
            self.board.note(self.name, client, holding=client in self.clients)
        now = self.clock()
        if self._busy_since is not None:
            self._busy_s += now - self._busy_since
            self._busy_since = now if self.in_flight else None
        if latency_s is None:
            return
        self._completed += images
        if self._completed >= SAMPLE_COMPLETIONS and self._busy_s >= SAMPLE_BUSY_S:
            sample = self._completed / self._busy_s
            mixed = (1 - SMOOTHING) * self.rate + SMOOTHING * sample if self.rate and self.measured else None
            self.rate = mixed or sample  # the first of its own replaces Triton's figure
            self.measured = True
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
    reason: str  # "capacity", "share" or "deadline"
    retry_after_s: int
    detail: str = ""


class Ticket:
    """One request's places in the models it needs, taken on creation. The holder calls
    :meth:`complete` once the answer is whole: a request that fails or is cancelled leaves
    without a latency, so that it feeds neither the limit nor the rate."""

    def __init__(self, loads: Sequence[ModelLoad], images: int, client: str = "") -> None:
        self.loads = list(loads)
        self.images = images
        self.client = client
        self.completed = False
        self.missed = False
        self._started = self.loads[0].clock() if self.loads else time.monotonic()
        for load in self.loads:
            load.enter(images, client)

    def begin(self) -> None:
        """The request goes to Triton now: its latency counts from here, so that the time
        its upload and decode took is no one's service time."""
        self._started = self.loads[0].clock() if self.loads else time.monotonic()

    def complete(self) -> None:
        self.completed = True

    def time_out(self) -> None:
        """The request ran out of time in Triton: a miss, which cuts the limit."""
        self.missed = True

    def leave(self) -> None:
        """Gives the places back, once."""
        loads, self.loads = self.loads, []
        for load in loads:
            load.leave(self.images, load.clock() - self._started if self.completed else None, self.client)
            if self.missed and not self.completed:
                load.miss()


class Admission:
    """The worker's admission controller, one :class:`ModelLoad` per Triton model."""

    def __init__(self, objective_s: float, initial_limit: int, min_limit: int = 1) -> None:
        self.objective_s = objective_s
        self.initial_limit = initial_limit
        self.min_limit = min_limit
        self.loads: dict[str, ModelLoad] = {}
        self._board: Board | None = None

    @property
    def board(self) -> Board | None:
        """The workers' shared board of clients (service/board.py); None: this worker's own."""
        return self._board

    @board.setter
    def board(self, board: Board | None) -> None:
        self._board = board
        for load in self.loads.values():
            load.board = board

    def load(self, model: str) -> ModelLoad:
        load = self.loads.get(model)
        if load is None:
            load = self.loads[model] = ModelLoad(
                self.objective_s, self.initial_limit, self.min_limit, name=model, board=self._board
            )
        return load

    def refusal(
        self, models: Sequence[str], images: int, budget_s: float | None, client: str = ""
    ) -> Refusal | None:
        """Why these models cannot take a request of ``images`` images from ``client`` now
        (None: they can).

        An idle model admits whatever fits the request's deadline at its measured rate
        (anything, before a rate is measured). A busy one admits what fits its limit and
        the client's share, or a client holding nothing up to its share."""
        for model in models:
            load = self.load(model)
            retry = max(1, math.ceil(load.drain_s()))
            sharing = load.active(client)
            need = load.fair_wait_s(client, images, sharing)
            if budget_s is not None and load.rate and need > budget_s:
                return Refusal(
                    model,
                    "deadline",
                    retry,
                    f"{images} image(s) behind those in flight at {model}'s measured {load.rate:.3g} "
                    f"images/s take {need:.3g} s, more than the {budget_s:.3g} s left",
                )
            mine = load.held(client)
            if load.in_flight == 0 and mine == 0:
                continue
            share = load.share(client, sharing)
            others = sharing - 1
            if load.in_flight + images <= load.limit and (others == 0 or mine + images <= share):
                continue
            if mine == 0 and images <= share:
                continue  # a newcomer within its share: the greedy client drains instead
            if others and mine + images > share:
                return Refusal(
                    model,
                    "share",
                    retry,
                    f"this client would hold {mine + images} image(s) of {model}, over its fair share of "
                    f"{share} while {others} other client(s) are served",
                )
            return Refusal(model, "capacity", retry)
        return None

    @contextmanager
    def admitted(self, models: Sequence[str], images: int, client: str = "") -> Iterator[Ticket]:
        """Holds places in every model while the request runs, and gives them back however
        it ends; only a ticket completed by then feeds the limit and the rate."""
        ticket = Ticket([self.load(m) for m in models], images, client)
        try:
            yield ticket
        finally:
            ticket.leave()
