"""Inception-ResNet-v2 in the layout of the released TF-slim checkpoint as timm ports it
(`inception_resnet_v2.tf_in1k`), which is the network people actually run.

Departures of that checkpoint from the paper's figures, all followed here:

- Stem: not Figure 3 (shared with Inception-v4, ending at 35×35×384) but a plain column
  (3×3/2 32, 3×3 32, 3×3 64, max pool, 1×1 80, 3×3 192, max pool) followed by an
  Inception block "Mixed_5b" (96 | 48→5×5 64 | 64→96→96 | avg pool→64), ending at
  35×35×320.
- Block counts: 10 × Inception-ResNet-A, 20 × B and 10 × C, not the 5, 10, 5 of Figure 15.
- Inception-ResNet-A (Figure 16) projects to 320 channels, not 384.
- Reduction-A uses k, l, m, n = 256, 256, 384, 384 (Table 1 gives 256, 256, 384, 384 as
  well), giving 320 + 384 + 384 = 1088 channels rather than Figure 17's 1154.
- Inception-ResNet-B (Figure 17): 192 | 128 → 1×7 160 → 7×1 192, projected to 1088 (1154
  in the figure).
- Reduction-B (Figure 18): 256→384, 256→288, 256→288→320 and max pool: 2080 channels,
  not 2144.
- Inception-ResNet-C (Figure 19): 192 | 192 → 1×3 224 → 3×1 256, projected to 2080 (2048
  in the figure); the last of the ten C blocks has no ReLU after its residual sum.
- A 1×1 convolution to 1536 channels (with batch norm and ReLU) before average pooling,
  which the paper does not draw.
- Residual scales 0.17 (A), 0.10 (B) and 0.20 (C), inside the paper's 0.1–0.3.
- The 1×1 up-projections carry a bias and no batch norm; every other convolution is
  conv–BN(eps 0.001)–ReLU without bias.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .layers import (
    Branches,
    Conv,
    ConvBnReLU,
    InceptionResNet,
    ResidualInception,
    conv_chain,
    pool_branch,
    reduction_a,
    residual_reduction_b,
    residual_stem_column,
)

# The checkpoint's stage widths (the paper draws 384, 1154 and 2048), its blocks per stage
# (the paper's Figure 15 has 5, 10 and 5), and the width of its last 1×1 convolution.
STAGE_CHANNELS = (320, 1088, 2080)
BLOCK_COUNTS = (10, 20, 10)
NUM_FEATURES = 1536


def stem(in_channels: int = 3) -> nn.Sequential:
    """The checkpoint's stem, not Figure 3: the residual networks' plain column, a max pool
    and the Inception block Mixed_5b, 299×299×3 → 35×35×320. Its layers keep the TF-slim
    names (`conv_1a` … `mixed_5b`), which timm's checkpoint keys map to one for one."""
    return nn.Sequential(
        OrderedDict(
            **residual_stem_column(in_channels),
            pool_5a=nn.MaxPool2d(3, stride=2),
            mixed_5b=Branches(
                ConvBnReLU(192, 96, 1),
                conv_chain(192, Conv(48, 1), Conv(64, 5, padding=2)),
                conv_chain(192, Conv(64, 1), Conv(96, 3, padding=1), Conv(96, 3, padding=1)),
                pool_branch("avg", 192, 64),
            ),
        )
    )


def block_a(scale: float) -> ResidualInception:
    """Figure 16 (35×35×320)."""
    c = STAGE_CHANNELS[0]
    branches = [
        ConvBnReLU(c, 32, 1),
        conv_chain(c, Conv(32, 1), Conv(32, 3, padding=1)),
        conv_chain(c, Conv(32, 1), Conv(48, 3, padding=1), Conv(64, 3, padding=1)),
    ]
    return ResidualInception(branches, 128, c, scale)


def block_b(scale: float) -> ResidualInception:
    """Figure 17 (17×17×1088)."""
    c = STAGE_CHANNELS[1]
    branches = [
        ConvBnReLU(c, 192, 1),
        conv_chain(c, Conv(128, 1), Conv(160, (1, 7), padding=(0, 3)), Conv(192, (7, 1), padding=(3, 0))),
    ]
    return ResidualInception(branches, 384, c, scale)


def block_c(scale: float, activate: bool = True) -> ResidualInception:
    """Figure 19 (8×8×2080)."""
    c = STAGE_CHANNELS[2]
    branches = [
        ConvBnReLU(c, 192, 1),
        conv_chain(c, Conv(192, 1), Conv(224, (1, 3), padding=(0, 1)), Conv(256, (3, 1), padding=(1, 0))),
    ]
    return ResidualInception(branches, 448, c, scale, activate)


class InceptionResNetV2(InceptionResNet):
    """Figure 15 as the checkpoint builds it (the departures are listed above): its stem,
    10 × Figure 16, Reduction-A, 20 × Figure 17, Reduction-B (Figure 18), 10 × Figure 19
    (the last without its ReLU), then a 1×1 convolution to 1536 channels, which the paper
    does not draw, before the shared pooling, dropout and classifier."""

    num_features = NUM_FEATURES

    def build(self, in_channels: int, scales: tuple[float, float, float]) -> None:
        scale_a, scale_b, scale_c = scales
        n_a, n_b, n_c = BLOCK_COUNTS
        self.stem = stem(in_channels)
        self.blocks_a = nn.Sequential(*[block_a(scale_a) for _ in range(n_a)])
        self.reduction_a = reduction_a(STAGE_CHANNELS[0], k=256, l=256, m=384, n=384)
        self.blocks_b = nn.Sequential(*[block_b(scale_b) for _ in range(n_b)])
        self.reduction_b = residual_reduction_b(STAGE_CHANNELS[1], out_a=384, out_b=288, mid_c=288, out_c=320)
        # The checkpoint's last block has scale 1.0 and no ReLU.
        self.blocks_c = nn.Sequential(
            *[block_c(scale_c) for _ in range(n_c - 1)], block_c(1.0, activate=False)
        )
        self.conv_7b = ConvBnReLU(STAGE_CHANNELS[2], NUM_FEATURES, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_7b(super().forward_features(x))
