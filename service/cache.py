"""Answers cached by content: a repeated image (the same product photo, avatar or meme) is
answered without decoding it or running it again.

Triton's own response cache keys on the input tensors, so it could save only the network's
work: decoding and preprocessing, most of the gateway's CPU, would still be spent on every
repeat. This cache sits in front of both.

**What is cached.** The image's probabilities over the 1000 classes (after the crops'
mean and an ensemble's weighted sum), not an answer: ``top_k`` is cut from them on every
hit, so requests that differ only in ``top_k`` share an entry, and the answer's other
fields (provenance, members, warning) are read from the model configs of the moment.

**The key** (:func:`cache_key`, :func:`cache_keys`) is the sha256 of the image's bytes,
the route (the model, or the members of a per-request ensemble with their coefficients),
the options that change how probabilities are computed (each option declares whether it
does: ``Bearing`` in service/option_marks.py; today ``crops``), and each
served network's weights sha256 as its Triton config says (``weights_sha256``, re-read
every ``GATEWAY_CONFIG_MAX_AGE_S``), so that new weights never serve an old answer. A
network whose config names no sha256 (random initialisation, or a config no export wrote)
has no identity to key on: its answers are not cached.

**Bounds.** ``GATEWAY_CACHE_BYTES`` per worker, least recently used first out; every entry
is reserved from the worker's memory account (service/memory.py) and handed back to it on
demand (``MemoryAccount.reclaim``): requests come first, the cache holds what is left.
Each worker has its own cache (no shared memory between uvicorn workers), so with several
workers a repeat is a hit in the worker that answered it before.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
from starlette.datastructures import Headers

from . import metrics
from .memory import MemoryAccount
from .provenance import Served
from .routing import Plan

#: What one entry costs beyond its probabilities: the key (a 32-byte digest as a bytes
#: object), the array's header, and the ordered dict's node (measured: 4,000 bytes of
#: float32 probabilities took 4.3 KiB each in a full cache).
ENTRY_OVERHEAD = 400


def cache_key(image: bytes, route: Sequence[object], computed: Any, weights_sha256: Sequence[str]) -> bytes:
    """The identity of an answer: the image's bytes, how it is served (the model, or the
    members and their coefficients), the options that change its computation (JSON), and
    the weights that compute it."""
    digest = hashlib.sha256(image)
    digest.update(json.dumps([list(route), computed, list(weights_sha256)], sort_keys=True).encode())
    return digest.digest()


def cache_directives(headers: Headers) -> set[str]:
    return {d.strip().lower() for d in headers.get("cache-control", "").split(",")}


def revalidates(headers: Headers) -> bool:
    """``Cache-Control: no-cache`` (what a browser's ``fetch(..., {cache: "no-store"})``
    sends): no stored answer is used, as HTTP means it, but the computed one is stored."""
    return "no-cache" in cache_directives(headers)


def cache_keys(
    enabled: bool, headers: Headers, plan: Plan, served: Served, images: list[bytes], computed: dict[str, Any]
) -> list[bytes]:
    """Each image's key, or none when the answer is not to be cached: the cache is off
    (``enabled``), the client said ``Cache-Control: no-store``, or a network's weights have
    no sha256 to tell new weights from old. An ensemble's members are keyed with their
    weights (the Triton ensemble's from its config); ``computed``: the options that change
    the probabilities (``computed_options``, service/options.py)."""
    networks = [i for i in served.involved if not i.is_ensemble]
    if (
        not enabled
        or "no-store" in cache_directives(headers)
        or not all(i.checkpoint_sha256 for i in networks)
    ):
        return []
    members = [(m.model, m.weight) for m in served.members or []]
    route = [plan.name, list(plan.targets), list(plan.coefficients), members]
    weights = [f"{i.name}:{i.checkpoint_sha256}" for i in networks]
    return [cache_key(image, route, computed, weights) for image in images]


def count_lookups(label: str, keys: list[bytes], misses: int) -> None:
    if keys:
        metrics.CACHE_HITS.labels(label).inc(len(keys) - misses)
        metrics.CACHE_MISSES.labels(label).inc(misses)


def cache_status(keys: list[bytes], images: int, misses: int) -> str:
    """``X-Cache``: every image from the cache, none, some (a batch), or the cache not used."""
    if not keys:
        return "bypass"
    return "miss" if misses == images else "hit" if misses == 0 else "partial"


class AnswerCache:
    """A least-recently-used map from :func:`cache_key` to float32 probabilities, bounded
    in bytes and charged to the worker's memory account. Thread-safe; it never calls the
    account while holding its own lock, so that the account may reclaim from it while a
    decode thread holds the account's."""

    def __init__(self, capacity_bytes: int, memory: MemoryAccount) -> None:
        self.capacity = capacity_bytes
        self.memory = memory
        self.bytes = 0
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        memory.reclaim = self.reclaim

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def cost(probabilities: np.ndarray) -> int:
        return int(probabilities.nbytes) + ENTRY_OVERHEAD

    def get(self, key: bytes) -> np.ndarray | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: bytes, probabilities: np.ndarray) -> bool:
        """Keeps the probabilities (as float32, read-only) if the account has room for them,
        first dropping the least recently used past the capacity; says whether it did."""
        value = np.array(probabilities, dtype=np.float32)
        value.setflags(write=False)
        cost = self.cost(value)
        if cost > self.capacity or not self.memory.try_reserve(cost):
            return False
        with self._lock:
            replaced = self._entries.pop(key, None)
            self._entries[key] = value
            self.bytes += cost - (self.cost(replaced) if replaced is not None else 0)
            freed = self.cost(replaced) if replaced is not None else 0
            freed += self._evict(self.bytes - self.capacity)
        if freed:
            self.memory.release(freed)
        return True

    def _evict(self, excess: int) -> int:
        """Drops the least recently used until ``excess`` bytes are out; what it dropped.
        The caller holds the lock."""
        freed = 0
        while freed < excess and self._entries:
            _, value = self._entries.popitem(last=False)
            freed += self.cost(value)
        self.bytes -= freed
        return freed

    def reclaim(self, wanted: int) -> int:
        """For the memory account, under its lock: drops entries worth ``wanted`` bytes and
        says how many it dropped (the account takes them off itself)."""
        with self._lock:
            return self._evict(wanted)

    def clear(self) -> None:
        with self._lock:
            freed = self._evict(self.bytes)
        if freed:
            self.memory.release(freed)
