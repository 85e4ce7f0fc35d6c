"""Helpers of the gateway tests: real photos, image encoding, gateway processes."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import os
import re
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from embedded.gateway import Gateway, serving
from inception.contract import CPU_VARIANT
from inception.rollout import served_model_file

from ..helpers import ROOT

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


class GatewayProcess(Gateway):
    """The one launcher (`embedded.gateway`), with an HTTP client for the tests, and error
    pacing off unless a test's settings turn it on (tests/conftest.py says why)."""

    def __init__(self, grpc_url: str, log_path: Path | None = None, **kwargs: Any) -> None:
        kwargs["env"] = {"GATEWAY_ERROR_RATE_PER_S": "0", **(kwargs.get("env") or {})}
        super().__init__(grpc_url, log_path, **kwargs)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)


def running_gateway(
    grpc_url: str, log_path: Path, **kwargs: Any
) -> contextlib.AbstractContextManager[GatewayProcess]:
    return serving(GatewayProcess(grpc_url, log_path, **kwargs))


def classify(
    client: httpx.Client, data: bytes, content_type: str = "image/jpeg", **params: Any
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


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height zeros: a few hundred KB that inflate to
    width*height pixels (the decompression bomb of the tests, made here)."""
    row = b"\x00" + b"\x00" * math.ceil(width / 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def big_real_jpegs() -> dict[str, bytes]:
    """Real photos larger than the models need: retina (1411², a real JPEG), hubble (1000x872)
    and mosaics of real photos at native resolution, re-encoded as camera-like JPEGs."""
    photos = {
        "retina": photo("retina.jpg").read_bytes(),
        "hubble": photo("hubble_deep_field.jpg").read_bytes(),
    }
    names = ["astronaut.png", "coffee.png", "chelsea.png", "motorcycle_left.png", "rocket.jpg", "retina.jpg"]
    tiles = [
        Image.open(photo(n)).convert("RGB").resize((1000, 1000), Image.Resampling.BICUBIC) for n in names
    ]
    mosaic = Image.new("RGB", (3000, 2000))
    for k, tile in enumerate(tiles):
        mosaic.paste(tile, ((k % 3) * 1000, (k // 3) * 1000))
    photos["mosaic_3000x2000"] = encode(mosaic, "JPEG", quality=92)
    photos["grace_hopper"] = photo("grace_hopper.jpg").read_bytes()
    return photos


#: The stated tolerance of draft decoding (oversample 2, the default): the 299x299 uint8 input
#: differs from the full-size path by at most 1.0 grey level on average and 6 at the 99th
#: percentile. Measured: mean 0.33-0.63, p99 2-5 on these photos.
DRAFT_MEAN_TOLERANCE = 1.0
DRAFT_P99_TOLERANCE = 6


def symmetric_photo() -> Image.Image:
    """A real photo made left-right symmetric: its left half beside its mirror."""
    half = Image.open(photo("astronaut.png")).convert("RGB").crop((0, 56, 300, 456))
    image = Image.new("RGB", (600, 400))
    image.paste(half, (0, 0))
    image.paste(half.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (300, 0))
    return image


def palette_bomb(width: int, height: int) -> bytes:
    """A valid 8-bit palette PNG with transparency (tRNS) of width x height zeros: tens of
    KB that decode to width*height palette pixels and convert through RGBA (the review's
    bomb: 8 of them at 7071² OOM-killed both workers of a 1 GiB pod)."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    palette = bytes(range(256)) * 3
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"PLTE", palette)
        + chunk(b"tRNS", b"\x80" * 256)
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


class MemoryCgroup:
    """A child of this process's memory cgroup (v1 or v2) with a memory limit, for a real
    gateway run as it runs in a pod: `wrap` prefixes a command so that it starts inside.
    `available()` says why not where it cannot be made (not root, no writable cgroup)."""

    def __init__(self, name: str, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.path, self.version = self._parent()
        self.path = self.path / name
        self.path.mkdir(exist_ok=True)
        if self.version == 2:
            (self.path / "memory.max").write_text(str(limit_bytes))
            if (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")  # as a pod: no swap to hide in
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))

    @staticmethod
    def _parent() -> tuple[Path, int]:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
                return Path("/sys/fs/cgroup") / path.lstrip("/"), 2
            if "memory" in controllers.split(","):
                return Path("/sys/fs/cgroup/memory") / path.lstrip("/"), 1
        raise OSError("no memory cgroup")

    @classmethod
    def available(cls) -> str | None:
        try:
            probe = cls(f"probe-{os.getpid()}", 1 << 30)
        except OSError as exc:
            return f"cannot make a memory-limited cgroup here: {exc}"
        probe.remove()
        return None

    def wrap(self, command: list[str]) -> list[str]:
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path), *command]

    def oom_kills(self) -> int:
        """Processes the kernel killed in this group for memory."""
        events = self.path / ("memory.events" if self.version == 2 else "memory.oom_control")
        for line in events.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def peak_bytes(self) -> int:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        path = self.path / name
        return int(path.read_text()) if path.exists() else 0

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()


_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def scan_bomb(size: int, repeats: int) -> bytes:
    """A valid progressive JPEG of a flat image with its smallest scan repeated ``repeats``
    times before the end: a few bytes a scan, a pass over the whole image each."""
    data = encode(Image.new("RGB", (size, size), (120, 130, 140)), "JPEG", progressive=True)
    at, scans = 2, []
    while data[at + 1] != 0xD9:
        end = at + 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        if data[at + 1] == 0xDA:
            found = _SCAN_END.search(data, end)
            assert found is not None
            end = found.start()
            scans.append(data[at:end])
        at = end
    return data[:at] + min(scans, key=len) * repeats + data[at:]


def copied_repository(tmp_path: Path) -> Path:
    """The exported model beside a copy of its CPU variant that the test may rewrite."""
    source = ROOT / "model_repository" / MODEL
    folder = tmp_path / "repository" / MODEL
    (folder / "configs").mkdir(parents=True)
    (folder / "1").mkdir()
    (folder / "1" / "model.pt").symlink_to(served_model_file(source.parent, MODEL).resolve())
    (folder / "labels.txt").symlink_to((source / "labels.txt").resolve())
    variant = source / "configs" / f"{CPU_VARIANT}.pbtxt"
    (folder / "configs" / f"{CPU_VARIANT}.pbtxt").write_text(variant.read_text())
    return folder.parent


def start_serve(repository: Path, tmp_path: Path, port: int, **env: str) -> subprocess.Popen[str]:
    """`python -m embedded.serve` on one model, its output readable line by line."""
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        "PORT": str(port),
        "GATEWAY_MODELS": MODEL,
        "GATEWAY_DEFAULT_MODEL": MODEL,
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "embedded.serve", "--repository", str(repository),
         "--log-dir", str(tmp_path / "logs")],
        cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def read_until_serving(process: subprocess.Popen[str], timeout: float = 300) -> str:
    """Its output up to the line that says it serves (or to its end)."""
    assert process.stdout is not None
    output: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        output.append(line)
        if line.startswith("Ctrl-C stops"):
            break
    return "".join(output)
