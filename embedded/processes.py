"""Child processes the way the launchers, the tests and the benches all need them: on a
free loopback port, in a session of their own (so that stopping one ends whatever it
started: uvicorn's workers, Triton's helpers), stopped with escalation, and waited for
over HTTP while watching that they have not died."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path


class NotReady(RuntimeError):
    """A process that exited, or a URL that did not answer 200 in time."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now on 127.0.0.1 (another process may take it before it is bound), and
    never one this process handed out before: a tritonserver's three ports, or two
    servers', are chosen before any is bound, and the kernel may offer a port again once
    its probe socket is closed (two replicas once got the same port for HTTP and metrics)."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no port on 127.0.0.1 that this process has not handed out already")


_PR_SET_PDEATHSIG = 1
# Looked up once here: the child, between fork and exec, only makes the call.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies, however it dies (a SIGKILL
    to `make serve` cannot run its clean-up, and the children left its session)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def start_group(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    log_path: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Starts `command` in its own session, its output appended to `log_path` (or dropped)."""
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") if log_path is not None else open(os.devnull, "wb") as out:
        return subprocess.Popen(
            list(command),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def stop_group(process: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> None:
    """SIGTERM the group of a child started by `start_group`, SIGKILL it if it lingers past
    `timeout`, then SIGKILL whatever is left of the group."""
    if process is None:
        return
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # stragglers of the group


def answers_200(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_http(
    url: str,
    timeout: float,
    alive: subprocess.Popen[bytes] | None = None,
    describe: Callable[[], str] = lambda: "",
    interval: float = 0.25,
    cancelled: Callable[[], bool] = lambda: False,
) -> bool:
    """Polls `url` until it answers 200 (True) or `cancelled()` says to give up (False);
    raises NotReady if `alive` exits first or the timeout passes, with `describe()` (a log
    tail, say) in the message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cancelled():
            return False
        if alive is not None and alive.poll() is not None:
            detail = describe()
            raise NotReady(
                f"the process serving {url} exited with code {alive.returncode}"
                + (f": {detail}" if detail else ""),
                alive.returncode,
            )
        if answers_200(url):
            return True
        time.sleep(interval)
    detail = describe()
    raise NotReady(f"{url} did not answer 200 within {timeout:.0f} s" + (f": {detail}" if detail else ""))


def log_tail(path: Path, chars: int = 3000) -> Callable[[], str]:
    return lambda: path.read_text(errors="replace")[-chars:] if path.is_file() else ""


@contextlib.contextmanager
def running(
    command: Sequence[str],
    ready_url: str,
    timeout: float,
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """`command` started in its own group, ready once `ready_url` answers 200 (its log's
    tail in the error otherwise), and stopped on exit, whatever happened in between."""
    process = start_group(command, env=env, cwd=cwd, log_path=log_path)
    try:
        wait_http(ready_url, timeout, process, describe=log_tail(log_path))
        yield process
    finally:
        stop_group(process)
