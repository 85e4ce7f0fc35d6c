"""What Triton runs: the networks wrapped with their input conversion and softmax, and the
ensemble's weighted mean, as modules that trace to device-independent TorchScript.

Normalisation lives in the graph so the wire carries uint8 (4× smaller than float32) and
no client can preprocess differently from the checkpoint's training.
"""

from __future__ import annotations

import torch
from torch import nn


class ServingModel(nn.Module):
    """uint8 NHWC RGB (already cropped and resized) → float in [-1, 1] NCHW → network →
    softmax, returned as float32 whatever precision the network runs in.

    Inception's mean = std = 0.5 on [0, 1] is x / 127.5 − 1 on [0, 255]. The conversion
    follows the dtype of `anchor`, a buffer, so `.half()` on the traced module runs the
    whole network in float16 with no second trace (the exporter's fp16 precision).
    """

    anchor: torch.Tensor

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("anchor", torch.zeros(()), persistent=True)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).type_as(self.anchor) / 127.5 - 1.0
        return torch.softmax(self.network(x).float(), dim=1)


class WeightedMean(nn.Module):
    """The ensemble's last step: Σ wᵢ·pᵢ with weights normalised to sum to one, so the
    result stays a probability distribution."""

    weights: torch.Tensor

    def __init__(self, weights: list[float]) -> None:
        super().__init__()
        w = torch.tensor(weights, dtype=torch.float32)
        if w.ndim != 1 or len(w) < 1 or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"ensemble weights must be non-negative and not all zero, got {weights}")
        self.register_buffer("weights", w / w.sum())

    def forward(self, *members: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(members, dim=0)
        return (stacked * self.weights.view(-1, 1, 1)).sum(dim=0)
