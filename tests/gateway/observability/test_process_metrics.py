"""process_cpu_seconds_total and process_resident_memory_bytes on /metrics: the default
collector's in one process, the whole process tree's (supervisor and workers, from /proc)
in Prometheus multiprocess mode."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import metrics

from ...helpers import ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux only)")

PAGE = os.sysconf("SC_PAGESIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def families(text: str) -> dict[str, tuple[str, float]]:
    """name -> (type, value) of the unlabelled process_* families."""
    found = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("process_"):
            found[family.name] = (family.type, family.samples[0].value)
    return found


def own_rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def worker(role: str, multiproc_dir: str, results: multiprocessing.Queue, go) -> None:
    """A stand-in for a uvicorn worker: a spawned child of the supervisor (the test)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
    if role == "busy":
        burn(0.5)
        results.put(("busy", own_cpu(), own_rss()))
        go.wait(60)  # stays alive while the other one scrapes
        return
    go.wait(60)
    payload, _ = metrics.render()
    results.put(("scraper", payload.decode(), own_rss()))


def test_single_process_keeps_the_default_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    payload, _ = metrics.render()
    text = payload.decode()
    found = families(text)
    assert found["process_cpu_seconds"][0] == "counter"
    assert found["process_resident_memory_bytes"][0] == "gauge"
    assert "Total user and system CPU time spent in seconds." in text  # the default's help
    assert "process tree" not in text
    assert "process_open_fds" in found and "process_start_time_seconds" in found


ALONE = """
import json, os, sys, time
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from service import metrics
end = time.process_time() + 0.3
while time.process_time() < end:
    pass
before = os.times()
payload, _ = metrics.render()
after = os.times()
statm = open("/proc/self/statm").read().split()
print(json.dumps({
    "text": payload.decode(),
    "cpu": [before.user + before.system, after.user + after.system],
    "rss": int(statm[1]) * os.sysconf("SC_PAGESIZE"),
}))
"""


def test_multiprocess_mode_exports_a_lone_process(tmp_path: Path) -> None:
    """One process with the multiprocess directory set (one worker, no supervisor): its own
    figures. A fresh interpreter, so that no earlier child of pytest's is counted."""
    result = subprocess.run(
        [sys.executable, "-c", ALONE, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    answer = json.loads(result.stdout)
    found = families(answer["text"])
    assert found["process_cpu_seconds"][0] == "counter"
    assert found["process_resident_memory_bytes"][0] == "gauge"
    cpu, rss = found["process_cpu_seconds"][1], found["process_resident_memory_bytes"][1]
    low, high = answer["cpu"]
    assert low >= 0.3
    assert low - 0.02 <= cpu <= high + 0.02  # /proc counts in clock ticks
    assert 0.8 * answer["rss"] <= rss <= 1.25 * answer["rss"]


def test_multiprocess_mode_sums_supervisor_and_workers(tmp_path: Path) -> None:
    """Two spawned workers, as uvicorn starts them; the one scraped reports the tree: the
    supervisor (this test's process), itself and the worker that burned CPU."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    go = context.Event()
    children = [
        context.Process(target=worker, args=(role, str(tmp_path), results, go))
        for role in ("busy", "scraper")
    ]
    for child in children:
        child.start()
    try:
        _, busy_cpu, busy_rss = results.get(timeout=60)
        supervisor_cpu, supervisor_rss = own_cpu(), own_rss()
        go.set()
        _, text, scraper_rss = results.get(timeout=60)
    finally:
        go.set()
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
    found = families(text)
    assert found["process_cpu_seconds"][0] == "counter"
    assert found["process_resident_memory_bytes"][0] == "gauge"
    cpu, rss = found["process_cpu_seconds"][1], found["process_resident_memory_bytes"][1]
    assert busy_cpu >= 0.5
    assert cpu >= supervisor_cpu + busy_cpu - 0.05
    assert rss >= 0.8 * (supervisor_rss + busy_rss + scraper_rss)
    assert rss < 64 * 2**30


def write_stat(proc: Path, pid: int, comm: str, ppid: int, ticks: tuple[int, ...], rss: int) -> None:
    utime, stime, cutime, cstime = ticks
    fields = ["S", ppid, 1, 1, 0, -1, 0, 0, 0, 0, 0, utime, stime, cutime, cstime, 20, 0, 1, 0, 0, 0, rss]
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "stat").write_text(f"{pid} ({comm}) " + " ".join(map(str, fields)) + " 0 0\n")


def test_tree_sums_from_a_fake_proc(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    write_stat(proc, 10, "uvicorn", 1, (100, 50, 30, 20), 1000)  # reaped a worker: cutime
    write_stat(proc, 11, "python3 (spawn) x", 10, (200, 100, 0, 0), 3000)  # odd command name
    write_stat(proc, 12, "python3", 10, (300, 0, 0, 0), 2000)
    write_stat(proc, 13, "sh", 12, (1, 1, 0, 0), 10)  # a worker's child
    write_stat(proc, 20, "other", 1, (5000, 0, 0, 0), 9000)  # not ours
    (proc / "self").mkdir()
    (proc / "99").mkdir()  # gone meanwhile: no stat

    collector = metrics.ProcessTreeCollector(root_pid=10, proc=proc)
    cpu, rss, count = collector.totals()
    assert count == 4
    assert cpu == pytest.approx((150 + 50 + 300 + 300 + 2) / TICKS)
    assert rss == (1000 + 3000 + 2000 + 10) * PAGE

    assert metrics.ProcessTreeCollector(root_pid=12, proc=proc).totals()[2] == 2
    assert metrics.ProcessTreeCollector(root_pid=77, proc=proc).collect() == []
    assert metrics.ProcessTreeCollector(root_pid=10, proc=tmp_path / "none").collect() == []


IN_FLIGHT_NAME = "inception_gateway_in_flight_requests"
IN_FLIGHT_THEN_HANG = """
import os, sys, time
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from service import metrics
metrics.IN_FLIGHT.inc(3)
print("ready", flush=True)
time.sleep(60)
"""

SCRAPE = """
import os, sys
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from service import metrics
print(metrics.render()[0].decode())
"""


def in_flight(text: str) -> float:
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == IN_FLIGHT_NAME]
    return sum(sample.value for sample in family.samples)


def test_a_killed_workers_in_flight_requests_are_forgotten(tmp_path: Path) -> None:
    """A worker killed mid-request (SIGKILL, OOM) never marks itself dead: the next scrape
    must drop its live gauge rather than count its in-flight requests forever."""
    worker = subprocess.Popen(
        [sys.executable, "-c", IN_FLIGHT_THEN_HANG, str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        before = subprocess.run(
            [sys.executable, "-c", SCRAPE, str(tmp_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert in_flight(before) == 3
    finally:
        worker.kill()
        worker.wait()
    after = subprocess.run(
        [sys.executable, "-c", SCRAPE, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert in_flight(after) == 0
