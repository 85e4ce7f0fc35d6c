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
    ConvBnReLU,
    InceptionResNet,
    ResidualInception,
    conv_chain,
    pool_branch,
    reduction_a,
    residual_reduction_b,
    residual_stem_column,
)

NUM_FEATURES = 1536


def stem(in_channels: int = 3) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            **residual_stem_column(in_channels),
            pool_5a=nn.MaxPool2d(3, stride=2),
            mixed_5b=Branches(
                ConvBnReLU(192, 96, 1),
                conv_chain(192, [(48, 1, 1, 0), (64, 5, 1, 2)]),
                conv_chain(192, [(64, 1, 1, 0), (96, 3, 1, 1), (96, 3, 1, 1)]),
                pool_branch("avg", 192, 64),
            ),
        )
    )


def block_a(scale: float) -> ResidualInception:
    """Figure 16 (35×35×320)."""
    branches = [
        ConvBnReLU(320, 32, 1),
        conv_chain(320, [(32, 1, 1, 0), (32, 3, 1, 1)]),
        conv_chain(320, [(32, 1, 1, 0), (48, 3, 1, 1), (64, 3, 1, 1)]),
    ]
    return ResidualInception(branches, 128, 320, scale)


def block_b(scale: float) -> ResidualInception:
    """Figure 17 (17×17×1088)."""
    branches = [
        ConvBnReLU(1088, 192, 1),
        conv_chain(1088, [(128, 1, 1, 0), (160, (1, 7), 1, (0, 3)), (192, (7, 1), 1, (3, 0))]),
    ]
    return ResidualInception(branches, 384, 1088, scale)


def block_c(scale: float, activate: bool = True) -> ResidualInception:
    """Figure 19 (8×8×2080)."""
    branches = [
        ConvBnReLU(2080, 192, 1),
        conv_chain(2080, [(192, 1, 1, 0), (224, (1, 3), 1, (0, 1)), (256, (3, 1), 1, (1, 0))]),
    ]
    return ResidualInception(branches, 448, 2080, scale, activate)


class InceptionResNetV2(InceptionResNet):
    num_features = NUM_FEATURES

    def build(self, in_channels: int, scales: tuple[float, float, float]) -> None:
        scale_a, scale_b, scale_c = scales
        self.stem = stem(in_channels)
        self.blocks_a = nn.Sequential(*[block_a(scale_a) for _ in range(10)])
        self.reduction_a = reduction_a(320, k=256, l=256, m=384, n=384)
        self.blocks_b = nn.Sequential(*[block_b(scale_b) for _ in range(20)])
        self.reduction_b = residual_reduction_b(1088, out_a=384, out_b=288, mid_c=288, out_c=320)
        # The checkpoint's last block has scale 1.0 and no ReLU.
        self.blocks_c = nn.Sequential(*[block_c(scale_c) for _ in range(9)], block_c(1.0, activate=False))
        self.conv_7b = ConvBnReLU(2080, NUM_FEATURES, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_7b(super().features(x))
