"""A frozen Triton and the gateway's channel: how long requests keep going to it.

Two real tritonservers (the nvidia-pytriton wheel's, with the keepalive flags of
docker-compose.yml and deploy/k8s/triton.yaml) behind one gRPC target that lists both
(``ipv4:127.0.0.1:P1,127.0.0.1:P2``, as a headless Service resolves to one address per pod),
and the gateway's own Triton client (``service.triton.TritonBackend``: its channel, its
round-robin, its deadlines) sending a steady stream of inference requests. One server is
frozen with SIGSTOP: its kernel still holds the TCP connection open, so nothing but an
HTTP/2 ping notices that the process no longer answers.

Measured twice, in one run: with the gateway's keepalive as it ships
(`GATEWAY_TRITON_KEEPALIVE_TIME_MS`, `..._TIMEOUT_MS`: a ping every 10 s, 5 s to answer),
and with its pings pushed out of reach (an interval of gRPC's largest value, as the
channel was before it had keepalive).
For each, after the freeze: the seconds until no new request goes to the frozen server
(a request that does not answer within HUNG_S went there), and how many failed.

    python -m bench.keepalive          # figures in bench/README.md, "Keepalive"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedded.tritonserver import TritonServer
from service.errors import ApiError
from service.settings import Settings
from service.triton import TritonBackend

ROOT = Path(__file__).resolve().parent.parent
#: The cheapest network: a steady stream costs the two servers little.
MODEL = "inception_resnet_v1"
#: The variants: settings of the gateway's channel. gRPC's largest interval never pings.
VARIANTS: dict[str, dict[str, int]] = {
    "no_keepalive": {"triton_keepalive_time_ms": 2**31 - 1},
    "keepalive_as_shipped": {},
}
#: Triton's side, as docker-compose.yml and deploy/k8s/triton.yaml start it.
TRITON_KEEPALIVE = [
    "--grpc-max-connection-age=60000",
    "--grpc-max-connection-age-grace=30000",
    "--grpc-keepalive-time=10000",
    "--grpc-keepalive-timeout=5000",
    "--grpc-keepalive-permit-without-calls=1",
    "--grpc-http2-max-pings-without-data=0",
    "--grpc-http2-min-recv-ping-interval-without-data=5000",
    "--grpc-http2-max-ping-strikes=2",
]
#: A request answered later than this, or failed, went to the frozen server (a live one
#: answers the cheapest network within about a second here at the bench's rate, even on
#: the loaded 2-core machine).
HUNG_S = 3.0


@dataclass
class Call:
    sent: float
    seconds: float
    ok: bool


async def stream(
    backend: TritonBackend, rate: float, duration: float, freeze_at: float, freeze: Any
) -> list[Call]:
    """Requests at `rate` per second for `duration` seconds, each its own task (so a hung
    one delays no other); `freeze()` at `freeze_at` seconds."""
    batch = np.random.default_rng(0).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
    calls: list[Call] = []

    async def one() -> None:
        sent = time.monotonic()
        try:
            await backend.infer(MODEL, batch)
            ok = True
        except ApiError:
            ok = False
        calls.append(Call(sent, time.monotonic() - sent, ok))

    start = time.monotonic()
    tasks = []
    frozen = False
    while (now := time.monotonic()) < start + duration:
        if not frozen and now >= start + freeze_at:
            freeze()
            frozen = True
        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(1 / rate)
    await asyncio.gather(*tasks)
    return calls


def run_variant(
    servers: list[TritonServer], overrides: dict[str, int], args: argparse.Namespace
) -> dict[str, Any]:
    target = "ipv4:" + ",".join(s.grpc_url for s in servers)
    fields: dict[str, Any] = {
        "triton_grpc_url": target,
        "models": [MODEL],
        "default_model": MODEL,
        "triton_timeout_s": args.deadline_s,
        **overrides,
    }
    settings = Settings.model_validate(fields)
    victim = servers[1].process
    assert victim is not None
    frozen_at: list[float] = []

    def freeze() -> None:
        frozen_at.append(time.monotonic())
        os.kill(victim.pid, signal.SIGSTOP)

    async def main() -> list[Call]:
        backend = TritonBackend(settings)
        try:
            await backend.start()
            return await stream(backend, args.rate, args.duration_s, args.freeze_after_s, freeze)
        finally:
            await backend.close()

    try:
        calls = asyncio.run(main())
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    t0 = frozen_at[0]
    after = [c for c in calls if c.sent >= t0]
    hung = [c for c in after if not c.ok or c.seconds > HUNG_S]
    last = max((c.sent for c in hung), default=None)
    return {
        "keepalive_time_ms": settings.triton_keepalive_time_ms,
        "keepalive_timeout_ms": settings.triton_keepalive_timeout_ms,
        "requests_after_freeze": len(after),
        "went_to_frozen_server": len(hung),
        "failed": sum(not c.ok for c in after),
        "last_request_to_frozen_server_after_freeze_s": round(last - t0, 1) if last is not None else None,
        "watched_after_freeze_s": round(args.duration_s - args.freeze_after_s, 1),
        "slowest_s": round(max(c.seconds for c in after), 1) if after else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.keepalive", description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument(
        "--rate",
        type=float,
        default=2.0,
        help="requests per second: well within what one server answers here, so that only the "
        "frozen server's requests are slow",
    )
    parser.add_argument("--duration-s", type=float, default=70.0)
    parser.add_argument("--freeze-after-s", type=float, default=10.0)
    parser.add_argument("--deadline-s", type=float, default=10.0, help="each request's deadline")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="keepalive-"))
    repository = work / "repository"
    repository.mkdir()
    (repository / MODEL).symlink_to((args.repository / MODEL).resolve(), target_is_directory=True)
    flags = ["--model-control-mode=explicit", f"--load-model={MODEL}", *TRITON_KEEPALIVE]
    results = {}
    for name, overrides in VARIANTS.items():
        # Fresh servers for each variant: the frozen one of the first is not reused.
        servers = [
            TritonServer(repository, log_path=work / f"{name}-triton-{i}.log", extra_args=flags)
            for i in range(2)
        ]
        try:
            for server in servers:
                server.start()
            for server in servers:
                server.wait_ready(timeout=300)
            results[name] = run_variant(servers, overrides, args)
        finally:
            for server in servers:
                server.stop()
    print(
        json.dumps(
            {"rate_per_s": args.rate, "deadline_s": args.deadline_s, "hung_s": HUNG_S, **results}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
