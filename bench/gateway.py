"""Benchmark of the gateway against the CPU stack (a benchmark, not a test).

1. HTTP through the gateway (uvicorn, real Triton behind it) versus the same image sent
   straight to Triton with tritonclient after the same preprocessing, in one run, at a few
   concurrencies: requests per second, p50 and p99 latency. The difference is what the
   gateway costs (HTTP, decoding, preprocessing, JSON). Requests that admission control
   refuses (503 or 429 with Retry-After) are counted as sheds, apart from errors: past
   capacity refusing is what the gateway is designed to do.
2. Preprocessing (decode + crop + resize) images per second, one thread, on a large and a
   small real photo, with draft JPEG decoding on and off.

    python -m bench.gateway --repository model_repository
    python -m bench.gateway --triton 127.0.0.1:8001    # a Triton already running

Client, gateway and Triton share the machine's cores: on a 2-core box the figures are a
floor, not a capacity plan. Imports no torch.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import io
import json
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from PIL import Image

from embedded.gateway import Gateway
from embedded.tritonserver import TritonServer
from service.imaging import configure_pillow, prepare
from service.model_inputs import Preprocessing

ROOT = Path(__file__).resolve().parent.parent

#: The settings of a gateway under a load generator: its clients stand for many users from
#: one address, and error pacing (service/policy/ledger.py) would hold their refusals as one
#: client's looping on errors; the benches measure capacity and sheds, not that.
LOAD_GENERATOR_SETTINGS = {"GATEWAY_ERROR_RATE_PER_S": "0"}


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is needed for its sample photos (dev extra)")
    return Path(next(iter(spec.submodule_search_locations)))


def photos() -> dict[str, bytes]:
    """Real photos: small (Grace Hopper, 512x600 JPEG), large (retina, 1411x1411 JPEG) and a
    3000x2000 JPEG mosaic of real photos at native resolution (camera-sized)."""
    skimage = _package_dir("skimage") / "data"
    grace = _package_dir("matplotlib") / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    names = ["astronaut.png", "coffee.png", "chelsea.png", "motorcycle_left.png", "rocket.jpg", "retina.jpg"]
    mosaic = Image.new("RGB", (3000, 2000))
    for k, name in enumerate(names):
        tile = Image.open(skimage / name).convert("RGB").resize((1000, 1000), Image.Resampling.BICUBIC)
        mosaic.paste(tile, ((k % 3) * 1000, (k // 3) * 1000))
    buffer = io.BytesIO()
    mosaic.save(buffer, "JPEG", quality=92)
    return {
        "small: grace_hopper.jpg 512x600": grace.read_bytes(),
        "large: retina.jpg 1411x1411": (skimage / "retina.jpg").read_bytes(),
        "camera: mosaic 3000x2000": buffer.getvalue(),
    }


class Shed(Exception):
    """A request admission control refused: 503 or 429 with `Retry-After`."""


def is_shed(status: int, headers: Mapping[str, str]) -> bool:
    """The gateway's refusals under load (429, 503) carry `Retry-After`; anything else,
    including a 503 without it, is an error."""
    return status in (429, 503) and "retry-after" in {k.lower() for k in headers}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


async def closed_loop(call: Callable[[], Awaitable[None]], concurrency: int, total: int) -> dict[str, float]:
    """``concurrency`` clients each sending back to back until ``total`` requests are done.
    Requests that admission control refused (`Shed`) are counted apart from failures: past
    capacity they are the gateway working as designed, not errors."""
    latencies: list[float] = []
    errors = 0
    sheds = 0
    remaining = total

    async def client() -> None:
        nonlocal remaining, errors, sheds
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            try:
                await call()
            except Shed:
                sheds += 1
                continue
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": total,
        "answered": len(latencies),
        "shed": sheds,
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


async def serving(
    gateway_url: str, grpc_url: str, model: str, image: bytes, concurrencies: list[int], per_client: int
) -> list[dict[str, object]]:
    """Gateway over HTTP versus Triton direct, same image, same preprocessing, one run."""
    async with httpx.AsyncClient(
        base_url=gateway_url, timeout=300, limits=httpx.Limits(max_connections=256)
    ) as http:
        listing = (await http.get("/v1/models")).json()["models"]
        pre = Preprocessing(**next(m for m in listing if m["name"] == model)["preprocessing"])
        tensor = prepare(image, [pre], max_pixels=50_000_000).inputs[pre][None]
        triton = grpcaio.InferenceServerClient(grpc_url)

        async def via_gateway() -> None:
            answer = await http.post(
                "/v1/classify", content=image, params={"model": model}, headers={"Content-Type": "image/jpeg"}
            )
            if is_shed(answer.status_code, answer.headers):
                raise Shed(answer.status_code)
            answer.raise_for_status()

        async def direct() -> None:
            inputs = grpcclient.InferInput("image__0", list(tensor.shape), "UINT8")
            inputs.set_data_from_numpy(tensor)
            await triton.infer(model, [inputs], outputs=[grpcclient.InferRequestedOutput("probabilities__0")])

        for call in (via_gateway, direct):  # warm up both paths (batch sizes, connections)
            await closed_loop(call, 4, 8)
        rows: list[dict[str, object]] = []
        for concurrency in concurrencies:
            total = max(24, concurrency * per_client)
            for path, call in (("gateway (HTTP)", via_gateway), ("Triton direct (gRPC)", direct)):
                rows.append({"path": path, **await closed_loop(call, concurrency, total)})
        await triton.close()
        return rows


def preprocessing(images: dict[str, bytes], seconds: float = 3.0) -> list[dict[str, object]]:
    """Images per second of decode + crop + resize, one thread, draft on and off."""
    configure_pillow(50_000_000)
    pre = Preprocessing(0.875, "bicubic", 299)
    rows: list[dict[str, object]] = []
    for name, data in images.items():
        for draft in (True, False):
            prepared = prepare(data, [pre], max_pixels=50_000_000, draft=draft)
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                prepare(data, [pre], max_pixels=50_000_000, draft=draft)
                count += 1
            elapsed = time.perf_counter() - started
            rows.append(
                {
                    "image": name,
                    "draft": "on" if draft else "off",
                    "draft_scale": prepared.draft_scale,
                    "images_per_s": count / elapsed,
                    "ms_per_image": 1000 * elapsed / count,
                }
            )
    return rows


def markdown(
    serving_rows: list[dict[str, object]], pre_rows: list[dict[str, object]], info: dict[str, object]
) -> str:
    lines = [
        f"Measured {info['date']} on {info['machine']}; model `{info['model']}`, image {info['image']}; "
        f"gateway settings {info.get('settings')}.",
        "",
    ]
    lines += [
        "| path | concurrency | requests | answered | shed (503/429) | errors | answered/s "
        "| p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in serving_rows:
        lines.append(
            f"| {r['path']} | {r['concurrency']} | {r['requests']} | {r['answered']} | {r['shed']} "
            f"| {r['errors']} | {r['rps']:.1f} "
            f"| {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |"
        )
    lines += [
        "",
        "| image | draft | draft scale | images/s | ms/image |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in pre_rows:
        lines.append(
            f"| {r['image']} | {r['draft']} | 1/{r['draft_scale']} | {r['images_per_s']:.0f} "
            f"| {r['ms_per_image']:.1f} |"
        )
    return "\n".join(lines)


def setting(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` as a pair; anything else is refused, not dropped."""
    key, sep, value = text.partition("=")
    if not key or not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--triton", help="gRPC host:port of a running Triton (else one is started)")
    parser.add_argument("--model", default="inception_resnet_v1")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--per-client", type=int, default=6, help="requests per client at each concurrency")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        type=setting,
        metavar="KEY=VALUE",
        help="a gateway setting over the load generator's, e.g. GATEWAY_ADMISSION=false to compare "
        "the paths where admission control would shed a closed loop past the latency objective; may repeat",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    settings = {**LOAD_GENERATOR_SETTINGS, **dict(args.setting)}
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    images = photos()
    small = images["small: grace_hopper.jpg 512x600"]

    triton = None
    gateway: Gateway | None = None
    try:
        if args.triton:
            grpc_url = args.triton
        else:
            triton = TritonServer(
                args.repository, log_path=ROOT / "build" / "logs" / "bench-tritonserver.log"
            )
            triton.start().wait_ready(timeout=600)
            grpc_url = triton.grpc_url
        gateway = Gateway(grpc_url, workers=args.workers, env=settings).start().wait("/readyz")
        serving_rows = asyncio.run(
            serving(gateway.url, grpc_url, args.model, small, concurrencies, args.per_client)
        )
    finally:
        if gateway is not None:
            gateway.stop()
        if triton is not None:
            triton.stop()
    pre_rows = preprocessing(images)
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "model": args.model,
        "image": "grace_hopper.jpg (512x600 JPEG)",
        "settings": settings,
    }
    print(markdown(serving_rows, pre_rows, info))
    if args.json:
        args.json.write_text(
            json.dumps({"info": info, "serving": serving_rows, "preprocessing": pre_rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
