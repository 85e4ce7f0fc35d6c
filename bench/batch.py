"""Batches of images and the answer cache (issue 21), measured on the embedded CPU stack
(a benchmark, not a test).

1. **Batches against single requests.** The same distinct images through the gateway,
   as requests of 1, 8 and 32 images against one image per request, at the same number of
   concurrent clients: images per second, and p50/p99 of a request's latency (a batch
   request answers all its images at once). Admission control is off in both (a 32-image
   batch takes seconds on two cores, past the 0.5 s objective, so it would be refused:
   by design, and not what is measured here), and so is the cache (every image distinct
   anyway).
2. **Cache hit against miss**: distinct images one at a time (each a miss), then the same
   again (each a hit): p50/p99.
3. **Memory under churn**: a small cache (``GATEWAY_CACHE_BYTES``) and many distinct
   images in batches: the cache's bytes stay within the bound and the gateway's resident
   memory is read before and after.
4. **Triton's response cache behind it**: the gateway's cache off (as a repeat that
   reaches another worker or replica, or an evicted entry, or `no-store`), the same image
   again and again, Triton's response cache off against on.

    python -m bench.batch                 # starts its own tritonserver and gateways

It serves Inception-ResNet-v1 alone from a temporary repository that links the exported
model and whose config names the model file's sha256 (an export of random weights names
none, and such answers are never cached). Client, gateway and Triton share the machine's
cores: on two cores read the ratios. Imports no torch.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx
from PIL import Image

from bench.gateway import _package_dir, percentile
from embedded.gateway import Gateway
from embedded.tritonserver import TritonServer
from inception.contract import CPU_VARIANT
from inception.repository import parse, render
from inception.rollout import served_model_file

ROOT = Path(__file__).resolve().parent.parent
MODEL = "inception_resnet_v1"
LOGS = ROOT / "build" / "logs"


def distinct_images(count: int) -> list[bytes]:
    """``count`` different real photos (crops of the packaged ones at shifting offsets),
    400x300 JPEGs, so that no two are the same bytes or the same pixels."""
    folder = _package_dir("skimage") / "data"
    sources = [
        Image.open(folder / n).convert("RGB")
        for n in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png")
    ]
    images = []
    for i in range(count):
        source = sources[i % len(sources)]
        shift = 7 * (i // len(sources))
        box = (shift, shift, source.width - 60 + shift % 60, source.height - 40 + shift % 40)
        buffer = io.BytesIO()
        source.crop(box).resize((400, 300), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def repository(folder: Path, response_cache: bool) -> Path:
    """Inception-ResNet-v1 linked from the exported repository, its CPU config naming the
    model file's sha256 (so the gateway caches its answers) and, if asked, enabling
    Triton's response cache."""
    source = ROOT / "model_repository" / MODEL
    target = folder / MODEL
    (target / "configs").mkdir(parents=True)
    (target / "1").mkdir()
    model_file = served_model_file(source.parent, MODEL).resolve()
    (target / "1" / "model.pt").symlink_to(model_file)
    (target / "labels.txt").symlink_to((source / "labels.txt").resolve())
    config = parse((source / "configs" / f"{CPU_VARIANT}.pbtxt").read_text())
    config.parameters["weights_sha256"].string_value = hashlib.sha256(model_file.read_bytes()).hexdigest()
    if response_cache:
        config.response_cache.enable = True
    (target / "configs" / f"{CPU_VARIANT}.pbtxt").write_text(render(config))
    return folder


@contextmanager
def stack(response_cache: bool = False, env: Mapping[str, str] | None = None) -> Iterator[Gateway]:
    """A tritonserver on the one-model repository and a one-worker gateway in front."""
    LOGS.mkdir(parents=True, exist_ok=True)
    caches = _package_dir("pytriton") / "tritonserver" / "caches"  # the wheel's local cache
    extra = [f"--cache-directory={caches}", "--cache-config=local,size=67108864"] if response_cache else []
    with tempfile.TemporaryDirectory() as tmp:
        triton = TritonServer(
            repository(Path(tmp), response_cache), log_path=LOGS / "bench-batch-triton.log", extra_args=extra
        )
        triton.start().wait_ready(timeout=600)
        environment = {"GATEWAY_MODELS": MODEL, "GATEWAY_DEFAULT_MODEL": MODEL, **(env or {})}
        gateway = Gateway(triton.grpc_url, LOGS / "bench-batch-gateway.log", env=environment)
        try:
            gateway.start().wait("/readyz")
            yield gateway
        finally:
            gateway.stop()
            triton.stop()


async def timed(calls: list[Callable[[], Awaitable[int]]], concurrency: int) -> dict[str, float]:
    """The calls shared by ``concurrency`` clients, each back to back; each call answers the
    images it got answered. Images per second over the whole run; request latencies."""
    queue = list(reversed(calls))
    latencies: list[float] = []
    images = 0

    async def client() -> None:
        nonlocal images
        while queue:
            call = queue.pop()
            started = time.perf_counter()
            answered = await call()  # awaited apart: `images += await ...` would lose updates
            images += answered
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "images": images,
        "images_per_s": images / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


def _answered(answer: httpx.Response) -> int:
    answer.raise_for_status()
    body = answer.json()
    results = body.get("results")
    return 1 if results is None else sum(1 for r in results if r["predictions"] is not None)


