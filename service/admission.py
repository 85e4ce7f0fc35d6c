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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from .board import Board
from .model_load import ModelLoad


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
