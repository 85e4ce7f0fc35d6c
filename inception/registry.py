"""One description per model: everything about it that is not a weight.

Like torchvision's weight enums and timm's pretrained configs, the preprocessing a model
was trained with travels with the model, so the exporter writes it into the Triton
repository and the gateway reads it from there instead of hard-coding it.

The names themselves come from `contract.NETWORKS`, the list the torch-free side (the
gateway, the evaluation, the deployment files' tests) reads: `MODELS` is built in that
order and refuses to import when the two disagree, naming the side that lacks a network.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from . import contract
from .inception_resnet_v1 import InceptionResNetV1
from .inception_resnet_v2 import InceptionResNetV2
from .inception_v4 import InceptionV4

Rule = tuple[str, str | Callable[[re.Match[str]], str]]


class RegistryError(RuntimeError):
    """The specs here and the names in `contract.NETWORKS` disagree, or a spec is unsound."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    # The side of the square image the network takes, and the crop it was trained with
    # (timm's eval transform: resize the shorter side to input_size / crop_pct, crop the
    # centre). The exporter writes all three into the model's config, and each image
    # input's dims are [input_size, input_size, 3].
    input_size: int
    crop_pct: float
    # Parameters of the network as built here (at num_classes), and multiply-accumulates of
    # one image at input_size in billions: facts that tests hold the built network and the
    # README's table to.
    num_params: int
    gmacs: float
    interpolation: str = "bicubic"
    num_classes: int = contract.NUM_CLASSES
    # timm's hub repository, when a public checkpoint exists, and the commit of it that is
    # downloaded: a full 40-hex commit id, never a branch, so that what an export fetches
    # is fixed by this file and a changed upstream ships only when someone changes it here
    # (and the provenance says which commit it was: weights.hub_source).
    hub_repo: str | None = None
    hub_revision: str | None = None
    hub_filename: str = "model.safetensors"
    # Regex rules that rename timm's parameter names to ours, applied in order.
    timm_rules: tuple[Rule, ...] = field(default_factory=tuple)
    # The paper's single-crop, single-model ILSVRC-2012 validation errors (Table 2), in %.
    paper_top1_error: float | None = None
    paper_top5_error: float | None = None

    def __post_init__(self) -> None:
        """A hub checkpoint without a pinned commit would follow upstream's `main`: refused
        at import, so no spec can reach `hf_hub_download` unpinned."""
        if self.hub_repo is not None and not _is_commit_id(self.hub_revision):
            raise RegistryError(
                f"{self.name}: hub_repo {self.hub_repo!r} needs hub_revision, the full 40-hex commit "
                f"id of the checkpoint to download (not a branch or tag), not {self.hub_revision!r}"
            )
        if self.hub_repo is None and self.hub_revision is not None:
            raise RegistryError(f"{self.name}: hub_revision without hub_repo")

    @property
    def has_public_checkpoint(self) -> bool:
        return self.hub_repo is not None


_COMMIT_ID = re.compile(r"[0-9a-f]{40}")


def _is_commit_id(revision: str | None) -> bool:
    return revision is not None and _COMMIT_ID.fullmatch(revision) is not None


def _offset(prefix: str, start: int) -> Callable[[re.Match[str]], str]:
    return lambda m: f"{prefix}.{int(m.group(1)) - start}."


# Branch attributes of the checkpoint (`branch0`) are our `Branches` list (`branches.0`);
# Inception-v4's Inception-C names its forked branches flat (`branch1_1a`).
_BRANCH_RULES: tuple[Rule, ...] = (
    (r"\.branch1_0\.", ".branches.1.trunk."),
    (r"\.branch1_1a\.", ".branches.1.heads.0."),
    (r"\.branch1_1b\.", ".branches.1.heads.1."),
    (r"\.branch2_([012])\.", r".branches.2.trunk.\1."),
    (r"\.branch2_3a\.", ".branches.2.heads.0."),
    (r"\.branch2_3b\.", ".branches.2.heads.1."),
    (r"\.branch(\d)\.", r".branches.\1."),
)

_V4_RULES: tuple[Rule, ...] = (
    (r"^features\.0\.", "stem.conv1."),
    (r"^features\.1\.", "stem.conv2."),
    (r"^features\.2\.", "stem.conv3."),
    (r"^features\.3\.conv\.", "stem.mixed_3a.branches.1."),
    (r"^features\.4\.", "stem.mixed_4a."),
    (r"^features\.5\.conv\.", "stem.mixed_5a.branches.0."),
    (r"^features\.([6-9])\.", _offset("inception_a", 6)),
    (r"^features\.10\.", "reduction_a."),
    (r"^features\.(1[1-7])\.", _offset("inception_b", 11)),
    (r"^features\.18\.", "reduction_b."),
    (r"^features\.(19|20|21)\.", _offset("inception_c", 19)),
    (r"^last_linear\.", "head.fc."),
    *_BRANCH_RULES,
)

