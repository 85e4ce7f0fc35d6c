"""Hostile clients (`make bench-hostile`): the nine attacks of issue 19 replayed against a real
gateway and Triton, each beside a well-behaved victim, before and after the protections (a
benchmark, not a test; the tests of each protection run in `make test`).

Every run is a two-worker gateway in a 1 GiB memory cgroup, the Kubernetes pod's size
(where one can be made: root and a writable cgroup, v1 or v2; else unlimited, and said so).
The victim sends one photo to `inception_resnet_v1` every `--interval` seconds (about a
tenth of that model's capacity on two cores) from 127.0.0.1; attackers connect from
127.0.0.2 (all of 127/8 is loopback), so that the gateway can tell them apart as it tells
clients apart by address. Reported per run: the victim's share of 200s, its p50 and p99
latency against its unloaded p99, the cgroup's peak memory and its OOM kills.

"Before" runs the same attack with the protection turned off by its setting where one
exists (`--http httptools` for the headers, a memory budget of 64 GiB, no scan limit, no
per-client slot cap, no error pacing for the greedy client); where none exists (fair
shares, the ensemble's charge, JSON's bounds, timeouts as misses) the review's figures are
quoted in bench/README.md instead. The attackers' answers are counted too: a client that
resends at once whatever it gets is slowed to its error budget (service/policy/ledger.py).

    python -m bench.hostile --repository model_repository
    python -m bench.hostile --triton 127.0.0.1:8001 --seconds 15 --only headers,memory

Client, gateway and Triton share the machine's two cores: latencies are ratios within one
run, and attacks that take CPU (144 crops, the ensemble) cost the victim CPU that no
admission policy on this machine can give back.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.gateway import percentile
from embedded.gateway import BOUNDED_HTTP, Gateway
from embedded.tritonserver import TritonServer
from tests.gateway.helpers import MemoryCgroup, palette_bomb, photo, scan_bomb

ROOT = Path(__file__).resolve().parent.parent
VICTIM_MODEL = "inception_resnet_v1"
ATTACKER = "127.0.0.2"
MIB = 1024 * 1024
POD_BYTES = 1 << 30


@dataclass
class Victim:
    """One well-behaved client: a request every `interval` seconds, one at a time."""

    url: str
    interval: float
    image: bytes
    headers: dict[str, str] = field(default_factory=dict)
    answers: list[tuple[int, float]] = field(default_factory=list)

    def run(self, stop: threading.Event) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    status = client.post(
                        "/v1/classify",
                        content=self.image,
                        params={"model": VICTIM_MODEL},
                        headers={"Content-Type": "image/png", **self.headers},
                    ).status_code
                except httpx.HTTPError:
                    status = 0
                took = time.perf_counter() - started
                self.answers.append((status, took))
                stop.wait(max(0.0, self.interval - took))

    def summary(self) -> dict[str, object]:
        ok = [t for s, t in self.answers if s == 200]
        return {
            "sent": len(self.answers),
            "ok_share": len(ok) / max(1, len(self.answers)),
            "p50_s": percentile(ok, 50) if ok else float("nan"),
            "p99_s": percentile(ok, 99) if ok else float("nan"),
            "statuses": dict(
                sorted({s: sum(1 for a, _ in self.answers if a == s) for s, _ in self.answers}.items())
            ),
        }


def attacker_client(url: str, timeout: float = 120) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=timeout, transport=httpx.HTTPTransport(local_address=ATTACKER))


def connect(port: int) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(5)  # an attacker never waits long on one connection
    sock.bind((ATTACKER, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def repeat(stop: threading.Event, action: Callable[[], object], tally: Counter[str] | None = None) -> None:
    """``action`` again and again until stopped, at once whatever it got (an attacker does
    not wait for Retry-After); the statuses of its answers counted in ``tally``."""
    while not stop.is_set():
        try:
            answer = action()
        except Exception:
            answer = None
        if tally is not None:
            tally[str(getattr(answer, "status_code", "no answer"))] += 1


# The attacks: each takes the gateway and a stop event and runs until it is set.


def headers_attack(gateway: Gateway, stop: threading.Event, tally: Counter[str]) -> list[threading.Thread]:
    """Finding 1: 64 MiB headers sent again and again, and 1,000 connections each holding
    1 MiB of an unfinished header."""
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 * MIB)

    def huge() -> None:
        with connect(gateway.port) as sock:
            with contextlib.suppress(OSError):
                for start in range(0, len(big), MIB):
                    sock.sendall(big[start : start + MIB])
            with contextlib.suppress(OSError):
                sock.recv(1024)

    def many() -> None:
        held = []
        piece = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * MIB
        for _ in range(1000):
            if stop.is_set():
                break
            with contextlib.suppress(OSError):
                sock = connect(gateway.port)
                sock.settimeout(2)
                sock.sendall(piece)
                held.append(sock)
        stop.wait()
        for sock in held:
            sock.close()

    return [threading.Thread(target=repeat, args=(stop, huge)), threading.Thread(target=many)]


def streaming(
    gateway: Gateway,
    stop: threading.Event,
    tally: Counter[str],
    threads: int,
    body: bytes,
    media: str,
    **params: str | int,
) -> list[threading.Thread]:
    def loop() -> None:
        with attacker_client(gateway.url) as client:
            repeat(
                stop,
                lambda: client.post(
                    "/v1/classify", content=body, params=params, headers={"Content-Type": media}
                ),
                tally,
            )

    return [threading.Thread(target=loop) for _ in range(threads)]


def memory_attack(gateway: Gateway, stop: threading.Event, tally: Counter[str]) -> list[threading.Thread]:
    """Finding 2: 8 concurrent 47 KiB palette PNGs of 7071² with transparency."""
    return streaming(gateway, stop, tally, 8, palette_bomb(7071, 7071), "image/png")


def json_attack(gateway: Gateway, stop: threading.Event, tally: Counter[str]) -> list[threading.Thread]:
    """Finding 3: 21 MiB JSON bodies holding a 10.5 M-item `weights` array, 4 at once."""
    body = b'{"image": "' + base64.b64encode(photo("chelsea.png").read_bytes()[:1000]) + b'", "weights": ['
    body += b"1," * 10_500_000 + b"1]}"
    return streaming(gateway, stop, tally, 4, body, "application/json")


def scans_attack(gateway: Gateway, stop: threading.Event, tally: Counter[str]) -> list[threading.Thread]:
    """Finding 4: progressive JPEGs of 6,000 repeated scans, two at a time."""
    return streaming(gateway, stop, tally, 2, scan_bomb(7000, 6000), "image/jpeg")


def crops_attack(gateway: Gateway, stop: threading.Event, tally: Counter[str]) -> list[threading.Thread]:
    """Finding 5: two clients streaming crops=144 to the victim's model."""
    return streaming(
        gateway, stop, tally, 2, photo("chelsea.png").read_bytes(), "image/png", model=VICTIM_MODEL, crops=144
    )


