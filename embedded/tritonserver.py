"""Starts the tritonserver that ships inside the `nvidia-pytriton` wheel, with Triton's
PyTorch backend built by `python -m embedded.backend`.

The wheel carries Triton 2.51 and its shared libraries (in `nvidia_pytriton.libs`) but no
PyTorch backend; the one built here sits in `build/backends/current/pytorch/`, which is
the backend directory we pass. The repository is the one in `model_repository/`, served
with `--model-config-name=cpu`: each model's `configs/cpu.pbtxt`, the production config
with CPU instances and a short warm-up.

Imports no torch: `make serve` and the tests use it from the same environment as the
gateway.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType

from .backend import CURRENT
from .processes import NotReady, answers_200, free_port, start_group, stop_group, wait_http


class TritonError(RuntimeError):
    pass


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise TritonError(f"{name} is not installed: install the 'embedded' extra (nvidia-pytriton)")
    return Path(next(iter(spec.submodule_search_locations)))


def pytriton_home() -> Path:
    return _package_dir("pytriton") / "tritonserver"


def default_backend_directory() -> Path:
    return CURRENT


def check_backend_directory(backends: Path) -> Path:
    """The launcher's own check, because tritonserver reports a missing backend only when
    a model needs it, as one line among many."""
    library = backends / "pytorch" / "libtriton_pytorch.so"
    if not library.is_file():
        raise TritonError(
            f"no PyTorch backend at {library}: build it with `make backend` "
            "(`make serve` and `make test` do), or pass the backend directory that holds pytorch/"
        )
    return backends


def server_environment(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(overrides or {})}
    libs = _package_dir("pytriton").parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


#: The trace protocol Triton 2.51 speaks: OTLP/HTTP (it posts JSON), never OTLP/gRPC.
TRITON_OTLP_PROTOCOL = "http/protobuf"


def opentelemetry_args(environ: Mapping[str, str]) -> list[str]:
    """Triton's ``--trace-config`` flags for the OTLP endpoint that OpenTelemetry's standard
    variables give the gateway, so that Triton's spans join the gateway's traces in the same
    backend (docs/architecture.md, "Observability"); none when the variables ask for no
    export (the same rules as service/tracing.py's ``enabled``).

    ``rate=0``: Triton traces only the requests that carry a propagated context (Triton's
    trace.md: such a request is traced whatever the rate), that is the ones the gateway
    traces, and none of the others. Triton's resource gets its own service name, so that an
    ``OTEL_SERVICE_NAME`` meant for the gateway does not name it. Raises ValueError for an
    OTLP/gRPC endpoint, which Triton cannot post to (the launchers then run it untraced)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    exporters = {e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if "none" in exporters:
        return []
    traces_url = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not traces_url and not base:
        return []
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip()
        or TRITON_OTLP_PROTOCOL
    )
    if protocol.lower() != TRITON_OTLP_PROTOCOL:
        raise ValueError(f"Triton 2.51 exports OTLP over HTTP only, not {protocol}")
    # The specification's rule: the signal-specific variable is the URL as is, the generic
    # one a base to which the signal's path is appended.
    url = traces_url or base.rstrip("/") + "/v1/traces"
    return [
        "--trace-config=mode=opentelemetry",
        f"--trace-config=opentelemetry,url={url}",
        "--trace-config=opentelemetry,resource=service.name=triton-inference-server",
        "--trace-config=level=TIMESTAMPS",
        "--trace-config=rate=0",
        "--trace-config=count=-1",
    ]


# Error lines every CPU-only start logs, which say nothing about the models.
_HARMLESS_ERRORS = ("CudaDriverHelper", "NVML", "DCGM", "CUDA driver version")


def load_failures(log_text: str) -> list[str]:
    """Triton's own error lines (those that start with `E<date>`), for the launcher's
    message: a model that failed to load says why there."""
    failures = []
    for line in log_text.splitlines():
        if line[:1] == "E" and line[1:2].isdigit() and not any(h in line for h in _HARMLESS_ERRORS):
            message = line.split("] ", 1)[-1].strip().strip('"')
            # libtorch appends a C++ stack trace (escaped newlines in the log): keep the reason.
            failures.append(message.split("\\n", 1)[0].strip()[:400])
    return failures


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
        config_name: str = "cpu",
        backend_directory: Path | None = None,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        self.repository = Path(repository).resolve()
        #: Variables set over this process's environment for the server (a bench's variants).
        self.environment = dict(environment or {})
        self.config_name = config_name
        self.backend_directory = Path(backend_directory or default_backend_directory())
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log_path = log_path
        self.extra_args = extra_args or []
        self.process: subprocess.Popen[bytes] | None = None

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
        backends = check_backend_directory(self.backend_directory)
        return [
            str(pytriton_home() / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--model-config-name={self.config_name}",
            f"--backend-directory={backends.resolve()}",
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
        self.process = start_group(
            self.command(), env=server_environment(self.environment), log_path=self.log_path
        )
        return self

    def failure_report(self) -> str:
        """Why the server did not come up, in Triton's words where its log has them."""
        if self.log_path is None or not self.log_path.is_file():
            return "see its output"
        failures = load_failures(self.log_path.read_text(errors="replace"))
        if not failures:
            return f"see {self.log_path}"
        return "; ".join(dict.fromkeys(failures)) + f" (log: {self.log_path})"

    def is_ready(self) -> bool:
        return answers_200(f"http://{self.http_url}/v2/health/ready")

    def wait_ready(
        self, timeout: float = 300.0, cancelled: Callable[[], bool] = lambda: False
    ) -> TritonServer:
        """Waits for readiness, or until `cancelled()`; raises TritonError with Triton's
        reason if the server exits or the timeout passes."""
        if self.process is None:
            raise TritonError("tritonserver was not started")
        try:
            wait_http(
                f"http://{self.http_url}/v2/health/ready",
                timeout,
                self.process,
                interval=0.5,
                cancelled=cancelled,
            )
        except NotReady as exc:
            if exc.exit_code is not None:
                raise TritonError(
                    f"tritonserver exited with code {exc.exit_code}: {self.failure_report()}"
                ) from None
            raise TritonError(
                f"tritonserver not ready after {timeout:.0f} s: {self.failure_report()}"
            ) from None
        return self

    def stop(self, timeout: float = 30.0) -> None:
        process, self.process = self.process, None
        stop_group(process, timeout)

    @contextlib.contextmanager
    def running(self, timeout: float = 300.0) -> Iterator[TritonServer]:
        """Started and ready within `timeout`, and stopped on exit whatever happened in
        between, a server that never became ready included."""
        try:
            yield self.start().wait_ready(timeout)
        finally:
            self.stop()

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()  # __exit__ does not run when __enter__ raises
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m embedded.tritonserver", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--config-name", default="cpu", help="the configs/<name>.pbtxt variant to serve")
    parser.add_argument("--backend-directory", type=Path, default=None)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness")
    args = parser.parse_args(argv)
    try:
        tracing = opentelemetry_args(os.environ)
    except ValueError as exc:
        # Traces are never worth a server that does not start: Triton runs untraced.
        print(f"warning: {exc}; Triton's spans are off", file=sys.stderr, flush=True)
        tracing = []
    server = TritonServer(
        args.repository,
        args.http_port,
        args.grpc_port,
        args.metrics_port,
        args.log,
        config_name=args.config_name,
        backend_directory=args.backend_directory,
        extra_args=tracing,
    )
    stopping = threading.Event()
    for stop_signal in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop_signal, lambda signum, frame: stopping.set())
    try:
        # A signal ends the wait at once.
        server.start().wait_ready(timeout=args.timeout, cancelled=stopping.is_set)
        if not stopping.is_set():
            urls = f"http {server.http_url}, grpc {server.grpc_url}, metrics {server.metrics_url}"
            print(f"tritonserver ready: {urls}", flush=True)
        while not stopping.is_set() and server.process is not None and server.process.poll() is None:
            stopping.wait(0.5)
    except TritonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()  # never leaves Triton behind, whatever ended the wait
    return 0


if __name__ == "__main__":
    sys.exit(main())
