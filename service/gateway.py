"""The gateway's state for one app: Triton client, labels, decode pool, and the worker's
budgets a request takes before it spends them (concurrency slots, buffer bytes, admission
to each Triton model)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import numpy as np

from . import deadlines, metrics
from .admission import Admission, Ticket
from .board import Board
from .cache import AnswerCache
from .deadlines import remaining_s
from .errors import ClientOverloaded, DeadlineExceeded, OverCapacity, Overloaded, OverShare
from .imaging import Prepared, Preprocessing, prepare
from .memory import MemoryAccount
from .pacing import ErrorPacer
from .schemas import Prediction
from .settings import Settings, worker_count
from .triton import TritonBackend

log = logging.getLogger(__name__)
#: Weight of the newest decode in the moving average of decode times.
DECODE_SMOOTHING = 0.2


def load_labels(path: Path | None) -> list[str]:
    """The ImageNet labels, one per line; the gateway refuses to start without all 1000."""
    if path is None:
        raise RuntimeError("no labels file: set GATEWAY_LABELS_PATH to inception/data/imagenet_labels.txt")
    labels = Path(path).read_text(encoding="utf-8").splitlines()
    if len(labels) != 1000:
        raise RuntimeError(f"{path} has {len(labels)} labels, expected 1000")
    return labels


class Gateway:
    """Per-app state, created by the app factory and started and stopped by its lifespan."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.labels = load_labels(settings.labels_path)
        self.backend = TritonBackend(settings)
        self.pool: ThreadPoolExecutor | None = None
        self.slots = asyncio.Semaphore(settings.max_concurrency)
        self.client_slots: Counter[str] = Counter()  # slots held by client
        self.client_buffered: Counter[str] = Counter()  # buffer budget held by client
        self.buffered = 0  # bytes reserved by the bodies being read and decoded
        self.memory = MemoryAccount(settings.memory_budget_bytes)
        # Answers by content (service/cache.py): held from the memory account, given back on demand.
        self.cache = AnswerCache(settings.cache_bytes, self.memory)
        self.decoding = 0  # images decoding or waiting for a decode thread
        self.decode_s: float | None = None  # moving average of one image's decode and preprocessing
        self.admission = Admission(
            settings.latency_target_s, settings.admission_initial_limit, settings.admission_min_limit
        )
        self._seeder: asyncio.Task[None] | None = None
        # Error answers past a client's budget are held before they are sent (service/pacing.py).
        self.pacer = ErrorPacer(settings.error_rate_per_s, settings.error_burst, settings.error_pause_s)

    async def start(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=self.settings.decode_threads, thread_name_prefix="decode")
        # Each worker's clients, seen by the others (service/board.py): after the fork.
        self.admission.board = Board.for_workers(worker_count())
        await self.backend.start()
        await self.seed_rates()
        if self.settings.config_max_age_s > 0:
            self._seeder = asyncio.create_task(self._seed_rates_every(self.settings.config_max_age_s))
        log.info(
            "gateway started",
            extra={
                "triton": self.settings.triton_grpc_url,
                "models_known": ",".join(sorted(self.backend.models)) or "none yet",
                "pid": os.getpid(),
                "memory_budget_mib": self.memory.capacity // (1024 * 1024),
            },
        )

    async def stop(self) -> None:
        if self._seeder is not None:
            seeder, self._seeder = self._seeder, None
            seeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await seeder
        await self.backend.close()
        board, self.admission.board = self.admission.board, None
        if board is not None:
            board.close()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        metrics.mark_process_dead(os.getpid())

    async def seed_rates(self) -> None:
        """Gives each network this worker has not measured yet Triton's own service rate
        (``TritonBackend.service_rate``), again at every call until the worker measures its
        own. A worker learns a model's rate from the requests it completes, and until then
        admits any request whatever its deadline: one that sees only requests that time out
        (10 crops with a 0.4 s deadline, issue 19 finding 9) would never measure one, and
        would send every such request to run for nothing, while the worker beside it, which
        had measured the rate, refused them at once. Kept up to date, Triton's figure
        cannot hold a worker that refuses everything it sees at a rate of long ago."""
        for name, info in list(self.backend.models.items()):
            load = self.admission.load(name)
            if load.measured or info.is_ensemble:
                continue
            rate = await self.backend.service_rate(name)
            if rate is not None and not load.measured:
                load.rate = rate
                metrics.SERVICE_RATE.labels(name).set(rate)

    async def _seed_rates_every(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.seed_rates()
            except Exception:  # the seeder must outlive any one failure
                log.exception("service rates not read")

    @asynccontextmanager
    async def slot(self, client: str = "") -> AsyncIterator[None]:
        """A classify slot, waited for at most ``queue_timeout_s`` (then 429); a client
        already holding its cap of slots (``max_concurrency_per_client``) is refused at
        once, so that uploads stalled or trickled by one client cannot hold them all.

        A free slot is taken at once: ``wait_for`` with a timeout of 0 would cancel the
        acquire before it ran, refusing every request when ``queue_timeout_s`` is 0."""
        cap = self.settings.max_concurrency_per_client
        if cap and self.client_slots[client] >= cap:
            raise ClientOverloaded(f"this client has {cap} requests in flight, its most; retry later")
        self.client_slots[client] += 1
        try:
            async with self._slot():
                yield
        finally:
            self.client_slots[client] -= 1
            if self.client_slots[client] <= 0:
                del self.client_slots[client]

    @asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        if self.slots.locked():
            try:
                await asyncio.wait_for(self.slots.acquire(), timeout=self.settings.queue_timeout_s)
            except TimeoutError:
                raise Overloaded("too many requests in flight; retry later") from None
        else:
            await self.slots.acquire()
        try:
            yield
        finally:
            self.slots.release()

    @asynccontextmanager
    async def buffer(self, cost: int, held: int = 0, client: str = "") -> AsyncIterator[None]:
        """Reserves `cost` bytes for one request's body or crops from the worker's memory
        account (service/memory.py), within the part of it bodies may take (the buffer
        budget, so that decodes always find room), or sheds it at once with 429. Within
        the buffer budget one request alone is always admitted, whatever it costs, so that
        the largest allowed body can be served, and ``held`` (what the same request holds
        already: its body, when its crops are reserved) counts as its own: a 144-crop
        request of a large photo alone fits whatever its total. A client holding none of
        the budget is let in past it too (the memory account still bounds it), so that
        slow uploads of one client, charged the largest body when chunked, cannot keep the
        others out. The event loop's single thread makes the check and the reservation
        one step."""
        budget = self.settings.buffer_budget_bytes
        newcomer = not self.client_buffered[client]
        if self.buffered - held and self.buffered + cost > budget and not newcomer:
            raise Overloaded("too many large requests in flight; retry later")
        with self.memory.held(cost):
            self.buffered += cost
            self.client_buffered[client] += cost
            try:
                yield
            finally:
                self.buffered -= cost
                self.client_buffered[client] -= cost
                if self.client_buffered[client] <= 0:
                    del self.client_buffered[client]

    def charged(self, models: Sequence[str]) -> list[str]:
        """The models whose capacity a request uses: those it names and, for the Triton
        ensemble, each of its members, which do its work (a victim on ``inception_v4``
        must see the ensemble's load on it)."""
        names = list(dict.fromkeys(models))
        for name in list(names):
            info = self.backend.models.get(name)
            if info is not None and info.is_ensemble:
                names += [m for m in info.members if m not in names]
        return names

    def crop_batch(self, models: Sequence[str], client: str) -> int:
        """Crops per Triton call of ``client``'s multi-crop request now: the setting's batch
        while the client is alone on its models, and while others send to them, what the
        slowest computes in a slice of the objective (``ModelLoad.in_slice``;
        service/batches.py says why)."""
        size = self.settings.crop_batch_size
        for model in self.charged(models):
            load = self.admission.loads.get(model)
            in_slice = load.in_slice() if load is not None else None
            if in_slice is not None and load is not None and load.active(client) > 1:
                size = min(size, in_slice)
        return size

    def refuse_if_over_capacity(self, models: Sequence[str], images: int, client: str = "") -> None:
        """Refused at once if these models cannot take the request now (service/admission.py):
        429 ``over_share`` when the client would hold more than its fair share beside other
        clients, else 503 ``over_capacity``."""
        refusal = (
            self.admission.refusal(self.charged(models), images, remaining_s(), client)
            if self.settings.admission
            else None
        )
        if refusal is not None:
            metrics.SHED.labels(refusal.model, refusal.reason).inc()
            if refusal.reason == "share":
                raise OverShare(
                    f"this client is over its fair share and could not be answered now ({refusal.detail}); "
                    "retry later",
                    retry_after_s=refusal.retry_after_s,
                )
            if refusal.reason == "deadline":
                why = f"within its deadline ({refusal.detail})"
            else:
                why = f"within the latency objective of {self.settings.latency_target_s:g} s"
            raise OverCapacity(
                f"the server is at capacity and could not answer {why}; retry later",
                retry_after_s=refusal.retry_after_s,
            )

    @contextmanager
    def admitted(self, models: list[str], images: int, client: str = "") -> Iterator[Ticket]:
        """A place for the request in every model it needs, or 503 at once; the ticket is
        to be completed once the answer is whole (service/admission.py)."""
        self.refuse_if_over_capacity(models, images, client)
        charged = self.charged(models)
        try:
            with self.admission.admitted(charged, images, client) as ticket:
                yield ticket
        finally:
            for model in charged:
                load = self.admission.load(model)
                metrics.ADMISSION_LIMIT.labels(model).set(load.limit)
                metrics.SERVICE_RATE.labels(model).set(load.rate or 0.0)

    async def prepare(self, data: bytes, pres: list[Preprocessing], crops: int = 1) -> Prepared:
        """Decoding and resizing hold the GIL little but take milliseconds: a thread pool
        keeps them off the event loop. The pool's queue is bounded (``decode_queue``), and
        a decode is queued only if it can start and end within the request's deadline at
        the decode time measured so far; a decode whose deadline passed while it waited is
        dropped when its turn comes, never started (503 or 504, no CPU spent)."""
        s = self.settings
        deadline = deadlines.deadline_var.get()
        each = self.decode_s or 0.0
        expected = (self.decoding // s.decode_threads + 1) * each
        if deadline is not None:
            left = deadline.at - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded("the request's deadline passed before its image could be decoded")
            if expected > left:
                raise OverCapacity(
                    f"the image could not be decoded within the request's deadline ({left:.3g} s left, "
                    f"about {expected:.3g} s of decoding queued); retry later",
                    retry_after_s=max(1, math.ceil(expected)),
                )
        if self.decoding >= s.decode_queue:
            raise Overloaded("too many images are waiting to be decoded; retry later")

        def job() -> Prepared:
            if deadline is not None and time.monotonic() >= deadline.at:
                raise DeadlineExceeded("the request's deadline passed while its image waited to be decoded")
            started = time.perf_counter()
            reserved = 0

            def reserve(cost: int) -> None:  # from the header, before a pixel is decoded
                nonlocal reserved
                self.memory.reserve_waiting(cost, s.memory_wait_s)
                reserved = cost

            try:
                return prepare(
                    data,
                    pres,
                    max_pixels=s.max_pixels,
                    draft=s.draft,
                    oversample=s.draft_oversample,
                    crops=crops,
                    max_jpeg_scans=s.max_jpeg_scans,
                    reserve=reserve,
                )
            finally:
                if reserved:
                    self.memory.release(reserved)
                took = time.perf_counter() - started
                before = self.decode_s
                self.decode_s = (
                    took if before is None else (1 - DECODE_SMOOTHING) * before + DECODE_SMOOTHING * took
                )

        self.decoding += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, job)
        finally:
            self.decoding -= 1

    def top_k(self, probabilities: np.ndarray, k: int) -> list[Prediction]:
        """The k best classes, by score then class id: a full stable sort of 1000 floats costs
        tens of microseconds and makes ties (common with random weights) deterministic."""
        order = np.lexsort((np.arange(probabilities.shape[0]), -probabilities))[:k]
        return [
            Prediction(label=self.labels[i], class_id=int(i), score=float(probabilities[i])) for i in order
        ]
