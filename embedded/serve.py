"""``make serve``: the embedded CPU stack in one command.

Starts the tritonserver of the ``nvidia-pytriton`` wheel, with the PyTorch backend built by
``make backend``, on ``model_repository/`` (its ``cpu`` config variant), waits until
it is ready, starts the gateway (uvicorn, ``WORKERS`` processes) on ``PORT`` (8080) pointed at
it, waits until the gateway is ready, and prints a curl example. If tritonserver dies it is
restarted, with backoff, while the gateway answers 503 with Retry-After. On Ctrl-C, SIGTERM
or SIGHUP it stops both; they run in their own process groups and are ended by group, so
no worker outlives this process. Imports no torch.

    python -m embedded.serve --repository model_repository
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from embedded.gateway import Gateway
from embedded.processes import free_port
from embedded.tritonserver import TritonError, TritonServer, opentelemetry_args

ROOT = Path(__file__).resolve().parent.parent


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stop(Exception):
    """Raised by the signal handler to unwind into the clean-up path."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def sample_photo() -> str | None:
    """A real photo to show off with: matplotlib ships Grace Hopper's portrait (dev extra)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    photo = package / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    return str(photo) if photo.is_file() else None


def curl_example(port: int) -> str:
    path = sample_photo() or "photo.jpg"
    return "\n".join(
        [
            f"gateway ready on http://127.0.0.1:{port}  (OpenAPI: http://127.0.0.1:{port}/docs)",
            "try:",
            f"  curl -s -F image=@{path} 'http://127.0.0.1:{port}/v1/classify?top_k=5'",
            f"  curl -s --data-binary @{path} -H 'Content-Type: image/jpeg' "
            f"'http://127.0.0.1:{port}/v1/classify?model=ensemble'",
            f"  curl -s http://127.0.0.1:{port}/v1/models",
            "Ctrl-C stops the gateway and Triton.",
        ]
    )


MIN_BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0


def restart_triton(triton: TritonServer, backoff: float, timeout: float) -> float:
    """Supervision: a tritonserver that died is started again after `backoff` seconds,
    doubled after each failed start. The gateway stays up meanwhile and answers 503 with
    Retry-After. Returns the backoff for the next failure."""
    code = None if triton.process is None else triton.process.returncode
    print(
        f"tritonserver exited (code {code}); restarting in {backoff:g} s (log: {triton.log_path})",
        file=sys.stderr,
        flush=True,
    )
    time.sleep(backoff)
    triton.stop()  # whatever is left of its process group
    try:
        triton.start().wait_ready(timeout=timeout)
    except TritonError as exc:
        print(f"tritonserver restart failed: {exc}", file=sys.stderr, flush=True)
        triton.stop()
        return min(2 * backoff, MAX_BACKOFF_S)
    print(f"tritonserver ready again: grpc {triton.grpc_url}", flush=True)
    return MIN_BACKOFF_S


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedded.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--config-name", default="cpu", help="the configs/<name>.pbtxt variant to serve")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", "1")))
    parser.add_argument("--log-dir", type=Path, default=ROOT / "build" / "logs")
    parser.add_argument("--triton-timeout", type=float, default=600.0, help="seconds to wait for Triton")
    args = parser.parse_args(argv)
    if not any(args.repository.glob("*/[1-9]*/model.pt")):
        print(f"no model repository at {args.repository}: run `make repository` first", file=sys.stderr)
        return 2

    # SIGHUP too: a closed terminal must not leave Triton and the gateway running.
    try:
        # OTEL_EXPORTER_OTLP_ENDPOINT and its kin reach the gateway through the environment,
        # and Triton as flags: one trace per request, in one backend.
        tracing = opentelemetry_args(os.environ)
    except ValueError as exc:
        # Traces are never worth a server that does not start: Triton runs untraced.
        print(f"warning: {exc}; Triton's spans are off", file=sys.stderr, flush=True)
        tracing = []
    if tracing:
        print(f"traces: OTLP to {tracing[1].split('url=', 1)[1]} (gateway and Triton)", flush=True)
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, _on_signal)
    triton = TritonServer(
        args.repository,
        free_port(),
        free_port(),
        free_port(),
        log_path=args.log_dir / "tritonserver.log",
        config_name=args.config_name,
        extra_args=tracing,
    )
    gateway: Gateway | None = None
    multiproc_dir = Path(tempfile.mkdtemp(prefix="gateway-metrics-")) if args.workers > 1 else None
    try:
        print(f"starting tritonserver on {args.repository} (log: {triton.log_path}) ...", flush=True)
        triton.start().wait_ready(timeout=args.triton_timeout)
        print(
            f"tritonserver ready: grpc {triton.grpc_url}, metrics http://{triton.metrics_url}/metrics",
            flush=True,
        )
        # Its own group: stopped with its workers, not by our Ctrl-C. The operator's
        # GATEWAY_* settings are this process's environment, passed on as they are.
        settings = {k: v for k, v in os.environ.items() if k.startswith("GATEWAY_")}
        gateway = Gateway(
            triton.grpc_url,
            args.log_dir / "gateway.log",
            workers=args.workers,
            env=settings,
            port=args.port,
            host=args.host,
            graceful_s=10,
            multiproc_dir=multiproc_dir,
        )
        gateway.start().wait("/readyz")
        print(curl_example(args.port), flush=True)
        backoff = MIN_BACKOFF_S
        while True:
            if gateway.process is None or gateway.process.poll() is not None:
                code = None if gateway.process is None else gateway.process.returncode
                print(f"the gateway exited with code {code}", file=sys.stderr)
                return 1
            if triton.process is None or triton.process.poll() is not None:
                backoff = restart_triton(triton, backoff, args.triton_timeout)
            time.sleep(0.5)
    except Stop as stop:
        print(f"\n{stop}: stopping the gateway and tritonserver ...", flush=True)
        return 0
    except RuntimeError as exc:  # TritonError, NotReady: a missing backend, a failed model, ...
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        # Ignore further signals while cleaning up, so a second Ctrl-C cannot leave orphans.
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, signal.SIG_IGN)
        if gateway is not None:
            gateway.stop()
        triton.stop()
        if multiproc_dir is not None:
            shutil.rmtree(multiproc_dir, ignore_errors=True)
        print("stopped.", flush=True)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
