"""A model's config as the gateway needs it: read from Triton, checked against the contract
(docs/architecture.md), and reduced to preprocessing, provenance and ensemble members."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from inception import contract

from .imaging import Preprocessing


class ConfigError(ValueError):
    """A model config that breaks the contract of docs/architecture.md (names, types, dims, parameters)."""


@dataclass(frozen=True)
class ModelInfo:
    """What the gateway needs to know of one routable model, read from its config."""

    name: str
    preprocessing: Preprocessing
    provenance: str  # "pretrained:<source>", "random-init" or "unknown"
    checkpoint_sha256: str = ""
    max_batch_size: int = 0
    members: tuple[str, ...] = ()
    member_weights: tuple[float, ...] = ()  # the ensemble's coefficients

    @property
    def is_ensemble(self) -> bool:
        return bool(self.members)

    @property
    def random_init(self) -> bool:
        return self.provenance == contract.RANDOM_INIT


def _dims(tensor: Mapping[str, Any]) -> list[int]:
    return [int(d) for d in tensor.get("dims", [])]


def parse_model_config(config: Mapping[str, Any]) -> ModelInfo:
    """Check a config (Triton's JSON form) against the contract and extract what we use."""
    if "config" in config and isinstance(config["config"], Mapping):
        config = config["config"]
    name = str(config.get("name", ""))
    params = {k: str(v.get("string_value", "")) for k, v in (config.get("parameters") or {}).items()}
    inputs, outputs = list(config.get("input", [])), list(config.get("output", []))
    if (
        len(inputs) != 1
        or inputs[0].get("name") != contract.INPUT_NAME
        or inputs[0].get("data_type") != "TYPE_UINT8"
    ):
        raise ConfigError(f"{name}: expected one TYPE_UINT8 input named {contract.INPUT_NAME}")
    if not any(o.get("name") == contract.OUTPUT_NAME and o.get("data_type") == "TYPE_FP32" for o in outputs):
        raise ConfigError(f"{name}: expected a TYPE_FP32 output named {contract.OUTPUT_NAME}")
    try:
        size = int(params.get(contract.PARAM_INPUT_SIZE, str(contract.IMAGE_SIZE)))
        pre = Preprocessing(
            crop_pct=float(params.get(contract.PARAM_CROP_PCT, "0.875")),
            interpolation=params.get(contract.PARAM_INTERPOLATION, "bicubic"),
            input_size=size,
        )
    except ValueError as exc:
        raise ConfigError(f"{name}: bad preprocessing parameters: {exc}") from exc
    if _dims(inputs[0]) != [size, size, 3]:
        raise ConfigError(f"{name}: input dims {_dims(inputs[0])} are not [{size}, {size}, 3]")
    members = tuple(m.strip() for m in params.get(contract.PARAM_MEMBERS, "").split(",") if m.strip())
    try:
        coefficients = tuple(
            float(w) for w in params.get(contract.PARAM_MEMBER_WEIGHTS, "").split(",") if w.strip()
        )
    except ValueError as exc:
        raise ConfigError(f"{name}: bad {contract.PARAM_MEMBER_WEIGHTS}") from exc
    if members and coefficients and len(coefficients) != len(members):
        raise ConfigError(
            f"{name}: {len(members)} members but {len(coefficients)} {contract.PARAM_MEMBER_WEIGHTS}"
        )
    if members and not coefficients:
        coefficients = tuple(1.0 / len(members) for _ in members)
    return ModelInfo(
        name=name,
        preprocessing=pre,
        provenance=params.get(contract.PARAM_WEIGHTS, contract.UNKNOWN_WEIGHTS) or contract.UNKNOWN_WEIGHTS,
        checkpoint_sha256=params.get(contract.PARAM_WEIGHTS_SHA256, ""),
        max_batch_size=int(config.get("max_batch_size", 0) or 0),
        members=members,
        member_weights=coefficients,
    )
