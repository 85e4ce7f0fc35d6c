"""What JPEG draft decoding (libjpeg's DCT scaling) buys and costs, by input size
(`python -m bench.draft`; a benchmark, not a test).

libjpeg can decode at 1/2, 1/4 or 1/8 scale, skipping most of the inverse DCT and the
upsampling; Pillow's ``draft`` asks for the smallest such scale that keeps both sides at
least the size requested. The gateway asks for ``GATEWAY_DRAFT_OVERSAMPLE`` (default 2)
times the shorter side its resize needs (342 px for a 299 crop at crop_pct 0.875), so only
inputs at least twice that get a reduced decode; with 1, any input at least twice the
needed side does. The reduced image is then resized with the same bicubic filter, so the
model's input differs from timm's eval transform of the full decode: this measures by how
much (grey levels, 0-255, over the 299x299x3 input) beside the speed, for the photos of
`bench.frontend` at each size, one thread, the gateway's own `prepare`.

    python -m bench.draft
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from bench.frontend import encoded, scene
from service.imaging import configure_pillow, prepare
from service.model_inputs import Preprocessing

PRE = Preprocessing(0.875, "bicubic", 299)
SIZES = ((500, 375), (1024, 768), (2048, 1536), (4000, 3000))
MAX_PIXELS = 50_000_000
#: None: no draft (timm's transform of the full decode, the reference).
OVERSAMPLES: tuple[float | None, ...] = (None, 2.0, 1.5, 1.0)


def rate(data: bytes, oversample: float | None, seconds: float) -> tuple[float, int, np.ndarray]:
    """Images per CPU-second of this thread, the draft scale used, and the model input."""

    def once() -> tuple[int, np.ndarray]:
        prepared = prepare(
            data, [PRE], max_pixels=MAX_PIXELS, draft=oversample is not None, oversample=oversample or 1.0
        )
        return prepared.draft_scale, prepared.batches[PRE][0]

    scale, pixels = once()
    count, cpu, started = 0, time.thread_time(), time.perf_counter()
    while time.perf_counter() - started < seconds:
        once()
        count += 1
    return count / (time.thread_time() - cpu), scale, pixels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.draft", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per cell")
    args = parser.parse_args(argv)
    configure_pillow(MAX_PIXELS)
    print(
        "| input | draft oversample | scale | images per CPU-s | against full decode "
        "| mean abs diff | p99 abs diff | max abs diff |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for width, height in SIZES:
        data = encoded(scene(width, height), "JPEG")
        reference: np.ndarray | None = None
        full_rate = 0.0
        for oversample in OVERSAMPLES:
            speed, scale, pixels = rate(data, oversample, args.seconds)
            if reference is None:
                reference, full_rate = pixels.astype(np.int16), speed
            diff = np.abs(pixels.astype(np.int16) - reference)
            print(
                f"| JPEG {width}x{height} | {'off' if oversample is None else oversample} | 1/{scale} "
                f"| {speed:.0f} | {speed / full_rate:.2f} | {diff.mean():.2f} "
                f"| {np.percentile(diff, 99):.0f} | {diff.max()} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
