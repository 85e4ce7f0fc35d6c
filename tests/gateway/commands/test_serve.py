"""``python -m embedded.serve`` (what ``make serve`` runs): Triton and the gateway come up,
answer, and on Ctrl-C, SIGTERM or SIGHUP (a closed terminal) both stop, leaving no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from embedded.processes import free_port

from ..helpers import classify, photo, read_until_serving, start_serve

pytestmark = pytest.mark.integration


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (Linux /proc), whatever session it moved to."""
    found: set[int] = set()
    stack = [pid]
    while stack:
        parent = stack.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            for child in children:
                if child not in found:
                    found.add(child)
                    stack.append(child)
    return found


def command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def read_until_line(process: subprocess.Popen[str], text: str, timeout: float) -> str:
    """Its output up to a line containing ``text``, read in a thread so that a launcher
    that never says it cannot hang the test."""
    assert process.stdout is not None
    stdout = process.stdout
    output: list[str] = []

    def read() -> None:
        for line in stdout:
            output.append(line)
            if text in line:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return "".join(output)


@pytest.mark.parametrize(
    "stop_signal", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["ctrl-c", "sigterm", "sighup"]
)
def test_serve_starts_both_and_stops_both(
    one_model_repository: Path,
    tmp_path: Path,
    stop_signal: signal.Signals,
) -> None:
    port = free_port()
    process = start_serve(one_model_repository, tmp_path, port, WORKERS="2")
    try:
        text = read_until_serving(process)
        assert "curl" in text and f"127.0.0.1:{port}" in text, text
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            answer = classify(client, photo("chelsea.png").read_bytes(), "image/png")
        assert answer.status_code == 200, answer.text
        children = descendants(process.pid)
        names = {pid: command_name(pid) for pid in children}
        assert "tritonserver" in names.values(), names
        assert len(children) >= 4, names  # tritonserver, uvicorn, its two workers
        # One backend: the models run inside tritonserver, with no Python-backend stubs.
        assert not [n for n in names.values() if "stub" in n], names
        process.send_signal(stop_signal)
        rest, _ = process.communicate(timeout=60)
        assert process.returncode == 0, text + rest
        assert "stopped." in rest
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in children if alive(pid)]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_restarts_a_dead_triton_and_answers_503_meanwhile(
    one_model_repository: Path, tmp_path: Path
) -> None:
    """Triton killed under `make serve`: every request during the outage gets a fast 503
    with Retry-After, and answers are 200 again within 5 s of the gateway being ready."""
    port = free_port()
    process = start_serve(one_model_repository, tmp_path, port, WORKERS="1", GATEWAY_TRITON_TIMEOUT_S="5")
    data = photo("chelsea.png").read_bytes()
    try:
        read_until_serving(process)
        (triton_pid,) = [p for p in descendants(process.pid) if command_name(p) == "tritonserver"]
        os.kill(triton_pid, signal.SIGKILL)
        outage = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                started = time.monotonic()
                answer = classify(client, data, "image/png")
                took = time.monotonic() - started
                if answer.status_code == 200:
                    break
                outage.append((answer.status_code, took, answer.headers.get("Retry-After")))
                if client.get("/readyz").status_code == 200:
                    ready_at = time.monotonic()
                    answer = classify(client, data, "image/png")
                    while answer.status_code != 200 and time.monotonic() - ready_at < 5:
                        time.sleep(0.2)
                        answer = classify(client, data, "image/png")
                    assert answer.status_code == 200, answer.text
                    break
                time.sleep(0.2)
            assert answer.status_code == 200, outage
        # The gateway can answer 200 a moment before the launcher's own readiness poll
        # sees the new Triton and says so: wait for its line rather than race it.
        said = read_until_line(process, "ready again", timeout=60)
        assert "ready again" in said, said
        assert outage, "the outage was not seen"
        assert all(status == 503 and retry for status, _, retry in outage), outage
        assert all(took < 6 for _, took, _ in outage), outage
        assert [p for p in descendants(process.pid) if command_name(p) == "tritonserver"] != [triton_pid]
    finally:
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
    assert "restarting in" in said + rest, said + rest


def test_serve_killed_outright_takes_its_children_along(one_model_repository: Path, tmp_path: Path) -> None:
    """SIGKILL leaves the launcher no clean-up: the children die with it all the same."""
    process = start_serve(one_model_repository, tmp_path, free_port())
    read_until_serving(process)
    children = descendants(process.pid)
    assert len(children) >= 2
    process.kill()
    process.wait()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in children if alive(pid)]
