"""One description per model: everything about it that is not a weight.

Like torchvision's weight enums and timm's pretrained configs, the preprocessing a model
was trained with travels with the model, so the exporter writes it into the Triton
repository and the gateway reads it from there instead of hard-coding it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from .inception_resnet_v1 import InceptionResNetV1
from .inception_resnet_v2 import InceptionResNetV2
from .inception_v4 import InceptionV4

Rule = tuple[str, str | Callable[[re.Match[str]], str]]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    crop_pct: float
    interpolation: str = "bicubic"
    input_size: int = 299
    num_classes: int = 1000
    # timm's hub repository, when a public checkpoint exists.
    hub_repo: str | None = None
    hub_filename: str = "model.safetensors"
    # Regex rules that rename timm's parameter names to ours, applied in order.
    timm_rules: tuple[Rule, ...] = field(default_factory=tuple)
    # The paper's single-crop, single-model ILSVRC-2012 validation errors (Table 2), in %.
    paper_top1_error: float | None = None
    paper_top5_error: float | None = None

    @property
    def has_public_checkpoint(self) -> bool:
        return self.hub_repo is not None


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

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="inception_v4",
            builder=InceptionV4,
            crop_pct=0.875,
            hub_repo="timm/inception_v4.tf_in1k",
            timm_rules=_V4_RULES,
            paper_top1_error=20.0,
            paper_top5_error=5.0,
        ),
        ModelSpec(
            name="inception_resnet_v1",
            builder=InceptionResNetV1,
            # No checkpoint was ever trained for it in this layout: use Inception-v4's.
            crop_pct=0.875,
            paper_top1_error=21.3,
            paper_top5_error=5.5,
        ),
        ModelSpec(
            name="inception_resnet_v2",
            builder=InceptionResNetV2,
            crop_pct=0.8975,
            hub_repo="timm/inception_resnet_v2.tf_in1k",
            timm_rules=_IRV2_RULES,
            paper_top1_error=19.9,
            paper_top5_error=4.9,
        ),
    )
}


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
