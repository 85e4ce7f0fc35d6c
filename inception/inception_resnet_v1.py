"""Inception-ResNet-v1 as the paper draws it (Figures 14, 10, 7, 11, 12, 13 and 15): its
own stem to 35×35×256, 5 × Inception-ResNet-A, Reduction-A (k, l, m, n = 192, 192, 256,
384) to 17×17×896, 10 × Inception-ResNet-B, Reduction-B to 8×8×1792, 5 ×
Inception-ResNet-C, average pooling, dropout (keep 0.8) and a 1000-way classifier.

No public ImageNet checkpoint exists for this network: it serves its (deterministic)
random initialisation unless a user supplies a state dict. Its 1×1 up-projections carry a
bias and no batch norm, as in the released residual checkpoints; the residual scales
default to those of the Inception-ResNet-v2 checkpoint.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .layers import (
    Conv,
    ConvBnReLU,
    InceptionResNet,
    ResidualInception,
    conv_chain,
    reduction_a,
    residual_reduction_b,
    residual_stem_column,
)

# Figure 15: the widths of the three stages and the blocks of each.
STAGE_CHANNELS = (256, 896, 1792)
BLOCK_COUNTS = (5, 10, 5)


def stem(in_channels: int = 3) -> nn.Sequential:
    """Figure 14: 299×299×3 → 35×35×256."""
    return nn.Sequential(
        OrderedDict(**residual_stem_column(in_channels), conv_4b=ConvBnReLU(192, 256, 3, stride=2))
    )


def block_a(scale: float) -> ResidualInception:
    """Figure 10 (35×35×256)."""
    c = STAGE_CHANNELS[0]
    branches = [
        ConvBnReLU(c, 32, 1),
        conv_chain(c, Conv(32, 1), Conv(32, 3, padding=1)),
        conv_chain(c, Conv(32, 1), Conv(32, 3, padding=1), Conv(32, 3, padding=1)),
    ]
    return ResidualInception(branches, 96, c, scale)


def block_b(scale: float) -> ResidualInception:
    """Figure 11 (17×17×896)."""
    c = STAGE_CHANNELS[1]
    branches = [
        ConvBnReLU(c, 128, 1),
        conv_chain(c, Conv(128, 1), Conv(128, (1, 7), padding=(0, 3)), Conv(128, (7, 1), padding=(3, 0))),
    ]
    return ResidualInception(branches, 256, c, scale)


def block_c(scale: float) -> ResidualInception:
    """Figure 13 (8×8×1792)."""
    c = STAGE_CHANNELS[2]
    branches = [
        ConvBnReLU(c, 192, 1),
        conv_chain(c, Conv(192, 1), Conv(192, (1, 3), padding=(0, 1)), Conv(192, (3, 1), padding=(1, 0))),
    ]
    return ResidualInception(branches, 384, c, scale)


class InceptionResNetV1(InceptionResNet):
    """Figure 15 with Inception-ResNet-v1's parts: the Figure 14 stem, 5 × Figure 10,
    Reduction-A, 10 × Figure 11, Reduction-B (Figure 12), 5 × Figure 13, then the shared
    pooling, dropout and classifier on the 1792 channels of the last stage."""

    num_features = STAGE_CHANNELS[2]

    def build(self, in_channels: int, scales: tuple[float, float, float]) -> None:
        scale_a, scale_b, scale_c = scales
        n_a, n_b, n_c = BLOCK_COUNTS
        self.stem = stem(in_channels)
        self.blocks_a = nn.Sequential(*[block_a(scale_a) for _ in range(n_a)])
        self.reduction_a = reduction_a(STAGE_CHANNELS[0], k=192, l=192, m=256, n=384)
        self.blocks_b = nn.Sequential(*[block_b(scale_b) for _ in range(n_b)])
        # Figure 12: 896 + 384 + 256 + 256 = 1792.
        self.reduction_b = residual_reduction_b(STAGE_CHANNELS[1], out_a=384, out_b=256, mid_c=256, out_c=256)
        self.blocks_c = nn.Sequential(*[block_c(scale_c) for _ in range(n_c)])
