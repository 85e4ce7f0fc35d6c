"""The one writer of the Triton model repository, in both flavours, from one description.

- production: `platform: "pytorch_libtorch"`, GPU instances, as the NGC Triton image runs
  it; its `config.pbtxt` files are committed under `model_repository/`.
- cpu: the same `model.pt` run by a generic Python-backend model (`runner.py`), CPU
  instances, because the tritonserver in the `nvidia-pytriton` wheel has no libtorch
  backend.

Names, shapes, types, batching and parameters are identical in the two; only the
platform, the instance kind and the warm-up differ. Production warms up every batch size
it may form (1 … max_batch_size): on a GPU each new shape costs TorchScript profiling and
cuDNN algorithm selection, which must not land on a user's request. On the CPU a new shape
costs little beyond first-touch allocation while a batch of 64 takes seconds on two cores,
so the CPU flavour warms up the sizes it forms in practice (1 and 8).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .labels import LABELS_PATH
from .serving import INPUT_NAME, OUTPUT_NAME, member_input_name

FLAVOURS = ("production", "cpu")
ENSEMBLE_NAME = "inception_ensemble"
ENSEMBLE_MEAN_NAME = "inception_ensemble_mean"
MAX_BATCH_SIZE = 64
PREFERRED_BATCH_SIZES = (8, 16, 32, 64)
MAX_QUEUE_DELAY_US = 2000
# Past this many queued requests Triton rejects new ones, which the gateway answers with
# 503 and Retry-After instead of letting latency grow without bound.
MAX_QUEUE_SIZE = 256
CPU_WARMUP_BATCH_SIZES = (1, 8)
IMAGE_DIMS = (299, 299, 3)
NUM_CLASSES = 1000
LABELS_FILE = "labels.txt"
RUNNER_PATH = Path(__file__).with_name("runner.py")


@dataclass(frozen=True)
class NetworkEntry:
    """One network as the repository describes it."""

    name: str
    crop_pct: float
    interpolation: str
    input_size: int
    weights: str  # "pretrained:<source>" or "random-init"
    weights_sha256: str = ""


@dataclass(frozen=True)
class EnsembleEntry:
    members: tuple[NetworkEntry, ...]
    member_weights: tuple[float, ...]
    name: str = ENSEMBLE_NAME
    mean_name: str = ENSEMBLE_MEAN_NAME

    @property
    def weights(self) -> str:
        if any(m.weights == "random-init" for m in self.members):
            return "random-init"
        return "pretrained:" + ",".join(
            f"{m.name}={m.weights.removeprefix('pretrained:')}" for m in self.members
        )


def _dims(dims: Iterable[int]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _parameters(params: dict[str, str]) -> list[str]:
    return [f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in params.items()]


def _tensor(name: str, dtype: str, dims: Sequence[int], labels: bool = False) -> str:
    label = f' label_filename: "{LABELS_FILE}"' if labels else ""
    return f'  {{ name: "{name}" data_type: {dtype} dims: {_dims(dims)}{label} }}'


def _header(name: str, flavour: str) -> list[str]:
    platform = 'platform: "pytorch_libtorch"' if flavour == "production" else 'backend: "python"'
    return [f'name: "{name}"', platform, f"max_batch_size: {MAX_BATCH_SIZE}"]


def _instances(flavour: str) -> str:
    kind = "KIND_GPU" if flavour == "production" else "KIND_CPU"
    return f"instance_group [ {{ count: 1 kind: {kind} }} ]"


def _warmup(flavour: str) -> list[str]:
    sizes = range(1, MAX_BATCH_SIZE + 1) if flavour == "production" else CPU_WARMUP_BATCH_SIZES
    lines = ["model_warmup ["]
    samples = [
        f'  {{ name: "batch_{b}" batch_size: {b} inputs {{ key: "{INPUT_NAME}" value {{ '
        f"data_type: TYPE_UINT8 dims: {_dims(IMAGE_DIMS)} random_data: true }} }} }}"
        for b in sizes
    ]
    lines.append(",\n".join(samples))
    lines.append("]")
    return lines


def _backend_parameters(flavour: str) -> dict[str, str]:
    # Documented knobs of the libtorch backend; the Python runner reads "precision".
    if flavour == "production":
        return {"INFERENCE_MODE": "true", "DISABLE_OPTIMIZED_EXECUTION": "false"}
    return {"precision": "fp32"}


def network_config(entry: NetworkEntry, flavour: str) -> str:
    lines = [
        *_header(entry.name, flavour),
        "input [",
        _tensor(INPUT_NAME, "TYPE_UINT8", IMAGE_DIMS),
        "]",
        "output [",
        _tensor(OUTPUT_NAME, "TYPE_FP32", [NUM_CLASSES], labels=True),
        "]",
        _instances(flavour),
        "dynamic_batching {",
        f"  preferred_batch_size: {_dims(PREFERRED_BATCH_SIZES)}",
        f"  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}",
        f"  default_queue_policy {{ max_queue_size: {MAX_QUEUE_SIZE} }}",
        "}",
        *_warmup(flavour),
        *_parameters(
            {
                "crop_pct": f"{entry.crop_pct:g}",
                "interpolation": entry.interpolation,
                "input_size": str(entry.input_size),
                "weights": entry.weights,
                "weights_sha256": entry.weights_sha256,
                **_backend_parameters(flavour),
            }
        ),
    ]
    return "\n".join(lines) + "\n"


def mean_config(ensemble: EnsembleEntry, flavour: str) -> str:
    n = len(ensemble.members)
    lines = [
        *_header(ensemble.mean_name, flavour),
        "input [",
        ",\n".join(_tensor(member_input_name(i), "TYPE_FP32", [NUM_CLASSES]) for i in range(n)),
        "]",
        "output [",
        _tensor(OUTPUT_NAME, "TYPE_FP32", [NUM_CLASSES], labels=True),
        "]",
        _instances(flavour),
        *_parameters(
            {
                "member_weights": ",".join(f"{w:g}" for w in ensemble.member_weights),
                **_backend_parameters(flavour),
            }
        ),
    ]
    return "\n".join(lines) + "\n"


def ensemble_config(ensemble: EnsembleEntry) -> str:
    """The fan-out: one image to every member, their probabilities to the weighted mean.
    Identical in both flavours: an ensemble has no backend of its own."""
    steps = []
    for i, member in enumerate(ensemble.members):
        steps.append(
            f'  {{ model_name: "{member.name}" model_version: -1\n'
            f'    input_map {{ key: "{INPUT_NAME}" value: "{INPUT_NAME}" }}\n'
            f'    output_map {{ key: "{OUTPUT_NAME}" value: "{member_input_name(i)}" }} }}'
        )
    mean_inputs = "\n".join(
        f'    input_map {{ key: "{member_input_name(i)}" value: "{member_input_name(i)}" }}'
        for i in range(len(ensemble.members))
    )
    steps.append(
        f'  {{ model_name: "{ensemble.mean_name}" model_version: -1\n{mean_inputs}\n'
        f'    output_map {{ key: "{OUTPUT_NAME}" value: "{OUTPUT_NAME}" }} }}'
    )
    first = ensemble.members[0]
    lines = [
        f'name: "{ensemble.name}"',
        'platform: "ensemble"',
        f"max_batch_size: {MAX_BATCH_SIZE}",
        "input [",
        _tensor(INPUT_NAME, "TYPE_UINT8", IMAGE_DIMS),
        "]",
        "output [",
        _tensor(OUTPUT_NAME, "TYPE_FP32", [NUM_CLASSES], labels=True),
        "]",
        "ensemble_scheduling { step [",
        ",\n".join(steps),
        "] }",
        *_parameters(
            {
                # One image feeds every member, so one preprocessing: the first member's.
                "crop_pct": f"{first.crop_pct:g}",
                "interpolation": first.interpolation,
                "input_size": str(first.input_size),
                "weights": ensemble.weights,
                "weights_sha256": "",
                "members": ",".join(m.name for m in ensemble.members),
                "member_weights": ",".join(f"{w:g}" for w in ensemble.member_weights),
            }
        ),
    ]
    return "\n".join(lines) + "\n"


def _write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return
        link.unlink()
    link.symlink_to(target)


def write_model_dir(
    root: Path, name: str, config: str, flavour: str, model_file: Path | None, production_root: Path
) -> Path:
    """One folder: config, labels, and a version holding the model (production) or the
    runner beside a link to production's model file (cpu)."""
    folder = root / name
    _write_if_changed(folder / "config.pbtxt", config)
    shutil.copyfile(LABELS_PATH, folder / LABELS_FILE)
    if model_file is not None and flavour == "cpu":
        version = folder / "1"
        version.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(RUNNER_PATH, version / "model.py")
        _link((production_root / name / "1" / "model.pt").resolve(), version / "model.pt")
    elif model_file is None:
        # An ensemble needs an (empty) version folder for Triton to load it.
        (folder / "1").mkdir(parents=True, exist_ok=True)
    return folder


def write_repository(
    root: Path,
    flavour: str,
    networks: Sequence[NetworkEntry],
    ensemble: EnsembleEntry | None,
    production_root: Path,
) -> None:
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; expected one of {FLAVOURS}")
    root.mkdir(parents=True, exist_ok=True)
    for entry in networks:
        write_model_dir(
            root,
            entry.name,
            network_config(entry, flavour),
            flavour,
            production_root / entry.name / "1" / "model.pt",
            production_root,
        )
    if ensemble is not None:
        write_model_dir(
            root,
            ensemble.mean_name,
            mean_config(ensemble, flavour),
            flavour,
            production_root / ensemble.mean_name / "1" / "model.pt",
            production_root,
        )
        write_model_dir(root, ensemble.name, ensemble_config(ensemble), flavour, None, production_root)
