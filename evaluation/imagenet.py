"""`python -m evaluation`: top-1 and top-5 error on a labelled folder, through a
running gateway, beside the paper's figures.

    python -m evaluation --folder /data/imagenet/val --url http://127.0.0.1:8080 \\
        --models inception_v4,inception_resnet_v2,ensemble --crops 1,144 --json results.json

Labels come from the folder's layout, ImageNet's validation layout: one folder per class,
named by its WordNet synset (`n01440764`) or by its class index in timm's order (`0` to
`999`); or from `--labels FILE`, a CSV of `path,label` lines (the path relative to
`--folder`, the label a synset or an index; a header line is skipped). Every image is
sent as it is stored to `POST /v1/classify` with `top_k=5` and the `crops` option, so
what is measured is what the service answers: its decoding, its preprocessing
(docs/architecture.md), its Triton. `ensemble` is the Triton ensemble.

The paper's protocols differ from ours in two places, and the table says so: its Table 3
figures are 12-crop (we offer Krizhevsky's 10), and its 144-crop figures (Table 4) are
GoogLeNet's protocol, which `crops=144` follows. The paper's figures are for the released
checkpoints on the 50,000 ILSVRC-2012 validation images; a random initialisation scores
about 99.9 % / 99.5 % error, and a small folder gives a wide interval.

`--local` needs no server: it runs the gateway's own preprocessing (``service.imaging``)
and the networks in eager PyTorch in this process. Without it the module imports no
torch: it runs wherever the gateway's client does.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import httpx

from inception.contract import NETWORKS
from inception.labels import SYNSETS_PATH

MEDIA_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}
IMAGE_SUFFIXES = frozenset(MEDIA_TYPES)
_SYNSET = re.compile(r"n\d{8}")

#: The paper's ILSVRC-2012 validation errors (top-1, top-5, %) by model and crop count:
#: Table 2 single crop, Table 3 12 crops, Table 4 144 crops, Table 5 the ensemble of
#: Inception-v4 and three Inception-ResNet-v2 at 144 crops.
PAPER: dict[str, dict[int, tuple[str, float, float]]] = {
    "inception_v4": {1: ("Table 2", 20.0, 5.0), 12: ("Table 3", 18.7, 4.2), 144: ("Table 4", 17.7, 3.8)},
    "inception_resnet_v1": {
        1: ("Table 2", 21.3, 5.5),
        12: ("Table 3", 19.8, 4.6),
        144: ("Table 4", 18.8, 4.3),
    },
    "inception_resnet_v2": {
        1: ("Table 2", 19.9, 4.9),
        12: ("Table 3", 18.7, 4.1),
        144: ("Table 4", 17.8, 3.7),
    },
    "ensemble": {144: ("Table 5, v4 + 3 x IRv2", 16.5, 3.1)},
}
#: Our crop protocol -> the paper's nearest one.
PAPER_CROPS = {1: 1, 10: 12, 144: 144}


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class Score:
    """Top-1 and top-5 hits of one model at one crop count."""

    model: str
    crops: int
    images: int = 0
    top1: int = 0
    top5: int = 0
    failures: int = 0
    seconds: float = 0.0

    @property
    def top1_error(self) -> float:
        return 100.0 * (1 - self.top1 / self.images) if self.images else float("nan")

    @property
    def top5_error(self) -> float:
        return 100.0 * (1 - self.top5 / self.images) if self.images else float("nan")

    def paper(self) -> tuple[str, float, float] | None:
        return PAPER.get(self.model, {}).get(PAPER_CROPS.get(self.crops, self.crops))

    def record(self, label: int, ranked: Sequence[int]) -> None:
        self.images += 1
        self.top1 += bool(ranked) and ranked[0] == label
        self.top5 += label in ranked[:5]


@dataclass
class Report:
    scores: list[Score] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        rows = []
        for s in self.scores:
            paper = s.paper()
            rows.append(
                {
                    **asdict(s),
                    "top1_error": round(s.top1_error, 3),
                    "top5_error": round(s.top5_error, 3),
                    "images_per_s": round(s.images / s.seconds, 3) if s.seconds else None,
                    "paper": None
                    if paper is None
                    else {
                        "source": paper[0],
                        "crops": PAPER_CROPS[s.crops],
                        "top1_error": paper[1],
                        "top5_error": paper[2],
                    },
                }
            )
        return {"results": rows}

    def markdown(self) -> str:
        lines = [
            "| model | crops | images | top-1 error (%) | top-5 error (%) "
            "| paper top-1 / top-5 (%) | images/s |",
            "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
        ]
        for s in self.scores:
            paper = s.paper()
            cited = (
                "—"
                if paper is None
                else f"{paper[1]:.1f} / {paper[2]:.1f} ({paper[0]}, {PAPER_CROPS[s.crops]} crops)"
            )
            rate = f"{s.images / s.seconds:.2f}" if s.seconds else "—"
            errors = f"{s.top1_error:.2f} | {s.top5_error:.2f}"
            lines.append(f"| {s.model} | {s.crops} | {s.images} | {errors} | {cited} | {rate} |")
        return "\n".join(lines) + "\n"


def synsets() -> list[str]:
    """ImageNet-1k synsets in the checkpoints' class order (line i is class i)."""
    return SYNSETS_PATH.read_text().split()


