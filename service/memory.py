"""One memory account per worker: every request reserves what it will cost before it
allocates it, from one budget (``GATEWAY_MEMORY_BUDGET_BYTES``, from the cgroup's limit
divided by the workers).

What is reserved, and when: the body as it will cost once read, before reading it
(service/classification.py's ``buffer_cost``: JSON's parse included, `inputs.parse_json_body`
keeps it within); the decoded pixels, from the image's header before ``load()`` at the
per-pixel cost of the per-request budget (service/pixels.py), in the decode thread; the
crops, once the request's options are known (service/batches.py). Past the budget a
request is shed with 429 and Retry-After at once on the event loop (which never waits), or
after waiting up to ``GATEWAY_MEMORY_WAIT_S`` in a decode thread for another request to give
memory back. What could never fit, even alone, is refused with 413. Before this, 8
concurrent 47 KiB palette PNGs OOM-killed both workers of a 1 GiB pod.

After a large request the worker gives the memory back to the system (``malloc_trim``), so
that idle RSS returns near its start instead of staying at the peak (609-731 MiB a worker
after large images, where it started at 100).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .errors import ImageTooLarge, Overloaded

log = logging.getLogger(__name__)

MIB = 1024 * 1024
#: A reservation this large is given back to the system once released.
TRIM_AFTER_BYTES = 32 * MIB
#: glibc's mallopt parameter: allocations from this size are mapped on their own and
#: unmapped when freed. glibc raises its threshold after each such free (up to 32 MiB), after
#: which image-sized buffers come from the heap and stay there; a fixed one keeps them apart.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 * MIB


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 - glibc only: musl has none
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def configure_allocator() -> None:
    """Large buffers mapped apart from the heap, so that freeing them gives them back."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def give_back() -> None:
    """Returns the heap's free memory to the system (glibc; nothing elsewhere)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class MemoryAccount:
    """The worker's memory budget: thread-safe, so that the event loop and the decode
    threads reserve from the same one."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.reserved = 0
        self.peak = 0
        self._changed = threading.Condition()  # its lock is reentrant: `reclaim` may release
        #: Frees up to the bytes asked of what is held only to save work (the answer cache,
        #: service/cache.py) and says how many it freed: requests come before it.
        self.reclaim: Callable[[int], int] | None = None

    def _fits(self, cost: int) -> bool:
        if cost > self.capacity:
            raise ImageTooLarge(
                f"the request needs {cost / MIB:.0f} MiB, more than this worker's memory budget of "
                f"{self.capacity / MIB:.0f} MiB; send a smaller image",
                limit=self.capacity,
            )
        short = self.reserved + cost - self.capacity
        if short > 0 and self.reclaim is not None:
            self.reserved -= self.reclaim(short)
        return self.reserved + cost <= self.capacity

    def try_reserve(self, cost: int) -> bool:
        """Reserves ``cost`` bytes if they fit now, without reclaiming (what saves work
        never displaces itself), and says whether it did."""
        with self._changed:
            if cost > self.capacity or self.reserved + cost > self.capacity:
                return False
            self._take(cost)
            return True

    def _take(self, cost: int) -> None:
        self.reserved += cost
        self.peak = max(self.peak, self.reserved)

    def reserve_now(self, cost: int) -> None:
        """Reserves ``cost`` bytes at once, or 429 (the event loop never waits)."""
        with self._changed:
            if not self._fits(cost):
                raise Overloaded("the worker's memory is taken by requests in flight; retry later")
            self._take(cost)

    def reserve_waiting(self, cost: int, wait_s: float) -> None:
        """Reserves ``cost`` bytes, waiting up to ``wait_s`` for others to give some back
        (a decode thread), or 429."""
        deadline = time.monotonic() + wait_s
        with self._changed:
            while not self._fits(cost):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Overloaded("the worker's memory is taken by images being decoded; retry later")
                self._changed.wait(left)
            self._take(cost)

    def release(self, cost: int) -> None:
        with self._changed:
            self.reserved -= cost
            self._changed.notify_all()
        if cost >= TRIM_AFTER_BYTES:
            give_back()

    @contextmanager
    def held(self, cost: int) -> Iterator[None]:
        """``cost`` bytes reserved at once (or 429) while the block runs."""
        self.reserve_now(cost)
        try:
            yield
        finally:
            self.release(cost)
