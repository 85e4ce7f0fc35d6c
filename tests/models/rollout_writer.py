"""A writer of a test repository, in its own process when run as a module: the exporter's
own steps (`Rollout`, `write_version`, the real configs) around a tiny network in place of
an Inception network, so that two of them can race, or one be killed mid-export, in
seconds rather than the minutes a real trace takes.

    python -m tests.models.rollout_writer REPOSITORY SEED [--hold S] [--broken] [--triton-url URL]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

from inception.contract import NUM_CLASSES
from inception.export import example_images, network_entry, quiet_torchscript, write_version
from inception.registry import get_spec
from inception.repository import Export, model_files, network_config
from inception.rollout import Rollout, RolloutError

MODEL = "inception_resnet_v1"


class Tiny(torch.nn.Module):
    """Inception-ResNet-v1's interface (uint8 NHWC in, probabilities out) in a few hundred
    weights, drawn from `seed` so that each seed answers differently."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(3, NUM_CLASSES, generator=generator) * 20
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        colour = images.float().mean((1, 2)) / 255.0
        return torch.softmax(colour @ self.weight, dim=1)


class TwoInputs(Tiny):
    """A file that loads and answers as it should in torch, which Triton refuses to load
    for a config of one input: what a file Triton cannot load looks like to every check
    before Triton (a libtorch older than the exporter's torch would be another)."""

    def forward(self, images: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        colour = images.float().mean((1, 2)) / 255.0
        return torch.softmax(colour @ self.weight + bias, dim=1)


def inputs(broken: bool = False) -> tuple[torch.Tensor, ...]:
    images = example_images(1)
    return (images, torch.zeros(1, NUM_CLASSES)) if broken else (images,)


def traced(seed: int, broken: bool = False) -> torch.jit.ScriptModule:
    with quiet_torchscript():
        return torch.jit.trace((TwoInputs if broken else Tiny)(seed).eval(), inputs(broken))


def export_of(seed: int) -> Export:
    """The provenance a version of `seed` records: a made-up checkpoint, its made-up hash."""
    return Export(f"pretrained:tiny-{seed}.pth", hashlib.sha256(f"tiny-{seed}".encode()).hexdigest())


def stage(rollout: Rollout, seed: int, broken: bool = False) -> Path:
    """The next version of the model, written and checked as the exporter writes one."""
    export = export_of(seed)
    stamp = {
        "fingerprint": f"tiny-{seed}",
        "weights": export.provenance,
        "weights_sha256": export.weights_sha256,
        "precision": "fp32",
    }
    folder = rollout.new_version(MODEL)
    write_version(traced(seed, broken), folder, stamp, inputs(broken))
    return folder


def files_of(seed: int) -> dict[str, bytes]:
    """The model folder's configs and labels stating `seed`'s provenance, by the writer."""
    return model_files(partial(network_config, network_entry(get_spec(MODEL), export_of(seed))))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("repository", type=Path)
    parser.add_argument("seed", type=int)
    parser.add_argument("--hold", type=float, default=0.0, help="seconds to wait, staged, before publishing")
    parser.add_argument("--broken", action="store_true", help="two inputs: Triton refuses to load it")
    parser.add_argument(
        "--triton-url", default=None, help="wait for Triton, rolling back if it does not serve"
    )
    parser.add_argument("--triton-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"{time.monotonic():.3f} [writer {args.seed}] {message}", flush=True)

    with Rollout(args.repository, log) as rollout:
        log("holds the lock")
        folder = stage(rollout, args.seed, args.broken)
        log(f"staged {folder}")
        time.sleep(args.hold)
        rollout.publish(MODEL, files_of(args.seed))
        log("published")
        if args.triton_url:
            try:
                rollout.wait_or_roll_back(args.triton_url, args.triton_timeout)
            except RolloutError as exc:
                log(f"error: {exc}")
                return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
