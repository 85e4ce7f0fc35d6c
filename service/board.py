"""Which clients send to which model, shared by the workers of one gateway.

Admission's fair shares and the time slices of multi-crop requests depend on whether a
client shares its model with others. Each uvicorn worker is a process of its own, and a
client's keep-alive connection stays with one worker: a victim sending one photo at a
time to worker A is unseen by worker B, where a greedy client, alone as far as B can
tell, took its whole limit and full batches into the Triton queue the victim waited in
(issue 19). The board is a table in shared memory where each worker notes, per model, the
clients it has just served; every worker counts the others' too.

A small fixed table (:data:`SLOTS` entries of a key, the model's and client's hashes, and
when it was last seen), open-addressed, without locks: a lost or torn write makes a client
count or not for at most :data:`ACTIVE_S`, which only nudges a share for that long. The
table lives in ``/dev/shm`` (or the temporary directory), named after the workers' parent
process (uvicorn's supervisor), and is removed by the first worker that stops, the others
keeping their mapping.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np

#: Entries in the table: clients seen within :data:`ACTIVE_S` on every model together.
SLOTS = 1024
#: Slots looked at from a key's home before the key is given up on (the table is full).
PROBES = 16
#: How long a client that held places still counts as sharing the model, in this worker
#: (service/admission.py) and on the board.
ACTIVE_S = 2.0
#: How long a client noted as holding places counts as holding them, unless noted again:
#: longer than any request runs, so that only a worker that died holding them leaves a
#: mark, and that for no longer than this.
HOLD_S = 120.0
_ENTRY = np.dtype([("key", "<u8"), ("seen", "<f8")])


def key_of(model: str, client: str) -> int:
    """A nonzero 64-bit key: the model's hash in the high half, the client's in the low."""
    return (client_hash(model) << 32) | client_hash(client)


@lru_cache(maxsize=4096)
def client_hash(name: str) -> int:
    """A client's (or a model's) 32-bit hash, never zero (zero marks a free slot); kept,
    since admission asks for its clients' at every request."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little") or 1


def default_path() -> Path:
    """The board of this worker's gateway: named after the parent all its workers share."""
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return root / f"inception-gateway-board-{os.getppid()}"


class Board:
    """The shared table, mapped; one per worker."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.clock = clock  # CLOCK_MONOTONIC: one clock for every process of the machine
        size = SLOTS * _ENTRY.itemsize
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)  # zeros: every slot free; a second ftruncate is a no-op
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.table = np.frombuffer(self._map, dtype=_ENTRY)

    @classmethod
    def for_workers(cls, workers: int) -> Board | None:
        """The board of this gateway's workers, or None for a single worker (it sees all)."""
        if workers <= 1:
            return None
        try:
            return cls(default_path())
        except OSError:
            return None  # no shared memory: each worker sees its own clients, as before

    def note(self, model: str, client: str, holding: bool = False) -> None:
        """``client`` is served by ``model`` now, and holds places there (in this worker)
        or not. A hold is marked as a time :data:`HOLD_S` ahead; the workers share one entry
        per model and client, so a worker that ends its hold ends another's too, which then
        shows again at that worker's next request."""
        key = key_of(model, client)
        now = self.clock()
        mark = now + HOLD_S if holding else now
        keys, seen = self.table["key"], self.table["seen"]
        home = key % SLOTS
        free = None
        for step in range(PROBES):
            at = (home + step) % SLOTS
            if keys[at] == key:
                seen[at] = mark
                return
            if free is None and (keys[at] == 0 or now - seen[at] > ACTIVE_S):
                free = at
        if free is not None:
            seen[free] = mark
            keys[free] = key

    def holding(self, model: str, client: str) -> bool:
        """Whether a worker noted ``client`` as holding places at ``model`` (this one too)."""
        key = key_of(model, client)
        keys, seen = self.table["key"], self.table["seen"]
        home = key % SLOTS
        for step in range(PROBES):
            at = (home + step) % SLOTS
            if keys[at] == key:
                return bool(seen[at] > self.clock())
        return False

    def clients(self, model: str) -> set[int]:
        """The hashes of the clients any worker served ``model`` within :data:`ACTIVE_S`."""
        model_half = client_hash(model)
        keys, seen = self.table["key"], self.table["seen"]
        recent = (keys >> np.uint64(32) == np.uint64(model_half)) & (self.clock() - seen <= ACTIVE_S)
        return {int(k) & 0xFFFFFFFF for k in keys[recent]}

    def close(self, remove: bool = True) -> None:
        if remove:
            self.path.unlink(missing_ok=True)
        del self.table
        self._map.close()


def hashes(clients: Iterable[str]) -> set[int]:
    return {client_hash(c) for c in clients}
