"""One worker's share of the machine, read from the operating system: the memory limits of
its cgroups (v2 or v1, nested or not), the uvicorn workers sharing them, what the worker
holds before serving anything, and the memory budgets the settings default to from them.

Apart from the settings because these read ``/proc``, ``/sys`` and ``WEB_CONCURRENCY``
themselves, outside pydantic's reading of the ``GATEWAY_`` environment.
"""

from __future__ import annotations

import os
from pathlib import Path


def _cgroup_limit_files() -> list[str]:
    """The memory-limit files of this process's cgroup and of each ancestor, from
    ``/proc/self/cgroup``: a process in a nested cgroup (a pod's container seen from the
    host, a test's limited group) reads its own limit, not the root's, which says nothing."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    files = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            root, name = "/sys/fs/cgroup", "memory.max"
        elif "memory" in controllers.split(","):
            root, name = "/sys/fs/cgroup/memory", "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        files += [str(Path(root, *parts[:depth], name)) for depth in range(len(parts), 0, -1)]
    return files


def _limit_in(path: str) -> int | None:
    """The number in a cgroup's limit file; None when absent or ``max`` (no limit)."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def worker_memory_bytes() -> int:
    """The memory one worker may use: the tightest of the machine's memory and the limits of
    the container's cgroup (v2 or v1, and of the cgroup this process is in, nested or not),
    shared by the uvicorn workers (`WEB_CONCURRENCY`, which `embedded/gateway.py` sets too)."""
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    own = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # a container's
    container = next((v for v in map(_limit_in, own) if v is not None), machine)
    limit = min([machine, container, *(v for v in map(_limit_in, _cgroup_limit_files()) if v is not None)])
    return limit // worker_count()


def worker_count() -> int:
    """The uvicorn workers of this gateway (`WEB_CONCURRENCY`, set by every launcher that
    runs several): 1 when unset or not a number."""
    try:
        return max(1, int(os.environ.get("WEB_CONCURRENCY", "1")))
    except ValueError:
        return 1


def resident_bytes() -> int:
    """This process's resident memory now (0 where /proc cannot tell)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


#: The part of a worker's memory its account may hand out: the rest is headroom for what no
#: request reserves (the allocator's slack, gRPC's buffers, the interpreter's growth).
MEMORY_ACCOUNT_FRACTION = 0.85


def default_memory_budget() -> int:
    """What one worker's requests may reserve at once: its share of the memory, less the
    headroom, less what the worker holds before serving anything (read when settings are,
    in the worker, after the libraries are imported); at least 64 MiB."""
    return max(64 * 1024 * 1024, int(worker_memory_bytes() * MEMORY_ACCOUNT_FRACTION) - resident_bytes())


def default_buffer_budget() -> int:
    """A quarter of a worker's memory for request bodies in flight; the rest is for
    decoding, the interpreter and the libraries."""
    return worker_memory_bytes() // 4
