"""One model's load in one worker: its images in flight, their clients, the AIMD limit, the
measured service rate, and the fair shares computed from them. service/admission.py
decides with these whether a request is admitted; its docstring says how and why."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
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
        while it shares the model, and one multi-crop call's crops (``Policy.crop_batch``)."""
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