_IRV2_RULES: tuple[Rule, ...] = (
    (r"^conv2d_(1a|2a|2b|3b|4a)\.", r"stem.conv_\1."),
    (r"^mixed_5b\.", "stem.mixed_5b."),
    (r"^repeat\.", "blocks_a."),
    (r"^mixed_6a\.", "reduction_a."),
    (r"^repeat_1\.", "blocks_b."),
    (r"^mixed_7a\.", "reduction_b."),
    (r"^repeat_2\.", "blocks_c."),
    (r"^block8\.", "blocks_c.9."),
    (r"^conv2d_7b\.", "conv_7b."),
    (r"^classif\.", "head.fc."),
    (r"\.conv2d\.", ".up."),
    *_BRANCH_RULES,
)


def in_contract_order(specs: Iterable[ModelSpec], networks: Sequence[str]) -> dict[str, ModelSpec]:
    """The specs by name, in the order of `networks` (contract.NETWORKS), which is the
    ensemble's member order and the gateway's; a name on one side only is an error that
    says where to add it."""
    by_name = {spec.name: spec for spec in specs}
    problems = []
    if without_spec := [name for name in networks if name not in by_name]:
        problems.append(
            f"{', '.join(without_spec)} in NETWORKS (inception/contract.py) but without a ModelSpec "
            "in MODELS (inception/registry.py)"
        )
    if unlisted := [name for name in by_name if name not in networks]:
        problems.append(
            f"{', '.join(unlisted)} in MODELS (inception/registry.py) but not in NETWORKS "
            "(inception/contract.py), the list the gateway and the deployment read"
        )
    if problems:
        raise RegistryError("the networks disagree: " + "; ".join(problems))
    return {name: by_name[name] for name in networks}


# The pinned hub commits. Neither could be checked against the hub from here (no machine
# of this project reaches it); both were read from the hub's own pages of the two
# repositories: each is the last commit before the README-only "transformers tag" commits
# of 2025, "Update config.json" of 10 May 2023, whose tree holds model.safetensors as
# "Add model" of 25 April 2023 uploaded it (the file has no later commit):
# https://huggingface.co/timm/inception_v4.tf_in1k/commit/12b15021195c5382ba33b3d58959d5001631368f
# https://huggingface.co/timm/inception_resnet_v2.tf_in1k/tree/548a334e1afd3b398b4be37c89972dfb24d707aa
# To move to another upstream commit, change the id here: the export's fingerprint follows
# the checkpoint's hash, so the networks are exported again with the new file.
_V4_HUB_REVISION = "12b15021195c5382ba33b3d58959d5001631368f"
_IRV2_HUB_REVISION = "548a334e1afd3b398b4be37c89972dfb24d707aa"

MODELS: dict[str, ModelSpec] = in_contract_order(
    (
        ModelSpec(
            name="inception_v4",
            builder=InceptionV4,
            input_size=299,
            crop_pct=0.875,
            num_params=42_679_816,
            gmacs=12.25,
            hub_repo="timm/inception_v4.tf_in1k",
            hub_revision=_V4_HUB_REVISION,
            timm_rules=_V4_RULES,
            paper_top1_error=20.0,
            paper_top5_error=5.0,
        ),
        ModelSpec(
            name="inception_resnet_v1",
            builder=InceptionResNetV1,
            input_size=299,
            # No checkpoint was ever trained for it in this layout: use Inception-v4's.
            crop_pct=0.875,
            num_params=22_756_328,
            gmacs=6.21,
            paper_top1_error=21.3,
            paper_top5_error=5.5,
        ),
        ModelSpec(
            name="inception_resnet_v2",
            builder=InceptionResNetV2,
            input_size=299,
            crop_pct=0.8975,
            num_params=55_843_464,
            gmacs=13.16,
            hub_repo="timm/inception_resnet_v2.tf_in1k",
            hub_revision=_IRV2_HUB_REVISION,
            timm_rules=_IRV2_RULES,
            paper_top1_error=19.9,
            paper_top5_error=4.9,
        ),
    ),
    contract.NETWORKS,
)


class UnknownModelError(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown model {name!r}; known models: {', '.join(list_models())}")

    def __str__(self) -> str:
        return str(self.args[0])


def list_models() -> list[str]:
    return list(MODELS)


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(name) from None


def remap_timm_key(spec: ModelSpec, key: str) -> str:
    for pattern, replacement in spec.timm_rules:
        key = re.sub(pattern, replacement, key)
    return key
