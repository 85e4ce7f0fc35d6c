"""Starts the tritonserver that ships inside the `nvidia-pytriton` wheel.

The wheel carries Triton with only the Python backend, its shared libraries in
`nvidia_pytriton.libs`, and Python-backend stubs per Python version. The stub must sit in
the backend's folder, which lives in site-packages; rather than write there, we assemble a
backend directory of links under a private folder. The stub runs the repository's
`model.py` files with this interpreter's packages on its path (torch for the runner).

Imports no torch: `make serve` and the tests use it from the same environment as the
gateway.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType


class TritonError(RuntimeError):
    pass


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise TritonError(f"{name} is not installed: install the 'embedded' extra (nvidia-pytriton)")
    return Path(next(iter(spec.submodule_search_locations)))


def pytriton_home() -> Path:
    return _package_dir("pytriton") / "tritonserver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare_backends(dest: Path) -> Path:
    """backends/python with the wheel's backend library, utils and the stub for this
    Python version, all as links."""
    home = pytriton_home()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = home / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonError(f"the pytriton wheel has no Python-backend stub for Python {version}")
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for source in [*sorted((home / "backends" / "python").glob("*.*")), stub]:
        link = python_dir / source.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    return dest


def server_environment() -> dict[str, str]:
    env = dict(os.environ)
    libs = _package_dir("pytriton").parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(libs), sysconfig.get_config_var("LIBDIR") or "", env.get("LD_LIBRARY_PATH", "")) if p
    )
    # The stub embeds this interpreter; give it this environment's packages.
    paths = sysconfig.get_paths()
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (paths["purelib"], paths["platlib"], env.get("PYTHONPATH", "")) if p
    )
    return env


def stop_group(process: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> None:
    """SIGTERM a child started in its own session, then SIGKILL what lingers of its group
    (Triton's backend stubs, uvicorn's workers)."""
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


class TritonServer:
    """A tritonserver process on loopback ports, started and stopped by its owner."""

    def __init__(
        self,
        repository: Path,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_path: Path | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.repository = Path(repository).resolve()
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log_path = log_path
        self.extra_args = extra_args or []
        self.process: subprocess.Popen[bytes] | None = None
        self._workdir = tempfile.TemporaryDirectory(prefix="tritonserver-")
        self._log_file = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    def command(self) -> list[str]:
        backends = prepare_backends(Path(self._workdir.name) / "backends")
        return [
            str(pytriton_home() / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--metrics-config=summary_latencies=true",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--log-verbose=0",
            *self.extra_args,
        ]

    def start(self) -> TritonServer:
        if self.process is not None and self.process.poll() is None:
            return self
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(),
            env=server_environment(),
            stdout=self._log_file or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so that stop() can end the backend stubs with it
        )
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 300.0) -> TritonServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise TritonError(
                    f"tritonserver exited with code {code}; see {self.log_path or 'its output'}"
                )
            if self.is_ready():
                return self
            time.sleep(0.5)
        raise TritonError(
            f"tritonserver not ready after {timeout:.0f} s; see {self.log_path or 'its output'}"
        )

    def stop(self, timeout: float = 30.0) -> None:
        process, self.process = self.process, None
        stop_group(process, timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> TritonServer:
        return self.start().wait_ready()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m embedded.tritonserver", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--repository", type=Path, default=Path("build/model_repository_cpu"))
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log", type=Path, default=None)
    args = parser.parse_args(argv)
    server = TritonServer(args.repository, args.http_port, args.grpc_port, args.metrics_port, args.log)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start().wait_ready()
    print(f"tritonserver ready: http {server.http_url}, grpc {server.grpc_url}, metrics {server.metrics_url}")
    while not stop and server.process is not None and server.process.poll() is None:
        time.sleep(0.5)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