async def batches_against_singles(
    url: str, images: list[bytes], sizes: list[int], concurrency: int
) -> list[dict[str, object]]:
    """For each batch size, the images in batches of that size, then the same images one
    per request, at the same concurrency, one after the other in the same run."""
    encoded = [base64.b64encode(i).decode() for i in images]
    rows: list[dict[str, object]] = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:

        def single(data: bytes) -> Callable[[], Awaitable[int]]:
            async def call() -> int:
                headers = {"Content-Type": "image/jpeg"}
                return _answered(await http.post("/v1/classify", content=data, headers=headers))

            return call

        def batch(part: list[str]) -> Callable[[], Awaitable[int]]:
            async def call() -> int:
                return _answered(await http.post("/v1/classify", json={"images": part}))

            return call

        await timed([single(i) for i in images[:4]], concurrency)  # warm-up
        await timed([batch(encoded[:8])], 1)
        for size in sizes:
            if size == 1:
                continue
            parts = [encoded[i : i + size] for i in range(0, len(encoded), size)]
            rows.append(
                {
                    "batch": size,
                    "form": "one request per batch",
                    **await timed(list(map(batch, parts)), concurrency),
                }
            )
            rows.append(
                {
                    "batch": size,
                    "form": "one request per image",
                    **await timed(list(map(single, images)), concurrency),
                }
            )
        if 1 in sizes:
            parts = [[e] for e in encoded]
            rows.append(
                {
                    "batch": 1,
                    "form": "JSON `images` of one",
                    **await timed(list(map(batch, parts)), concurrency),
                }
            )
            rows.append(
                {
                    "batch": 1,
                    "form": "one request per image",
                    **await timed(list(map(single, images)), concurrency),
                }
            )
    return rows


async def hits_against_misses(url: str, images: list[bytes]) -> dict[str, dict[str, float]]:
    """One client: each image once (a miss), then each again (a hit)."""
    figures: dict[str, dict[str, float]] = {}
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for kind in ("miss", "hit"):
            latencies = []
            for data in images:
                started = time.perf_counter()
                answer = await http.post("/v1/classify", content=data, headers={"Content-Type": "image/jpeg"})
                latencies.append(time.perf_counter() - started)
                answer.raise_for_status()
                if answer.headers["X-Cache"] != kind:
                    raise RuntimeError(f"expected a {kind}, the gateway said {answer.headers['X-Cache']}")
            figures[kind] = {
                "p50_ms": percentile(latencies, 50) * 1000,
                "p99_ms": percentile(latencies, 99) * 1000,
            }
    return figures


def _rss_bytes(pid: int) -> int:
    """Resident memory of the gateway's process tree (the uvicorn parent and its worker)."""
    total = 0
    for child in [pid, *_children(pid)]:
        try:
            text = Path(f"/proc/{child}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
        total += int(match.group(1)) * 1024 if match else 0
    return total


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found + [g for c in found for g in _children(c)]


def _gauge(metrics: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", metrics, re.M)
    return float(match.group(1)) if match else float("nan")


async def churn(gateway: Gateway, images: list[bytes], rounds: int, batch: int) -> dict[str, float]:
    """Distinct images through a small cache, in batches: every lookup a miss, the cache
    full and evicting; its bytes (the gauge) and the gateway's resident memory."""
    encoded = [base64.b64encode(i).decode() for i in images]
    samples: list[int] = []
    async with httpx.AsyncClient(base_url=gateway.url, timeout=600) as http:
        before = _rss_bytes(gateway.pid)
        for r in range(rounds):
            # A different top-level JPEG quality per round: new bytes, so every image is new.
            fresh = [
                base64.b64encode(_requality(images[i], 70 + r % 25)).decode() for i in range(len(encoded))
            ]
            for start in range(0, len(fresh), batch):
                answer = await http.post("/v1/classify", json={"images": fresh[start : start + batch]})
                answer.raise_for_status()
            samples.append(_rss_bytes(gateway.pid))
        metrics = (await http.get("/metrics")).text
    return {
        "images": rounds * len(images),
        "cache_bytes": _gauge(metrics, "inception_gateway_cache_bytes"),
        "rss_before_mib": before / 2**20,
        "rss_max_mib": max(samples) / 2**20,
        "rss_after_mib": samples[-1] / 2**20,
    }


def _requality(data: bytes, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


async def repeats(url: str, image: bytes, count: int) -> dict[str, float]:
    """The same image again and again, the gateway's cache bypassed (`no-store`)."""
    latencies = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for _ in range(count):
            started = time.perf_counter()
            answer = await http.post(
                "/v1/classify",
                content=image,
                headers={"Content-Type": "image/jpeg", "Cache-Control": "no-store"},
            )
            latencies.append(time.perf_counter() - started)
            answer.raise_for_status()
    return {"p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batch", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="distinct images per run")
    parser.add_argument("--sizes", default="1,8,32")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    images = distinct_images(args.images)
    results: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "model": MODEL,
    }
    plain = {"GATEWAY_ADMISSION": "false", "GATEWAY_CACHE": "false"}
    with stack(env=plain) as gateway:
        sizes = [int(s) for s in args.sizes.split(",")]
        results["batches"] = asyncio.run(
            batches_against_singles(gateway.url, images, sizes, args.concurrency)
        )
    with stack(env={"GATEWAY_ADMISSION": "false"}) as gateway:
        results["cache"] = asyncio.run(hits_against_misses(gateway.url, images[:24]))
    with stack(env={"GATEWAY_ADMISSION": "false", "GATEWAY_CACHE_BYTES": str(64 * 1024)}) as gateway:
        results["churn"] = asyncio.run(churn(gateway, images, rounds=4, batch=32))
    for enabled in (False, True):
        with stack(response_cache=enabled) as gateway:
            asyncio.run(repeats(gateway.url, images[0], 3))  # warm-up, and Triton's cache filled
            results[f"triton_cache_{'on' if enabled else 'off'}"] = asyncio.run(
                repeats(gateway.url, images[0], 20)
            )
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