def parse_label(text: str, index_of: dict[str, int]) -> int:
    """A synset (`n01440764`) or a class index (`0` to `999`) as a class index."""
    text = text.strip()
    if _SYNSET.fullmatch(text):
        if text not in index_of:
            raise ValueError(f"{text} is not an ImageNet-1k synset")
        return index_of[text]
    if text.isdigit() and 0 <= int(text) < len(index_of):
        return int(text)
    raise ValueError(
        f"label {text!r} is neither a synset like n01440764 nor a class index 0-{len(index_of) - 1}"
    )


def discover(folder: Path, labels: Path | None = None) -> list[Sample]:
    """The labelled images of ``folder``: from ``labels`` (CSV `path,label`) if given, else
    one subfolder per class. Sorted by path, so runs are comparable."""
    index_of = {s: i for i, s in enumerate(synsets())}
    samples: list[Sample] = []
    if labels is not None:
        with labels.open(newline="") as handle:
            for row in csv.reader(handle):
                if not row or row[0].startswith("#"):
                    continue
                if len(row) < 2:
                    raise ValueError(f"{labels}: expected path,label lines, got {row}")
                try:
                    label = parse_label(row[1], index_of)
                except ValueError:
                    if not samples:  # a header line
                        continue
                    raise
                samples.append(Sample(folder / row[0].strip(), label))
    else:
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            label = parse_label(sub.name, index_of)
            samples += [
                Sample(path, label)
                for path in sorted(sub.rglob("*"))
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
            ]
    if not samples:
        raise ValueError(f"no labelled images in {folder}")
    return sorted(samples, key=lambda s: str(s.path))


class Progress:
    """One line on stderr: done/total and images per second."""

    def __init__(self, total: int, what: str, stream: TextIO = sys.stderr) -> None:
        self.total, self.what, self.stream = total, what, stream
        self.done, self.started = 0, time.monotonic()
        self.lock = threading.Lock()

    def step(self) -> None:
        with self.lock:
            self.done += 1
            elapsed = max(time.monotonic() - self.started, 1e-9)
            width = 30
            filled = width * self.done // self.total
            self.stream.write(
                f"\r{self.what} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{self.done / elapsed:.2f} images/s"
            )
            if self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()


#: A shed request is retried after the gateway's Retry-After, at most this long a wait.
MAX_RETRY_WAIT_S = 10.0


