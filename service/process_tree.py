"""CPU seconds and resident memory of the gateway's whole process tree, the uvicorn
supervisor and all its workers, read from ``/proc`` and summed, under the names and types of
prometheus_client's default process collector.

In multiprocess mode that default collector is of no use (it would describe only the worker
that happens to answer the scrape), so :func:`service.metrics.render` registers this one
instead; every worker computes the same sums, so whichever answers, the series is the same.
Apart from the metrics' declarations because it is a reader of ``/proc``, not a metric.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


def has_ended(pid: int) -> bool:
    """Whether no process has this pid: a worker killed without a clean stop leaves files
    named after it (metrics, shared memory) that the living must drop. Another user's
    process still counts as running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def gateway_root_pid() -> int:
    """The pid at the top of the gateway's process tree, seen from this process.

    A uvicorn worker (``--workers N``, or ``--reload``) is a multiprocessing child of the
    uvicorn supervisor, so the tree is the supervisor's; a lone process (one worker) is its
    own tree. Where the supervisor is gone (the worker was re-parented), only this process.
    """
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid == os.getppid():
        return parent.pid
    return os.getpid()


class ProcessTreeCollector(Collector):
    """CPU seconds and resident memory of a process and all its descendants, from ``/proc``.

    The CPU seconds of each process count its own user and system time and that of the
    children it has reaped (``cutime``, ``cstime``): a worker that exits and is reaped by the
    supervisor moves its seconds into the supervisor's, so the sum does not fall back (which
    ``rate()`` would take for a counter reset). Exports nothing where there is no ``/proc``.
    """

    def __init__(
        self,
        root_pid: int | None = None,
        proc: str | os.PathLike[str] = "/proc",
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.root_pid = root_pid
        self.proc = Path(proc)
        try:
            self.ticks = float(os.sysconf("SC_CLK_TCK"))
            self.pagesize = os.sysconf("SC_PAGESIZE")
        except (ValueError, OSError, AttributeError):  # not a POSIX system
            self.ticks, self.pagesize = 100.0, 4096
        if registry is not None:
            registry.register(self)

    def _stat(self, pid: str) -> list[str] | None:
        """The fields of /proc/PID/stat after the command name (field 3, state, first)."""
        try:
            text = (self.proc / pid / "stat").read_bytes().decode(errors="replace")
        except OSError:  # gone meanwhile, or not readable
            return None
        _, _, rest = text.rpartition(")")  # the command name may hold spaces and parentheses
        fields = rest.split()
        return fields if len(fields) >= 22 else None

    def _tree(self, root: int) -> Iterator[list[str]]:
        stats: dict[int, list[str]] = {}
        children: dict[int, list[int]] = {}
        try:
            entries = [e.name for e in os.scandir(self.proc) if e.name.isdigit()]
        except OSError:
            return
        for name in entries:
            fields = self._stat(name)
            if fields is None:
                continue
            pid = int(name)
            stats[pid] = fields
            children.setdefault(int(fields[1]), []).append(pid)  # field 4: ppid
        pending, seen = [root], set()
        while pending:
            pid = pending.pop()
            if pid in seen or pid not in stats:
                continue
            seen.add(pid)
            yield stats[pid]
            pending.extend(children.get(pid, ()))

    def totals(self) -> tuple[float, int, int] | None:
        """(CPU seconds, resident bytes, processes) of the tree; None without /proc."""
        root = self.root_pid if self.root_pid is not None else gateway_root_pid()
        ticks = rss_pages = processes = 0
        for fields in self._tree(root):
            # fields[k] is /proc/PID/stat field k + 3: utime 14, stime 15, cutime 16,
            # cstime 17, rss 24 (pages); a zombie's rss reads 0.
            ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
            rss_pages += int(fields[21])
            processes += 1
        if processes == 0:
            return None
        return ticks / self.ticks, rss_pages * self.pagesize, processes

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        totals = self.totals()
        if totals is None:
            return []
        cpu, rss, _ = totals
        return [
            CounterMetricFamily(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds"
                " (the gateway's process tree: supervisor and workers).",
                value=cpu,
            ),
            GaugeMetricFamily(
                "process_resident_memory_bytes",
                "Resident memory size in bytes (the gateway's process tree: supervisor and workers).",
                value=rss,
            ),
        ]
