"""A model's config as the gateway needs it: read from Triton, checked against the contract
(docs/architecture.md), and reduced to preprocessing, provenance and ensemble members."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from inception import contract

from .model_inputs import Preprocessing


class ConfigError(ValueError):
    """A model config that breaks the contract of docs/architecture.md (names, types, dims, parameters)."""


@dataclass(frozen=True)
class ModelInfo:
    """What the gateway needs to know of one routable model, read from its config."""

    name: str
    preprocessing: Preprocessing  # of the first (for a network, the only) image input
    provenance: str  # "pretrained:<source>", "random-init" or "unknown"
    checkpoint_sha256: str = ""
    max_batch_size: int = 0
    members: tuple[str, ...] = ()
    member_weights: tuple[float, ...] = ()  # the ensemble's coefficients
    #: Every image input with its preprocessing; one per distinct preprocessing of an
    #: ensemble's members (docs/architecture.md). Empty means `image__0` alone.
    image_inputs: tuple[tuple[str, Preprocessing], ...] = ()

    @property
    def inputs(self) -> tuple[tuple[str, Preprocessing], ...]:
        return self.image_inputs or ((contract.INPUT_NAME, self.preprocessing),)

    @property
    def preprocessings(self) -> list[Preprocessing]:
        return [pre for _, pre in self.inputs]

    @property
    def is_ensemble(self) -> bool:
        return bool(self.members)

    @property
    def random_init(self) -> bool:
        return self.provenance == contract.RANDOM_INIT


def _dims(tensor: Mapping[str, Any]) -> list[int]:
    return [int(d) for d in tensor.get("dims", [])]


def _preprocessing(name: str, params: Mapping[str, str], prefix: str = "") -> Preprocessing:
    try:
        return Preprocessing(
            crop_pct=float(params.get(prefix + contract.PARAM_CROP_PCT, "0.875")),
            interpolation=params.get(prefix + contract.PARAM_INTERPOLATION, "bicubic"),
            input_size=int(params.get(prefix + contract.PARAM_INPUT_SIZE, str(contract.IMAGE_SIZE))),
        )
    except ValueError as exc:
        raise ConfigError(f"{name}: bad preprocessing parameters: {exc}") from exc


def _image_inputs(
    name: str, inputs: list[Mapping[str, Any]], params: Mapping[str, str]
) -> list[tuple[str, Preprocessing]]:
    """The image inputs and their preprocessing: one input `image__0` with the plain keys,
    or (an ensemble whose members crop differently) `image__0`, `image__1`, ... each with
    its own `image__<i>.crop_pct`, `.interpolation`, `.input_size`."""
    if not inputs or any(i.get("data_type") != "TYPE_UINT8" for i in inputs):
        raise ConfigError(f"{name}: expected TYPE_UINT8 image inputs named {contract.INPUT_NAME}, ...")
    names = [str(i.get("name")) for i in inputs]
    if names != [contract.image_input_name(k) for k in range(len(names))]:
        raise ConfigError(
            f"{name}: expected inputs {contract.INPUT_NAME}, image__1, ... in order, got {names}"
        )
    if len(inputs) == 1:
        result = [(names[0], _preprocessing(name, params))]
    else:
        missing = [n for n in names if contract.input_parameter(n, contract.PARAM_CROP_PCT) not in params]
        if missing:
            raise ConfigError(f"{name}: no preprocessing parameters for inputs {missing}")
        result = [(n, _preprocessing(name, params, contract.input_parameter(n, ""))) for n in names]
    for tensor, (input_name, pre) in zip(inputs, result, strict=True):
        size = pre.input_size
        if _dims(tensor) != [size, size, 3]:
            raise ConfigError(f"{name}: {input_name} dims {_dims(tensor)} are not [{size}, {size}, 3]")
    return result


def parse_model_config(config: Mapping[str, Any]) -> ModelInfo:
    """Check a config (Triton's JSON form) against the contract and extract what we use."""
    if "config" in config and isinstance(config["config"], Mapping):
        config = config["config"]
    name = str(config.get("name", ""))
    params = {k: str(v.get("string_value", "")) for k, v in (config.get("parameters") or {}).items()}
    inputs, outputs = list(config.get("input", [])), list(config.get("output", []))
    image_inputs = _image_inputs(name, inputs, params)
    if not any(o.get("name") == contract.OUTPUT_NAME and o.get("data_type") == "TYPE_FP32" for o in outputs):
        raise ConfigError(f"{name}: expected a TYPE_FP32 output named {contract.OUTPUT_NAME}")
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
        preprocessing=image_inputs[0][1],
        provenance=params.get(contract.PARAM_WEIGHTS, contract.UNKNOWN_WEIGHTS) or contract.UNKNOWN_WEIGHTS,
        checkpoint_sha256=params.get(contract.PARAM_WEIGHTS_SHA256, ""),
        max_batch_size=int(config.get("max_batch_size", 0) or 0),
        members=members,
        member_weights=coefficients,
        image_inputs=tuple(image_inputs) if len(image_inputs) > 1 else (),
    )
