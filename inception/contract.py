"""The contract between the model repository, Triton and the gateway, in one place.

Tensor names, shapes, the class count, the config parameter keys and the provenance
vocabulary are read by the exporter, the repository writer, the launcher and the gateway
alike. This module imports nothing heavy (no torch), so the gateway can import it.
"""

from __future__ import annotations

# The pytorch_libtorch backend maps tensors to the module's arguments by the
# `<name>__<index>` naming convention, so these names are what make the positional
# TorchScript signature work; both config variants and the ensemble use the same ones.
INPUT_NAME = "image__0"
OUTPUT_NAME = "probabilities__0"
# The paper's input size, and what a config that states no `input_size` is taken to mean.
# Each network's own size is its spec's `input_size` (registry.py), written into its config.
IMAGE_SIZE = 299
NUM_CLASSES = 1000
LABELS_FILE = "labels.txt"

# The networks, in the order the ensemble lists its members: the one list every side
# follows. `registry.MODELS` refuses to import unless it has a spec for each of them (and
# none besides); the gateway's default models, the exporter's default and the evaluation
# derive from it; tests hold the lists in deploy/ to it (tests/deploy/test_deploy_networks.py).
NETWORKS = ("inception_v4", "inception_resnet_v1", "inception_resnet_v2")
ENSEMBLE_NAME = "inception_ensemble"
ENSEMBLE_MEAN_NAME = "inception_ensemble_mean"
# Every model of the repository: the networks, the ensemble's mean step and the ensemble.
REPOSITORY_MODELS = (*NETWORKS, ENSEMBLE_MEAN_NAME, ENSEMBLE_NAME)

# Config variants, selected by tritonserver's --model-config-name (configs/<variant>.pbtxt).
GPU_VARIANT = "gpu"
CPU_VARIANT = "cpu"
VARIANTS = (GPU_VARIANT, CPU_VARIANT)
MODEL_FILE = "model.pt"

# Keys of config.pbtxt `parameters` that the gateway reads.
PARAM_CROP_PCT = "crop_pct"
PARAM_INTERPOLATION = "interpolation"
PARAM_INPUT_SIZE = "input_size"
PARAM_WEIGHTS = "weights"
PARAM_WEIGHTS_SHA256 = "weights_sha256"
PARAM_PRECISION = "precision"
PARAM_MEMBERS = "members"
PARAM_MEMBER_WEIGHTS = "member_weights"
# What an export generates, as opposed to what the committed config states.
GENERATED_PARAMS = (PARAM_WEIGHTS, PARAM_WEIGHTS_SHA256, PARAM_PRECISION)

# Provenance: "pretrained:<source>", "random-init", or "unknown" (a config that no export
# wrote, such as the committed one).
RANDOM_INIT = "random-init"
PRETRAINED_PREFIX = "pretrained:"
UNKNOWN_WEIGHTS = "unknown"

PRECISIONS = ("fp32", "fp16")


def image_dims(input_size: int) -> tuple[int, int, int]:
    """The dims of an image input (the batch dimension aside): HWC uint8 RGB, square."""
    return (input_size, input_size, 3)


def image_input_name(index: int) -> str:
    """The ensemble's image inputs, one per distinct preprocessing of its members, in the
    order the members first use them: `image__0` (= INPUT_NAME), `image__1`, ..."""
    return f"image__{index}"


def input_parameter(input_name: str, key: str) -> str:
    """The key of one input's preprocessing parameter in a multi-input ensemble's config,
    e.g. `image__1.crop_pct`; a single-input model states the plain keys only."""
    return f"{input_name}.{key}"


def member_input_name(index: int) -> str:
    """The ensemble's mean model takes member i's probabilities as `member__i`."""
    return f"member__{index}"
