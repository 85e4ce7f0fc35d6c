"""Building blocks shared by the three networks of the paper.

Every figure of the paper is made of the same three patterns: a convolution followed by
batch normalisation and ReLU, several branches run on one input and concatenated along
channels, and (for the residual networks) such a concatenation projected back to the
input width by a linear 1×1 convolution and added to the input. Writing these once keeps
each network file a readable transcription of its figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

# TF-slim's batch-norm epsilon, which the released checkpoints were trained with.
BN_EPS = 1e-3

Size = int | tuple[int, int]


class Conv(NamedTuple):
    """One conv–BN–ReLU of a column, as a figure labels it: `Conv(224, (1, 7), padding=(0, 3))`
    is the paper's "1×7 conv (224)". Named fields rather than a bare 4-tuple, so that the
    stride and the padding read as what they are; the input width is the previous layer's."""

    out_channels: int
    kernel: Size
    stride: int = 1
    padding: Size = 0


class ConvBnReLU(nn.Module):
    """Conv (no bias: the batch norm's shift replaces it) → BatchNorm → ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Size,
        stride: int = 1,
        padding: Size = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def conv_chain(in_channels: int, *convs: Conv) -> nn.Sequential:
    """A column of conv–BN–ReLU layers, as drawn bottom to top in a branch of a figure."""
    layers = []
    for conv in convs:
        layers.append(ConvBnReLU(in_channels, conv.out_channels, conv.kernel, conv.stride, conv.padding))
        in_channels = conv.out_channels
    return nn.Sequential(*layers)


def pool_branch(kind: str, in_channels: int | None = None, out_channels: int | None = None) -> nn.Module:
    """A pooling branch: 3×3/2 max pool (reductions) or 3×3/1 average pool then 1×1 conv."""
    if kind == "max":
        return nn.MaxPool2d(3, stride=2)
    assert in_channels is not None and out_channels is not None
    return nn.Sequential(
        nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
        ConvBnReLU(in_channels, out_channels, 1),
    )


class Fork(nn.Module):
    """A branch that splits after a common trunk into parallel heads (Inception-v4's
    Figure 6: a 1×3 and a 3×1 convolution side by side on the same input)."""

    def __init__(self, trunk: nn.Module, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk(x)
        return torch.cat([head(x) for head in self.heads], 1)


class Branches(nn.Module):
    """Runs each branch on the same input and concatenates the results along channels.

    The order of branches is the order of the channels in the released checkpoints,
    which is not always the left-to-right order of the paper's drawings.
    """

    def __init__(self, *branches: nn.Module) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], 1)


class ResidualInception(Branches):
    """Inception-ResNet block: branches → concatenation → linear 1×1 up-projection
    (with a bias and no batch norm, as in the released checkpoints) → scaled residual
    sum → ReLU.

    `scale` is the residual scaling of the paper's section 3.3 (0.1 to 0.3), which keeps
    wide residual networks from dying early in training. `activate=False` leaves the ReLU
    out, as the last block of the Inception-ResNet-v2 checkpoint does.
    """

    def __init__(
        self,
        branches: Sequence[nn.Module],
        concat_channels: int,
        channels: int,
        scale: float,
        activate: bool = True,
    ) -> None:
        super().__init__(*branches)
        self.up = nn.Conv2d(concat_channels, channels, 1, bias=True)
        self.scale = scale
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x + self.scale * self.up(super().forward(x))
        return torch.relu(out) if self.activate else out


class ClassifierHead(nn.Module):
    """Global average pooling → dropout (keep 0.8 in the paper) → linear classifier.

    `pre_logits=True` stops before the classifier, as timm's `forward_head` does: the
    pooled features are what an embedding or a new classifier starts from.
    """

    def __init__(self, in_features: int, num_classes: int, drop_rate: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
        return x if pre_logits else self.fc(x)


class Network(nn.Module):
    """A classifier split as timm splits its models, so that code written against timm's
    interface (feature extraction, a new head) works on ours: `forward_features` runs the
    figures up to the last feature map, `num_features` channels wide; `forward_head` pools
    and classifies it. A network builds `head` and defines `forward_features`."""

    num_features: int
    head: ClassifierHead

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def reduction_a(in_channels: int, k: int, l: int, m: int, n: int) -> Branches:  # noqa: E741 (the paper's names)
    """Figure 7, the 35×35 → 17×17 reduction shared by all three networks; the filter
    counts k, l, m, n are the paper's Table 1."""
    return Branches(
        ConvBnReLU(in_channels, n, 3, stride=2),
        conv_chain(in_channels, Conv(k, 1), Conv(l, 3, padding=1), Conv(m, 3, stride=2)),
        pool_branch("max"),
    )


def residual_reduction_b(in_channels: int, out_a: int, out_b: int, mid_c: int, out_c: int) -> Branches:
    """Figures 12 and 18, the 17×17 → 8×8 reduction of the residual networks: three
    1×1 (256) → stride-2 3×3 columns and a max pool."""
    return Branches(
        conv_chain(in_channels, Conv(256, 1), Conv(out_a, 3, stride=2)),
        conv_chain(in_channels, Conv(256, 1), Conv(out_b, 3, stride=2)),
        conv_chain(in_channels, Conv(256, 1), Conv(mid_c, 3, padding=1), Conv(out_c, 3, stride=2)),
        pool_branch("max"),
    )


def residual_stem_column(in_channels: int = 3) -> dict[str, nn.Module]:
    """The plain convolution column both residual networks open with (Figure 14 up to its
    last layer; the Inception-ResNet-v2 checkpoint's stem up to its Mixed_5b), named as
    the TF-slim layers it came from: 299×299×3 → 71×71×192."""
    return {
        "conv_1a": ConvBnReLU(in_channels, 32, 3, stride=2),
        "conv_2a": ConvBnReLU(32, 32, 3),
        "conv_2b": ConvBnReLU(32, 64, 3, padding=1),
        "pool_3a": nn.MaxPool2d(3, stride=2),
        "conv_3b": ConvBnReLU(64, 80, 1),
        "conv_4a": ConvBnReLU(80, 192, 3),
    }


# The residual scales of the Inception-ResNet-v2 checkpoint (section 3.3: 0.1 to 0.3).
DEFAULT_RESIDUAL_SCALES = (0.17, 0.10, 0.20)


class InceptionResNet(Network):
    """The layout both residual networks share (Figure 15): stem, blocks A, Reduction-A,
    blocks B, Reduction-B, blocks C, classifier. A subclass builds the parts in `build`,
    under these attribute names, which the checkpoint-name rules of `registry.py` map to;
    `num_features` is the width the classifier sees."""

    stem: nn.Module
    blocks_a: nn.Module
    reduction_a: nn.Module
    blocks_b: nn.Module
    reduction_b: nn.Module
    blocks_c: nn.Module

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        drop_rate: float = 0.2,
        scales: tuple[float, float, float] = DEFAULT_RESIDUAL_SCALES,
    ) -> None:
        super().__init__()
        self.build(in_channels, scales)
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)

    def build(self, in_channels: int, scales: tuple[float, float, float]) -> None:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks_a(self.stem(x))
        x = self.blocks_b(self.reduction_a(x))
        return self.blocks_c(self.reduction_b(x))
