"""Every image within the limits stays within the per-request memory budget
(`service.pixels.memory_budget`, derived from GATEWAY_MAX_PIXELS), measured as the peak
RSS of a real gateway worker while it answers. The cases are the bombs that once took
gigabytes: a 16-bit grey PNG (converted in float64), an RGBA PNG (a second full-size RGBA
image), a palette PNG with transparency."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.pixels import memory_budget

from ...helpers import TritonEndpoint
from ..helpers import MODEL, GatewayProcess, classify, encode, running_gateway

pytestmark = pytest.mark.integration

SIDE = 4000
MAX_PIXELS = SIDE * SIDE
MIB = 1024 * 1024


def grey16() -> bytes:
    values = np.zeros((SIDE, SIDE), np.uint16)
    values[::7, ::5] = 60000
    return encode(Image.fromarray(values), "PNG")


def rgba() -> bytes:
    return encode(Image.new("RGBA", (SIDE, SIDE), (10, 200, 30, 128)), "PNG")


def palette_with_transparency() -> bytes:
    return encode(Image.new("P", (SIDE, SIDE), 3), "PNG", transparency=3)


BOMBS = {"grey16": grey16, "rgba": rgba, "palette-transparency": palette_with_transparency}


def kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest.fixture(scope="module", params=["draft", "full"])
def worker(
    request: pytest.FixtureRequest, gateway_triton: TritonEndpoint, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    env = {
        "GATEWAY_MODELS": MODEL,
        "GATEWAY_DEFAULT_MODEL": MODEL,
        "GATEWAY_MAX_PIXELS": str(MAX_PIXELS),
        "GATEWAY_DRAFT": str(request.param == "draft").lower(),
    }
    log = tmp_path_factory.mktemp("memory") / "gateway.log"
    with running_gateway(gateway_triton.grpc_url, log, env=env) as gateway:  # one worker: its own pid
        yield gateway


@pytest.mark.parametrize("bomb", list(BOMBS))
def test_peak_memory_of_one_request_is_within_the_budget(worker: GatewayProcess, bomb: str) -> None:
    data = BOMBS[bomb]()
    assert worker.process is not None
    pid = worker.process.pid
    with worker.client() as client:
        assert classify(client, encode(Image.new("RGB", (64, 64)), "PNG"), "image/png").status_code == 200
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets the peak (VmHWM) to now
        before = kib(pid, "VmRSS") * 1024
        answer = classify(client, data, "image/png")
        assert answer.status_code == 200, answer.text
    peak = kib(pid, "VmHWM") * 1024
    budget = memory_budget(MAX_PIXELS)
    assert peak - before <= budget, (
        f"{bomb}: +{(peak - before) / MIB:.0f} MiB > budget {budget / MIB:.0f} MiB"
    )
