"""Loading weights: timm's checkpoint files (local or from the hub), our own state dicts,
or a deterministic random initialisation, and the provenance of whichever was used.

The provenance is what the repository's `config.pbtxt` and the gateway's answers report,
so a model that serves random weights can never pass for a trained one.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .contract import PRETRAINED_PREFIX, RANDOM_INIT
from .registry import ModelSpec, remap_timm_key

RANDOM_SEED = 0


@dataclass(frozen=True)
class WeightsInfo:
    """Where a model's weights came from: `pretrained:<source>` or `random-init`."""

    provenance: str
    sha256: str = ""

    @property
    def is_random(self) -> bool:
        return self.provenance == RANDOM_INIT


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model, with the keys that do not fit."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Reads safetensors or a torch file (only tensors: `weights_only`, no pickled code)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which and why
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return state


def to_our_names(spec: ModelSpec, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames timm's parameter names to ours; our own state dicts pass through unchanged."""
    if not spec.timm_rules or any(key.startswith(("stem.", "head.")) for key in state):
        return dict(state)
    return {remap_timm_key(spec, key): value for key, value in state.items()}


def _describe(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Loads strictly, failing with the first missing, unexpected or misshapen keys."""
    expected = model.state_dict()
    # Batch-norm step counters carry no weight and some exporters drop them.
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_describe(mismatched)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {source} does not fit {type(model).__name__}: " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=False)


#: How an export uses the hub: `never`, `auto` (when a short check finds it reachable) or
#: `always` (a failure to download is an error). Accepted spellings of each, for env vars.
HUB_MODES = {
    "never": "never", "0": "never", "false": "never", "no": "never",
    "auto": "auto",
    "always": "always", "1": "always", "true": "always", "yes": "always",
}  # fmt: skip
DEFAULT_HUB_ENDPOINT = "https://huggingface.co"


def hub_mode(value: str) -> str:
    """`never`, `auto` or `always` from any accepted spelling; ValueError otherwise."""
    try:
        return HUB_MODES[value.strip().lower()]
    except KeyError:
        raise ValueError(f"the hub setting must be auto, always (1) or never (0), not {value!r}") from None


def hub_endpoint() -> str:
    """The hub the downloads go to: `HF_ENDPOINT`, which `huggingface_hub` honours too."""
    return os.environ.get("HF_ENDPOINT", "").strip() or DEFAULT_HUB_ENDPOINT


def hub_reachable(endpoint: str | None = None, timeout: float = 3.0) -> bool:
    """Whether the hub answers at all within `timeout` seconds (any HTTP status counts:
    the question is the network path, not a page). Short, so that a machine without the
    hub, such as CI, pays seconds at most, not a download's retries. The request runs in a
    thread that is abandoned at the deadline, because name resolution, which urllib's
    timeout does not cover, can hang for longer where DNS is black-holed."""
    import threading
    import urllib.error
    import urllib.request

    answered = threading.Event()

    def probe() -> None:
        try:
            with urllib.request.urlopen(endpoint or hub_endpoint(), timeout=timeout):
                answered.set()
        except urllib.error.HTTPError:
            answered.set()
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=probe, name="hub-check", daemon=True)
    thread.start()
    thread.join(timeout)
    return answered.is_set()


#: How a hub checkpoint is named in provenance: `hf-hub:<repo>@<commit>`, the repository
#: and the exact commit it came from, so that `weights` in the config and in every answer
#: says which upstream file is served, not only which repository.
HUB_SOURCE_PREFIX = "hf-hub:"


def hub_source(repo: str, revision: str) -> str:
    """The provenance source of a hub checkpoint, e.g. `hf-hub:timm/inception_v4.tf_in1k@12b1...`."""
    return f"{HUB_SOURCE_PREFIX}{repo}@{revision}"


def hub_cache_source(path: Path) -> str | None:
    """The hub source of a file inside huggingface_hub's cache, or None for any other path.

    `hf_hub_download` answers with the path of the file in the snapshot of the commit it
    fetched, `.../models--<org>--<name>/snapshots/<commit>/<file>`; the exporter hands that
    path on as the checkpoint, so its provenance is read back from it here instead of
    becoming the bare file name (`model.safetensors`), which would hide both the repository
    and the commit."""
    snapshot, snapshots, repo_dir = path.parent, path.parent.parent, path.parent.parent.parent
    if snapshots.name != "snapshots" or not re.fullmatch(r"[0-9a-f]{40}", snapshot.name):
        return None
    parts = repo_dir.name.split("--")
    if len(parts) != 3 or parts[0] != "models" or not all(parts[1:]):
        return None
    return hub_source(f"{parts[1]}/{parts[2]}", snapshot.name)


def hub_checkpoint(spec: ModelSpec) -> Path:
    """Fetches timm's checkpoint from the hub at the spec's pinned commit (needs network, or
    that commit in the local cache; `huggingface_hub` only, no timm). Pinned, because the
    repository's `main` can move: a changed upstream file must never reach an export
    unannounced, and the commit is what the provenance names."""
    if spec.hub_repo is None or spec.hub_revision is None:
        raise CheckpointError(f"no public checkpoint exists for {spec.name}; give a local state dict instead")
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(repo_id=spec.hub_repo, filename=spec.hub_filename, revision=spec.hub_revision)
    return Path(path)


def load_weights(model: nn.Module, spec: ModelSpec, weights: str | os.PathLike[str] | None) -> WeightsInfo:
    """`weights`: None for random init (already done by the caller), "hub" for timm's
    published checkpoint at the spec's pinned commit, or the path of a timm checkpoint or
    of one of our state dicts. The provenance names the source: `hf-hub:<repo>@<commit>`
    for the hub (asked for by "hub", or a path in the hub's cache), else the file's name."""
    if weights is None:
        return WeightsInfo(RANDOM_INIT)
    if str(weights) == "hub":
        path = hub_checkpoint(spec)
        assert spec.hub_repo is not None and spec.hub_revision is not None  # hub_checkpoint checked
        source = hub_source(spec.hub_repo, spec.hub_revision)
    else:
        path = Path(weights).expanduser()
        source = hub_cache_source(path) or path.name
    apply_state_dict(model, to_our_names(spec, read_state_dict(path)), str(path))
    return WeightsInfo(f"{PRETRAINED_PREFIX}{source}", sha256_of(path))
