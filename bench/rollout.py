"""New weights rolled out under steady load, measured on the embedded stack.

What compose does to roll out a checkpoint (README.md, Runbook: "Rolling out new weights"),
on this machine: tritonserver (the nvidia-pytriton wheel's, with the PyTorch backend built
here) polls a copy of the repository (``--model-control-mode=poll``, compose's poll
interval), a gateway (``embedded.gateway``) serves it, clients classify one photo with one
network back to back, and the `models` job's own entry point
(``deploy/models-entrypoint.sh``) re-exports that network from a new checkpoint in the
checkpoint folder. Measured, from the moment the export starts:

- when Triton's answers change to the new weights for good (each answer is compared with
  the answers of the old and of the new weights, which differ);
- when the gateway's provenance of the model (``weights_sha256`` in ``GET /v1/models``, which
  is what it labels answers with) becomes the new checkpoint's SHA-256;
- every answer that was not 200, by status.

The checkpoints are made here (random networks with batch-norm statistics drawn at random,
so that the two give clearly different answers); nothing is downloaded.

    python -m bench.rollout            # figures in bench/README.md, "Rolling out weights"
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from embedded.gateway import Gateway
from embedded.tritonserver import TritonServer

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ROOT / "deploy" / "models-entrypoint.sh"
#: docker-compose.yml's --repository-poll-secs (tests/deploy hold the two equal).
COMPOSE_POLL_SECS = 10


def make_checkpoint(name: str, seed: int, path: Path) -> str:
    """A state dict of `name` with weights and batch-norm statistics drawn from `seed` (so
    its answers are far from uniform and differ from another seed's); its SHA-256."""
    import torch

    from inception import create_model

    torch.manual_seed(seed)
    model = create_model(name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(c, generator=gen) * 0.5 + 0.5)
                module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(c, generator=gen) * 0.1)
    staging = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": model.state_dict()}, staging)
    staging.replace(path)  # as an operator's `mv` into the folder: never half a file
    return hashlib.sha256(path.read_bytes()).hexdigest()


def seed_repository(source: Path, target: Path) -> None:
    """The repository's configs copied, its exports hard-linked (the exporter replaces files,
    never rewrites them, so the source export is left as it is)."""
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        for path in sorted(folder.rglob("*")):
            if path.is_dir() or path.name.endswith(".tmp"):
                continue
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            if path.name in ("model.pt", ".export.json"):
                os.link(path, destination)
            else:
                shutil.copy2(path, destination)


def run_models_job(repository: Path, checkpoints: Path, log_path: Path) -> float:
    """The compose `models` job's entry point, as `docker compose run --rm models` runs it
    (hub off: nothing to download here; random weights allowed for the networks the seed
    repository holds at random, as MODELS_ALLOW_RANDOM would name them); its seconds."""
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
        "MODELS_REPOSITORY": str(repository),
        "MODELS_CHECKPOINT_DIR": str(checkpoints),
        "MODELS_HUB": "0",
        "MODELS_ALLOW_RANDOM": "all",
    }
    start = time.monotonic()
    with open(log_path, "ab") as log:
        subprocess.run(["sh", str(ENTRYPOINT)], env=env, stdout=log, stderr=log, check=True, cwd=ROOT)
    return time.monotonic() - start


@dataclass
class Answer:
    sent: float
    received: float
    status: int
    top: tuple[tuple[int, float], ...] = ()
    weights: str = ""


@dataclass
class Load:
    """Clients classifying one image with one model, each after the last answer and a
    pause; every answer kept. A provenance poller reads GET /v1/models beside them."""

    url: str
    model: str
    image: bytes
    clients: int
    pause_s: float
    answers: list[Answer] = field(default_factory=list)
    provenance: list[tuple[float, str]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def client(self) -> None:
        with httpx.Client(timeout=60) as http:
            while not self.stopping.is_set():
                sent = time.monotonic()
                try:
                    response = http.post(
                        f"{self.url}/v1/classify",
                        params={"model": self.model},
                        content=self.image,
                        headers={"Content-Type": "image/jpeg"},
                    )
                except httpx.HTTPError:
                    self.answers.append(Answer(sent, time.monotonic(), 0))
                    continue
                answer = Answer(sent, time.monotonic(), response.status_code)
                if response.status_code == 200:
                    body = response.json()
                    answer.top = tuple((p["class_id"], p["score"]) for p in body["predictions"])
                    answer.weights = body["weights"]
                self.answers.append(answer)
                self.stopping.wait(self.pause_s)

    def poller(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self.stopping.is_set():
                try:
                    models = http.get(f"{self.url}/v1/models").json()["models"]
                    entry = next(m for m in models if m["name"] == self.model)
                    self.provenance.append((time.monotonic(), entry.get("weights_sha256") or ""))
                except (httpx.HTTPError, StopIteration, KeyError, ValueError):
                    pass
                self.stopping.wait(0.5)

    def start(self) -> Load:
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(self.clients)]
        self.threads.append(threading.Thread(target=self.poller, daemon=True))
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=90)


