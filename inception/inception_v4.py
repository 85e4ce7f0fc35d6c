"""Inception-v4 (Szegedy et al. 2017, Figures 3 to 9), in the layout of the released
TF-slim checkpoint as timm ports it (`inception_v4.tf_in1k`).

The paper's figures and the checkpoint agree for this network. Branch order inside each
block is the checkpoint's channel order.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .layers import (
    Branches,
    ClassifierHead,
    Conv,
    ConvBnReLU,
    Fork,
    Network,
    conv_chain,
    pool_branch,
    reduction_a,
)

NUM_FEATURES = 1536
# Figure 9: Inception-A, -B and -C blocks.
BLOCK_COUNTS = (4, 7, 3)


def stem(in_channels: int = 3) -> nn.Sequential:
    """Figure 3: 299×299×3 → 35×35×384."""
    return nn.Sequential(
        OrderedDict(
            conv1=ConvBnReLU(in_channels, 32, 3, stride=2),
            conv2=ConvBnReLU(32, 32, 3),
            conv3=ConvBnReLU(32, 64, 3, padding=1),
            mixed_3a=Branches(pool_branch("max"), ConvBnReLU(64, 96, 3, stride=2)),
            mixed_4a=Branches(
                conv_chain(160, Conv(64, 1), Conv(96, 3)),
                conv_chain(
                    160,
                    Conv(64, 1),
                    Conv(64, (1, 7), padding=(0, 3)),
                    Conv(64, (7, 1), padding=(3, 0)),
                    Conv(96, 3),
                ),
            ),
            mixed_5a=Branches(ConvBnReLU(192, 192, 3, stride=2), pool_branch("max")),
        )
    )


def inception_a() -> Branches:
    """Figure 4, 35×35×384."""
    return Branches(
        ConvBnReLU(384, 96, 1),
        conv_chain(384, Conv(64, 1), Conv(96, 3, padding=1)),
        conv_chain(384, Conv(64, 1), Conv(96, 3, padding=1), Conv(96, 3, padding=1)),
        pool_branch("avg", 384, 96),
    )


def inception_b() -> Branches:
    """Figure 5, 17×17×1024."""
    return Branches(
        ConvBnReLU(1024, 384, 1),
        conv_chain(1024, Conv(192, 1), Conv(224, (1, 7), padding=(0, 3)), Conv(256, (7, 1), padding=(3, 0))),
        conv_chain(
            1024,
            Conv(192, 1),
            Conv(192, (7, 1), padding=(3, 0)),
            Conv(224, (1, 7), padding=(0, 3)),
            Conv(224, (7, 1), padding=(3, 0)),
            Conv(256, (1, 7), padding=(0, 3)),
        ),
        pool_branch("avg", 1024, 128),
    )


def reduction_b() -> Branches:
    """Figure 8, 17×17×1024 → 8×8×1536."""
    return Branches(
        conv_chain(1024, Conv(192, 1), Conv(192, 3, stride=2)),
        conv_chain(
            1024,
            Conv(256, 1),
            Conv(256, (1, 7), padding=(0, 3)),
            Conv(320, (7, 1), padding=(3, 0)),
            Conv(320, 3, stride=2),
        ),
        pool_branch("max"),
    )


def _split_1x3_3x1(in_channels: int) -> list[nn.Module]:
    return [
        ConvBnReLU(in_channels, 256, (1, 3), padding=(0, 1)),
        ConvBnReLU(in_channels, 256, (3, 1), padding=(1, 0)),
    ]


def inception_c() -> Branches:
    """Figure 6, 8×8×1536: two branches fork into parallel 1×3 and 3×1 convolutions."""
    return Branches(
        ConvBnReLU(1536, 256, 1),
        Fork(ConvBnReLU(1536, 384, 1), _split_1x3_3x1(384)),
        Fork(
            conv_chain(
                1536, Conv(384, 1), Conv(448, (3, 1), padding=(1, 0)), Conv(512, (1, 3), padding=(0, 1))
            ),
            _split_1x3_3x1(512),
        ),
        pool_branch("avg", 1536, 256),
    )


class InceptionV4(Network):
    """Figure 9: stem, 4 × Inception-A, Reduction-A (k, l, m, n = 192, 224, 256, 384),
    7 × Inception-B, Reduction-B, 3 × Inception-C, average pooling, dropout, classifier."""

    num_features = NUM_FEATURES

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, drop_rate: float = 0.2) -> None:
        super().__init__()
        n_a, n_b, n_c = BLOCK_COUNTS
        self.stem = stem(in_channels)
        self.inception_a = nn.Sequential(*[inception_a() for _ in range(n_a)])
        self.reduction_a = reduction_a(384, k=192, l=224, m=256, n=384)
        self.inception_b = nn.Sequential(*[inception_b() for _ in range(n_b)])
        self.reduction_b = reduction_b()
        self.inception_c = nn.Sequential(*[inception_c() for _ in range(n_c)])
        self.head = ClassifierHead(NUM_FEATURES, num_classes, drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.reduction_a(self.inception_a(x))
        x = self.reduction_b(self.inception_b(x))
        return self.inception_c(x)
