"""Helpers of the gateway tests: real photos, image encoding, gateway processes."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from PIL import Image

from embedded.processes import free_port, start_group, stop_group, wait_http
from embedded.serve import gateway_command

ROOT = Path(__file__).resolve().parents[2]
#: The cheapest model on 2 CPU cores, for tests that need one model, not a given one.
MODEL = "inception_resnet_v1"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"{name} is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


SKIMAGE_DATA = _package_dir("skimage") / "data"
GRACE_HOPPER = _package_dir("matplotlib") / "mpl-data" / "sample_data" / "grace_hopper.jpg"


def photo(name: str) -> Path:
    """A real photo shipped inside a wheel (see docs/architecture.md)."""
    return GRACE_HOPPER if name == "grace_hopper.jpg" else SKIMAGE_DATA / name


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


class GatewayProcess:
    """``uvicorn service.app:app`` in its own process group, on a free port."""

    def __init__(
        self,
        grpc_url: str,
        log_path: Path,
        *,
        workers: int = 1,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
        cwd: Path = ROOT,
        multiproc_dir: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.multiproc_dir = multiproc_dir
        self.environment = {
            **{
                k: v
                for k, v in os.environ.items()
                if not k.startswith("GATEWAY_") and k != "PROMETHEUS_MULTIPROC_DIR"
            },
            "GATEWAY_TRITON_GRPC_URL": grpc_url,
            **(env or {}),
        }
        if multiproc_dir is not None:
            multiproc_dir.mkdir(parents=True, exist_ok=True)
            self.environment["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc_dir)
        self.command = gateway_command(self.port, workers, graceful_s=5, python=python)
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        self.process = start_group(self.command, env=self.environment, cwd=self.cwd, log_path=self.log_path)
        return self

    def wait(self, path: str = "/healthz", timeout: float = 120.0) -> GatewayProcess:
        wait_http(self.url + path, timeout, self.process, describe=self.log)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        process, self.process = self.process, None
        stop_group(process)

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)  # type: ignore[arg-type]


@contextlib.contextmanager
def running_gateway(grpc_url: str, log_path: Path, **kwargs: object) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(grpc_url, log_path, **kwargs)  # type: ignore[arg-type]
    try:
        yield gateway.start().wait("/readyz")
    finally:
        gateway.stop()


def classify(
    client: httpx.Client, data: bytes, content_type: str = "image/jpeg", **params: object
) -> httpx.Response:
    """POST a raw image body."""
    return client.post("/v1/classify", content=data, headers={"Content-Type": content_type}, params=params)


def probabilities(answer: httpx.Response) -> dict[int, float]:
    """class id -> score of a 200 answer (ask for top_k=1000 to get the whole vector)."""
    assert answer.status_code == 200, answer.text
    return {p["class_id"]: p["score"] for p in answer.json()["predictions"]}


def vector(answer: httpx.Response) -> list[float]:
    scores = probabilities(answer)
    assert len(scores) == 1000
    return [scores[i] for i in range(1000)]


def raw_http(
    port: int, head: bytes, body_chunks: Iterator[bytes], *, max_seconds: float = 60.0
) -> tuple[bytes, int]:
    """Send a request over a bare socket, chunk by chunk, and stop sending as soon as the
    server answers. Returns the answer and how many body bytes were sent: the proof that an
    oversized body is refused while it streams, not after it was all read."""
    import select

    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=max_seconds) as sock:
        sock.sendall(head)
        deadline = time.monotonic() + max_seconds
        for chunk in body_chunks:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable or time.monotonic() > deadline:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        sock.settimeout(30)
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in answer or not _complete(answer):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
    return answer, sent


def _complete(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


#: A Triton address where nothing listens (port 1), for the app without a Triton.
UNREACHABLE = "127.0.0.1:1"


def model_config_json(**parameters: str) -> dict:
    """A model config in Triton's JSON form (as `get_model_config(as_json=True)` answers),
    with the contract's tensors and the given `parameters` over sane defaults."""
    params = {"crop_pct": "0.875", "interpolation": "bicubic", "input_size": "299", "weights": "random-init"}
    params.update(parameters)
    return {
        "config": {
            "name": "inception_v4",
            "max_batch_size": 64,
            "input": [{"name": "image__0", "data_type": "TYPE_UINT8", "dims": ["299", "299", "3"]}],
            "output": [{"name": "probabilities__0", "data_type": "TYPE_FP32", "dims": ["1000"]}],
            "parameters": {k: {"string_value": v} for k, v in params.items()},
        }
    }
