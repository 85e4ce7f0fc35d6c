"""The one launcher of the gateway process: `make serve`, the tests and the benches start
uvicorn through it, so they all run the command line and environment a deployment runs.

A gateway started here lives in a session of its own (stopping it ends its workers), gets
only the settings it is given (never `GATEWAY_*` variables or a metrics folder inherited
from the shell that started it, which would make a test depend on who ran it), and can be
waited for over HTTP while its death is watched. Imports no torch.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TypeVar

from embedded.processes import free_port, start_group, stop_group, wait_http

ROOT = Path(__file__).resolve().parent.parent


#: The HTTP protocol of every gateway: h11 with bounded headers and connections
#: (service/protocol.py). The image's entrypoint (deploy/gateway-entrypoint.sh) names the same.
#: uvicorn's --limit-concurrency is not passed, and --h11-max-incomplete-event-size need not
#: be: the protocol's docstring says what each would change for a client.
BOUNDED_HTTP = ("--http", "service.protocol:BoundedH11Protocol")


def gateway_command(
    port: int, workers: int = 1, host: str = "127.0.0.1", graceful_s: int = 10, python: str = sys.executable
) -> list[str]:
    """The uvicorn command line of the gateway."""
    return [
        python,
        "-m",
        "uvicorn",
        "service.app:app",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--no-access-log",  # the gateway logs each request itself, as JSON with its request id
        *BOUNDED_HTTP,
        "--timeout-graceful-shutdown",
        str(graceful_s),
    ]


def gateway_environment(
    grpc_url: str,
    multiproc_dir: Path | None = None,
    settings: Mapping[str, str] | None = None,
    *,
    checkout_on_path: bool = True,
) -> dict[str, str]:
    """This process's environment without inherited gateway settings, pointed at Triton, with
    `settings` over it; multiprocess metrics when the gateway runs several workers
    (`multiproc_dir`). The checkout goes on PYTHONPATH, so a gateway started from a script
    imports the same `service` package as the one that started it, unless the gateway runs
    another interpreter that must import its own installed copy (a fresh install)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GATEWAY_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env["GATEWAY_TRITON_GRPC_URL"] = grpc_url
    if checkout_on_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if multiproc_dir is not None:
        multiproc_dir.mkdir(parents=True, exist_ok=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc_dir)
    env.update(settings or {})
    return env


class Gateway:
    """``uvicorn service.app:app`` in its own process group, on `port` (a free one by default)."""

    def __init__(
        self,
        grpc_url: str,
        log_path: Path | None = None,
        *,
        workers: int = 1,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        graceful_s: int = 5,
        python: str = sys.executable,
        cwd: Path = ROOT,
        multiproc_dir: Path | None = None,
    ) -> None:
        self.port = port if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.multiproc_dir = multiproc_dir
        # Each worker budgets its share of the memory (service/worker_share.py), as under the
        # image's entrypoint, where WEB_CONCURRENCY is the workers' count too.
        self.environment = gateway_environment(
            grpc_url,
            multiproc_dir,
            {"WEB_CONCURRENCY": str(workers), **(env or {})},
            checkout_on_path=python == sys.executable,
        )
        self.command = gateway_command(self.port, workers, host, graceful_s=graceful_s, python=python)
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self: G) -> G:
        self.process = start_group(self.command, env=self.environment, cwd=self.cwd, log_path=self.log_path)
        return self

    @property
    def pid(self) -> int:
        """The uvicorn parent's pid (its workers are its children)."""
        if self.process is None:
            raise RuntimeError("the gateway is not running")
        return self.process.pid

    def wait(self: G, path: str = "/healthz", timeout: float = 120.0) -> G:
        wait_http(self.url + path, timeout, self.process, describe=self.log)
        return self

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        process, self.process = self.process, None
        stop_group(process)


G = TypeVar("G", bound=Gateway)


@contextlib.contextmanager
def serving(gateway: G) -> Iterator[G]:
    """`gateway` started and ready (Triton and every routed model), stopped on exit."""
    try:
        yield gateway.start().wait("/readyz")
    finally:
        gateway.stop()
