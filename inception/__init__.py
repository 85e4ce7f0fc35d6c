"""The networks of Szegedy et al., "Inception-v4, Inception-ResNet and the Impact of
Residual Connections on Learning" (AAAI 2017), with checkpoint loading and export to a
Triton model repository.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .registry import MODELS, ModelSpec, UnknownModelError, get_spec, list_models
from .weights import RANDOM_SEED, CheckpointError, WeightsInfo, load_weights

__all__ = [
    "MODELS",
    "CheckpointError",
    "ModelSpec",
    "UnknownModelError",
    "WeightsInfo",
    "create_model",
    "get_spec",
    "list_models",
]


def create_model(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    *,
    seed: int = RANDOM_SEED,
    **kwargs: object,
) -> nn.Module:
    """Builds a model by name, in eval mode, with `weights` loaded (see `load_weights`).

    Random initialisation is seeded without touching the caller's random state, so the
    same inputs always give the same weights and the same exported file. The weights'
    provenance is left on the model as `weights_info`.
    """
    spec = get_spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.builder(num_classes=spec.num_classes, **kwargs)
    model.weights_info = load_weights(model, spec, weights)
    return model.eval()