def same(a: tuple[tuple[int, float], ...], b: tuple[tuple[int, float], ...], tol: float = 1e-4) -> bool:
    """The same top-k (batching moves scores by about 1e-5)."""
    if len(a) != len(b):
        return False
    return all(ca == cb and abs(sa - sb) <= tol for (ca, sa), (cb, sb) in zip(a, b, strict=True))


def switch_time(events: list[tuple[float, bool]]) -> float | None:
    """The time from which every event is new (None if the last one is not)."""
    if not events or not events[-1][1]:
        return None
    for t, new in reversed(events):
        if not new:
            return next(t2 for t2, _ in events if t2 > t)
    return events[0][0]


def photo() -> bytes:
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    repository, checkpoints = work / "repository", work / "checkpoints"
    checkpoints.mkdir()
    seed_repository(args.repository, repository)
    model, log = args.model, work / "models-job.log"
    old_sha = make_checkpoint(model, 1, checkpoints / f"{model}.pth")
    run_models_job(repository, checkpoints, log)  # the weights in service before the rollout
    poll = ["--model-control-mode=poll", f"--repository-poll-secs={args.poll_secs}"]
    triton = TritonServer(repository, log_path=work / "tritonserver.log", extra_args=poll)
    gateway = Gateway(
        triton.grpc_url, work / "gateway.log", workers=args.workers, env={"GATEWAY_API_KEYS": ""}
    )
    try:
        triton.start().wait_ready(timeout=600)
        gateway.start().wait("/readyz", timeout=180)
        load = Load(f"http://127.0.0.1:{gateway.port}", model, photo(), args.clients, args.pause_s).start()
        time.sleep(args.before_s)
        before = [a for a in load.answers if a.status == 200]
        if not before or not all(same(a.top, before[0].top) for a in before):
            raise RuntimeError("the answers before the rollout are not all the same")
        old_top = before[0].top
        export_start = time.monotonic()
        new_sha = make_checkpoint(model, 2, checkpoints / f"{model}.pth")
        export_s = run_models_job(repository, checkpoints, log)
        export_end = time.monotonic()
        deadline = export_end + args.timeout_s
        new_top: tuple[tuple[int, float], ...] | None = None
        while time.monotonic() < deadline:
            time.sleep(1)
            recent = [a for a in load.answers if a.status == 200 and a.sent > time.monotonic() - 3]
            served_new = recent and not any(same(a.top, old_top) for a in recent)
            labelled_new = load.provenance and load.provenance[-1][1] == new_sha
            if served_new and (labelled_new or time.monotonic() > export_end + args.label_wait_s):
                new_top = recent[-1].top
                break
        time.sleep(args.after_s)
        load.stop()
    finally:
        gateway.stop()
        triton.stop()
    answers = sorted(load.answers, key=lambda a: a.sent)
    during = [a for a in answers if a.sent >= export_start]
    if new_top is None:
        raise RuntimeError(f"Triton never answered with the new weights within {args.timeout_s} s")
    kinds = Counter(
        "old" if same(a.top, old_top) else "new" if same(a.top, new_top) else "other"
        for a in during
        if a.status == 200
    )
    served = switch_time([(a.received, same(a.top, new_top)) for a in during if a.status == 200])
    labelled = switch_time([(t, sha == new_sha) for t, sha in load.provenance if t >= export_start])
    latencies = [a.received - a.sent for a in during if a.status == 200]
    return {
        "model": model,
        "poll_secs": args.poll_secs,
        "clients": args.clients,
        "workers": args.workers,
        "old_sha256": old_sha,
        "new_sha256": new_sha,
        "export_s": round(export_s, 1),
        "new_weights_served_after_export_start_s": round(served - export_start, 1) if served else None,
        "new_weights_served_after_export_end_s": round(served - export_end, 1) if served else None,
        "provenance_after_export_start_s": round(labelled - export_start, 1) if labelled else None,
        "provenance_after_export_end_s": round(labelled - export_end, 1) if labelled else None,
        "provenance_watched_s": round(time.monotonic() - export_start, 1),
        "answers": len(answers),
        "answers_during_rollout": len(during),
        "answers_by_weights": dict(kinds),
        "not_200": dict(Counter(str(a.status) for a in answers if a.status != 200)),
        "latency_during_rollout_s": {
            "p50": round(statistics.median(latencies), 3),
            "max": round(max(latencies), 3),
        }
        if latencies
        else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rollout", description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--model", default="inception_resnet_v1")
    parser.add_argument("--poll-secs", type=int, default=COMPOSE_POLL_SECS)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="gateway workers")
    parser.add_argument("--pause-s", type=float, default=0.2, help="each client's pause between requests")
    parser.add_argument("--before-s", type=float, default=10.0, help="load before the rollout")
    parser.add_argument("--after-s", type=float, default=10.0, help="load after the switch")
    parser.add_argument("--timeout-s", type=float, default=180.0, help="wait for new answers this long")
    parser.add_argument(
        "--label-wait-s",
        type=float,
        default=60.0,
        help="once new weights answer, wait this long at most for the gateway's provenance",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="rollout-"))
    try:
        result = measure(args, work)
    finally:
        if args.keep:
            print(f"work folder: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