def gateway_classifier(
    url: str, api_key: str | None, timeout: float, retries: int = 30
) -> Callable[[Path, str, int], list[int]]:
    """A function (image, model, crops) -> ranked class ids from `POST /v1/classify`. An
    evaluation is a batch job: when the gateway sheds a request (admission control, a
    full queue) it waits as Retry-After says and tries again, up to ``retries`` times."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    local = threading.local()

    def classify(path: Path, model: str, crops: int) -> list[int]:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(base_url=url, timeout=timeout, headers=headers)
        media = MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
        data = path.read_bytes()
        for _ in range(retries + 1):
            answer = client.post(
                "/v1/classify",
                content=data,
                headers={"Content-Type": media},
                params={"model": model, "top_k": 5, "crops": crops},
            )
            # Shed (429, or 503 at capacity) with Retry-After: the service asks us to come back.
            if answer.status_code not in (429, 503) or "retry-after" not in answer.headers:
                break
            time.sleep(min(float(answer.headers["retry-after"]), MAX_RETRY_WAIT_S))
        if answer.status_code != 200:
            raise RuntimeError(f"{path}: {answer.status_code} {answer.text[:200]}")
        return [p["class_id"] for p in answer.json()["predictions"]]

    return classify


def ranked_top5(probabilities: Sequence[float]) -> list[int]:
    """The five best classes by score, ties by class id, as the gateway ranks them."""
    return sorted(range(len(probabilities)), key=lambda i: (-probabilities[i], i))[:5]


def local_classifier(
    checkpoints: dict[str, str], *, draft: bool = True, max_pixels: int = 50_000_000
) -> Callable[[Path, str, int], list[int]]:
    """A function (image, model, crops) -> ranked class ids computed in this process: the
    gateway's own preprocessing and crops (``service.imaging``, torch-free) and the
    networks in eager PyTorch with ``ServingModel``'s input conversion and softmax, built
    once each, with a checkpoint from ``checkpoints`` or their deterministic random
    initialisation. `ensemble` is the equal-weight mean of the three networks. Needs torch;
    no server."""
    import torch

    from inception import create_model, get_spec
    from inception.serving import ServingModel
    from service.imaging import configure_pillow, prepare
    from service.model_inputs import Preprocessing

    configure_pillow(max_pixels)
    built: dict[str, tuple[torch.nn.Module, Preprocessing]] = {}
    lock = threading.Lock()

    def network(name: str) -> tuple[torch.nn.Module, Preprocessing]:
        with lock:
            if name not in built:
                spec = get_spec(name)
                module = ServingModel(create_model(name, checkpoints.get(name))).eval()
                built[name] = (module, Preprocessing(spec.crop_pct, spec.interpolation, spec.input_size))
            return built[name]

    def classify(path: Path, model: str, crops: int) -> list[int]:
        members = [network(m) for m in (NETWORKS if model == "ensemble" else (model,))]
        prepared = prepare(
            path.read_bytes(), [pre for _, pre in members], max_pixels=max_pixels, draft=draft, crops=crops
        )
        total = torch.zeros(1000, dtype=torch.float64)
        with torch.inference_mode():
            for module, pre in members:
                batch = torch.from_numpy(prepared.batches[pre])
                total += module(batch).double().mean(dim=0) / len(members)
        return ranked_top5(total.tolist())

    return classify


def evaluate(
    samples: Sequence[Sample],
    models: Iterable[str],
    crops: Iterable[int],
    classify: Callable[[Path, str, int], list[int]],
    *,
    concurrency: int = 2,
    progress: bool = True,
) -> Report:
    """Every sample through every (model, crops); a failed image counts as a miss and is
    reported, so that an error rate is never computed on a silently smaller set."""
    report = Report()
    for model in models:
        for count in crops:
            score = Score(model, count)
            bar = Progress(len(samples), f"{model} crops={count}") if progress else None

            def one(
                sample: Sample, score: Score = score, count: int = count, bar: Progress | None = bar
            ) -> None:
                try:
                    ranked = classify(sample.path, score.model, count)
                except Exception as exc:
                    print(f"\n[evaluate] {exc}", file=sys.stderr)
                    ranked = []
                    score.failures += 1
                score.record(sample.label, ranked)
                if bar is not None:
                    bar.step()

            started = time.monotonic()
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                list(pool.map(one, samples))
            score.seconds = time.monotonic() - started
            report.scores.append(score)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True, help="one folder per class (synset or index)")
    parser.add_argument("--labels", type=Path, help="a CSV of path,label lines instead of class folders")
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway (default: make serve's)")
    parser.add_argument(
        "--local",
        action="store_true",
        help="no server: the gateway's preprocessing and the networks in this process (needs torch)",
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="with --local: a checkpoint for NAME (default: its deterministic random initialisation)",
    )
    parser.add_argument("--api-key", default=None, help="when the gateway asks for one")
    parser.add_argument(
        "--models",
        default=",".join((*NETWORKS, "ensemble")),
        help="comma-separated; `ensemble` is the Triton ensemble (default: every network and it)",
    )
    parser.add_argument("--crops", default="1", help="comma-separated crop counts: 1, 10, 144")
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument(
        "--retries",
        type=int,
        default=30,
        help="retries of a request the gateway sheds (429/503 with Retry-After)",
    )
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        samples = discover(args.folder, args.labels)
        crops = [int(c) for c in args.crops.split(",") if c.strip()]
    except ValueError as exc:
        print(f"[evaluate] error: {exc}", file=sys.stderr)
        return 2
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    print(f"[evaluate] {len(samples)} images, models {', '.join(models)}, crops {crops}", file=sys.stderr)
    if args.local:
        checkpoints = dict(item.split("=", 1) for item in args.checkpoint if "=" in item)
        classify = local_classifier(checkpoints)
    else:
        classify = gateway_classifier(args.url, args.api_key, args.timeout, args.retries)
    report = evaluate(samples, models, crops, classify, concurrency=args.concurrency, progress=not args.quiet)
    table = report.markdown()
    print(table, end="")
    if args.json:
        args.json.write_text(json.dumps(report.as_json(), indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    return 1 if any(s.failures for s in report.scores) else 0