def greedy_attack(gateway: Gateway, stop: threading.Event, tally: Counter[str]) -> list[threading.Thread]:
    """Finding 6: one client holding 16 requests in flight on the victim's model."""
    return streaming(
        gateway, stop, tally, 16, photo("chelsea.png").read_bytes(), "image/png", model=VICTIM_MODEL
    )


def ensemble_attack(gateway: Gateway, stop: threading.Event, tally: Counter[str]) -> list[threading.Thread]:
    """Finding 7: the Triton ensemble (whose members include the victim's model), 4 at once."""
    return streaming(
        gateway, stop, tally, 4, photo("chelsea.png").read_bytes(), "image/png", model="ensemble"
    )


def stalled_attack(gateway: Gateway, stop: threading.Event, tally: Counter[str]) -> list[threading.Thread]:
    """Finding 8: stalled uploads reopened as they close, 800 at a time (two workers have 512
    slots)."""
    head = (
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 200000\r\n\r\n"
    )

    def keeper() -> None:
        open_socks: list[socket.socket] = []
        while not stop.is_set():
            alive = []
            for sock in open_socks:
                try:
                    sock.setblocking(False)
                    gone = sock.recv(1, socket.MSG_PEEK) is not None
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                (sock.close() if gone else alive.append(sock))
            open_socks = alive
            while len(open_socks) < 800 and not stop.is_set():
                with contextlib.suppress(OSError):
                    sock = connect(gateway.port)
                    sock.sendall(head + b"\xff\xd8\xff" * 10)
                    open_socks.append(sock)
            stop.wait(0.2)
        for sock in open_socks:
            sock.close()

    return [threading.Thread(target=keeper)]


