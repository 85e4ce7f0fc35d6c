"""The gateway's state for one app: Triton client, labels, decode pool, answer cache, and
the worker's load policy (service/policy/), whose resources every request leases."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import deadlines, metrics
from .board import Board
from .cache import AnswerCache
from .errors import DeadlineExceeded
from .imaging import Prepared, Preprocessing, prepare
from .periodic import Periodic
from .policy import Policy
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
        self.policy = Policy(settings)
        self.policy.members = self._members
        # Answers by content (service/cache.py): held from the memory account, given back on demand.
        self.cache = AnswerCache(settings.cache_bytes, self.policy.memory)
        self.decode_s: float | None = None  # moving average of one image's decode and preprocessing
        self._seeder = Periodic(
            "rate-seeder", settings.config_max_age_s, self.seed_rates, log, "service rates not read"
        )

    def _members(self, name: str) -> Sequence[str]:
        """A Triton ensemble's members, whose capacity its requests use (``Policy.charged``)."""
        info = self.backend.models.get(name)
        return info.members if info is not None and info.is_ensemble else ()

    async def start(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=self.settings.decode_threads, thread_name_prefix="decode")
        # Each worker's clients, seen by the others (service/board.py): after the fork.
        self.policy.admission.board = Board.for_workers(worker_count())
        await self.backend.start()
        await self.seed_rates()
        if self.settings.config_max_age_s > 0:
            self._seeder.start()
        log.info(
            "gateway started",
            extra={
                "triton": self.settings.triton_grpc_url,
                "models_known": ",".join(sorted(self.backend.models)) or "none yet",
                "pid": os.getpid(),
                "memory_budget_mib": self.policy.memory.capacity // (1024 * 1024),
            },
        )

    async def stop(self) -> None:
        await self._seeder.stop()
        await self.backend.close()
        board, self.policy.admission.board = self.policy.admission.board, None
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
            load = self.policy.admission.load(name)
            if load.measured or info.is_ensemble:
                continue
            rate = await self.backend.service_rate(name)
            if rate is not None and not load.measured:
                load.rate = rate
                metrics.SERVICE_RATE.labels(name).set(rate)

    async def prepare(self, data: bytes, pres: list[Preprocessing], crops: int = 1) -> Prepared:
        """Decoding and resizing hold the GIL little but take milliseconds: a thread pool
        keeps them off the event loop. The pool's queue is bounded (``decode_queue``), and
        a decode is queued only if it can start and end within the request's deadline at
        the decode time measured so far; a decode whose deadline passed while it waited is
        dropped when its turn comes, never started (503 or 504, no CPU spent)."""
        s = self.settings
        deadline = deadlines.deadline_var.get()
        each = self.decode_s or 0.0
        expected = (self.policy.decoding // s.decode_threads + 1) * each
        left = None
        if deadline is not None:
            left = deadline.at - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded("the request's deadline passed before its image could be decoded")
        memory = self.policy.memory

        def job() -> Prepared:
            if deadline is not None and time.monotonic() >= deadline.at:
                raise DeadlineExceeded("the request's deadline passed while its image waited to be decoded")
            started = time.perf_counter()
            reserved = 0

            def reserve(cost: int) -> None:  # from the header, before a pixel is decoded
                nonlocal reserved
                memory.reserve_waiting(cost, s.memory_wait_s)
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
                    memory.release(reserved)
                took = time.perf_counter() - started
                before = self.decode_s
                self.decode_s = (
                    took if before is None else (1 - DECODE_SMOOTHING) * before + DECODE_SMOOTHING * took
                )

        with self.policy.decode_place(expected, left):
            return await asyncio.get_running_loop().run_in_executor(self.pool, job)

    def top_k(self, probabilities: np.ndarray, k: int) -> list[Prediction]:
        """The k best classes, by score then class id: a full stable sort of 1000 floats costs
        tens of microseconds and makes ties (common with random weights) deterministic."""
        order = np.lexsort((np.arange(probabilities.shape[0]), -probabilities))[:k]
        return [
            Prediction(label=self.labels[i], class_id=int(i), score=float(probabilities[i])) for i in order
        ]
