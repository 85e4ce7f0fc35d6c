"""The networks of Szegedy et al., "Inception-v4, Inception-ResNet and the Impact of
Residual Connections on Learning" (AAAI 2017), with checkpoint loading and export to a
Triton model repository.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from .registry import MODELS, ModelSpec, UnknownModelError, get_spec, list_models
    from .weights import CheckpointError, WeightsInfo

# The package's torch-free modules (`contract`, `repository`, `labels`) are imported by the
# launcher and the gateway's tests without torch, so the torch-bound names load lazily.
_LAZY = {
    "MODELS": "registry",
    "ModelSpec": "registry",
    "UnknownModelError": "registry",
    "get_spec": "registry",
    "list_models": "registry",
    "CheckpointError": "weights",
    "WeightsInfo": "weights",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    seed: int | None = None,
    **kwargs: object,
) -> nn.Module:
    """Builds a model by name, in eval mode, with `weights` loaded (see `load_weights`).

    Random initialisation is seeded without touching the caller's random state, so the
    same inputs always give the same weights and the same exported file. The weights'
    provenance is left on the model as `weights_info`.
    """
    import torch

    from .registry import get_spec
    from .weights import RANDOM_SEED, load_weights

    spec = get_spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED if seed is None else seed)
        model = spec.builder(num_classes=spec.num_classes, **kwargs)
    # An attribute of the module, not a submodule or tensor: nn.Module's typing does not know it.
    model.weights_info = load_weights(model, spec, weights)  # type: ignore[assignment]
    return model.eval()