def timeouts_attack(gateway: Gateway, stop: threading.Event, tally: Counter[str]) -> list[threading.Thread]:
    """Finding 9: requests whose every answer is a timeout (10 crops with a 0.4 s deadline),
    and slow uploads (1 MiB at about 200 KiB/s), 4 of each."""
    image = photo("chelsea.png").read_bytes()

    def late() -> None:
        with attacker_client(gateway.url) as client:
            repeat(
                stop,
                lambda: client.post(
                    "/v1/classify",
                    content=image,
                    params={"model": VICTIM_MODEL, "crops": 10},
                    headers={"Content-Type": "image/png", "X-Request-Timeout": "0.4"},
                ),
                tally,
            )

    def slow_upload() -> None:
        data = photo("chelsea.png").read_bytes() * 4

        def chunks() -> Iterator[bytes]:
            for start in range(0, len(data), 20_000):
                time.sleep(0.1)
                yield data[start : start + 20_000]

        with attacker_client(gateway.url) as client:
            repeat(
                stop,
                lambda: client.post(
                    "/v1/classify",
                    content=chunks(),
                    params={"model": VICTIM_MODEL},
                    headers={"Content-Type": "image/png"},
                ),
                tally,
            )

    return [threading.Thread(target=late) for _ in range(4)] + [
        threading.Thread(target=slow_upload) for _ in range(4)
    ]


@dataclass(frozen=True)
class Scenario:
    finding: int
    name: str
    attack: Callable[[Gateway, threading.Event, Counter[str]], list[threading.Thread]]
    #: Settings (or "httptools") that turn the protection off, None where none can.
    before: dict[str, str] | None
    victim_headers: dict[str, str] = field(default_factory=dict)


SCENARIOS = [
    Scenario(1, "headers", headers_attack, {"http": "httptools"}),
    Scenario(2, "memory", memory_attack, {"GATEWAY_MEMORY_BUDGET_BYTES": str(64 << 30)}),
    Scenario(3, "json", json_attack, None),
    Scenario(
        4,
        "scans",
        scans_attack,
        {"GATEWAY_MAX_JPEG_SCANS": "1000000", "GATEWAY_DECODE_QUEUE": "1000"},
        {"X-Request-Timeout": "5"},
    ),
    Scenario(5, "crops", crops_attack, None),
    Scenario(6, "greedy", greedy_attack, {"GATEWAY_ERROR_RATE_PER_S": "0"}),
    Scenario(7, "ensemble", ensemble_attack, None),
    Scenario(8, "stalled", stalled_attack, {"GATEWAY_MAX_CONCURRENCY_PER_CLIENT": "0"}),
    Scenario(9, "timeouts", timeouts_attack, None),
]


def admission_limit(url: str) -> float | None:
    """The victim model's admission limit summed over the workers, from /metrics."""
    with contextlib.suppress(httpx.HTTPError):
        for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(f'inception_gateway_admission_limit_images{{model="{VICTIM_MODEL}"}}'):
                return float(line.rsplit(" ", 1)[1])
    return None


@contextlib.contextmanager
def pod(grpc_url: str, settings: dict[str, str], log: Path) -> Iterator[tuple[Gateway, MemoryCgroup | None]]:
    """A two-worker gateway, in a 1 GiB cgroup where one can be made."""
    env = dict(settings)
    http = env.pop("http", None)
    cgroup = (
        None
        if MemoryCgroup.available()
        else MemoryCgroup(f"hostile-{os.getpid()}-{time.monotonic_ns()}", POD_BYTES)
    )
    gateway = Gateway(
        grpc_url, log, workers=2, env=env, multiproc_dir=Path(tempfile.mkdtemp(prefix="hostile-metrics-"))
    )
    if http is not None:
        at = gateway.command.index(BOUNDED_HTTP[0])
        gateway.command[at : at + 2] = ["--http", http]
    if cgroup is not None:
        gateway.command = cgroup.wrap(gateway.command)
    try:
        gateway.start().wait("/readyz", timeout=120)
        yield gateway, cgroup
    finally:
        gateway.stop()
        if cgroup is not None:
            for _ in range(50):
                if not (cgroup.path / "cgroup.procs").read_text().strip():
                    break
                time.sleep(0.1)
            cgroup.remove()


def run(grpc_url: str, scenario: Scenario | None, variant: str, seconds: float, interval: float) -> dict:
    settings = {} if scenario is None or variant == "after" else dict(scenario.before or {})
    image = photo("chelsea.png").read_bytes()
    with (
        tempfile.TemporaryDirectory() as tmp,
        pod(grpc_url, settings, Path(tmp) / "gateway.log") as (gateway, cgroup),
    ):
        with httpx.Client(base_url=gateway.url, timeout=60) as warm:
            for _ in range(4):
                warm.post(
                    "/v1/classify",
                    content=image,
                    params={"model": VICTIM_MODEL},
                    headers={"Content-Type": "image/png"},
                )
        stop = threading.Event()
        victim = Victim(gateway.url, interval, image, scenario.victim_headers if scenario else {})
        threads = [threading.Thread(target=victim.run, args=(stop,))]
        tally: Counter[str] = Counter()
        if scenario is not None:
            threads += scenario.attack(gateway, stop, tally)
        for thread in threads:
            thread.daemon = True
            thread.start()
        time.sleep(seconds)
        attacked = dict(tally)  # what the attackers got while the victim was measured
        limit = admission_limit(gateway.url)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        alive = gateway.process is not None and gateway.process.poll() is None
        result = {
            "finding": scenario.finding if scenario else 0,
            "scenario": scenario.name if scenario else "unloaded",
            "variant": variant,
            **victim.summary(),
            "admission_limit": limit,
            # Answers the attackers got, by status, and per second (HTTP attacks; the raw
            # socket ones, headers and stalled uploads, count none).
            "attacker_answers": attacked,
            "attacker_answers_per_s": round(sum(attacked.values()) / seconds, 1),
            "peak_mib": round(cgroup.peak_bytes() / MIB) if cgroup else None,
            "oom_kills": cgroup.oom_kills() if cgroup else None,
            "gateway_alive": alive,
        }
    print(json.dumps(result), flush=True)
    return result


def healthz_loop(url: str, stop: threading.Event, counts: list[int]) -> None:
    """Asks /healthz until stopped; appends how many answers it got."""
    done = 0
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            client.get("/healthz")
            done += 1
    counts.append(done)


def http_throughput(grpc_url: str, seconds: float) -> dict[str, float]:
    """/healthz answers per second from 8 closed-loop clients, h11 (bounded) against httptools."""
    rates = {}
    for name, settings in (("bounded h11", {}), ("httptools", {"http": "httptools"})):
        with (
            tempfile.TemporaryDirectory() as tmp,
            pod(grpc_url, settings, Path(tmp) / "g.log") as (gateway, _),
        ):
            counts: list[int] = []
            stop = threading.Event()
            threads = [
                threading.Thread(target=healthz_loop, args=(gateway.url, stop, counts)) for _ in range(8)
            ]
            for thread in threads:
                thread.start()
            time.sleep(seconds)
            stop.set()
            for thread in threads:
                thread.join()
            rates[name] = sum(counts) / seconds
    rates["ratio"] = rates["bounded h11"] / rates["httptools"]
    print(json.dumps({"http_throughput": rates}), flush=True)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--triton", help="gRPC host:port of a running Triton (else one is started)")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each attack")
    parser.add_argument("--interval", type=float, default=0.8, help="the victim's seconds between requests")
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench-hostile.json")
    args = parser.parse_args(argv)
    if MemoryCgroup.available() is not None:
        print(f"warning: {MemoryCgroup.available()}; running without a memory limit", flush=True)
    with contextlib.ExitStack() as stack:
        grpc_url = args.triton
        if grpc_url is None:
            server = TritonServer(args.repository, log_path=Path(tempfile.mkdtemp()) / "tritonserver.log")
            stack.callback(server.stop)
            server.start().wait_ready(timeout=600)
            grpc_url = server.grpc_url
        wanted = {n for n in args.only.split(",") if n}
        results = [run(grpc_url, None, "unloaded", args.seconds, args.interval)]
        for scenario in SCENARIOS:
            if wanted and scenario.name not in wanted:
                continue
            if scenario.before is not None:
                results.append(run(grpc_url, scenario, "before", args.seconds, args.interval))
            results.append(run(grpc_url, scenario, "after", args.seconds, args.interval))
        throughput = http_throughput(grpc_url, 5.0) if not wanted or "throughput" in wanted else None
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "results": results,
        "http_throughput": throughput,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    unloaded = results[0]["p99_s"]
    print(
        "\n| # | attack | run | victim 200s | p50 s | p99 s (x unloaded) | attacker answers/s "
        "(statuses) | peak MiB | OOM kills |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        ratio = r["p99_s"] / unloaded if unloaded else float("nan")
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["attacker_answers"].items()))
        print(
            f"| {r['finding'] or '-'} | {r['scenario']} | {r['variant']} | {r['ok_share']:.0%} | "
            f"{r['p50_s']:.2f} | {r['p99_s']:.2f} ({ratio:.1f}x) | {r['attacker_answers_per_s']} "
            f"({statuses or '-'}) | {r['peak_mib']} | {r['oom_kills']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
