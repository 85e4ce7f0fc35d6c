"""The two flavours of the repository: production configs parse as Triton's ModelConfig
and agree with the CPU flavour in everything but platform, instance kind and warm-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc.model_config_pb2 import ModelConfig

from inception.repository import MAX_BATCH_SIZE

ROOT = Path(__file__).resolve().parents[2]
NETWORKS = ["inception_v4", "inception_resnet_v1", "inception_resnet_v2"]
ALL = [*NETWORKS, "inception_ensemble_mean", "inception_ensemble"]


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def configs(cpu_repository: Path) -> dict[str, tuple[ModelConfig, ModelConfig]]:
    return {
        name: (
            parse(ROOT / "model_repository" / name / "config.pbtxt"),
            parse(cpu_repository / name / "config.pbtxt"),
        )
        for name in ALL
    }


@pytest.mark.parametrize("name", ALL)
def test_flavours_agree(configs, name: str) -> None:
    prod, cpu = configs[name]
    assert prod.name == cpu.name == name
    assert prod.max_batch_size == cpu.max_batch_size == MAX_BATCH_SIZE
    assert list(prod.input) == list(cpu.input)
    assert list(prod.output) == list(cpu.output)
    assert prod.dynamic_batching == cpu.dynamic_batching
    shared = {k for k in prod.parameters if k not in ("INFERENCE_MODE", "DISABLE_OPTIMIZED_EXECUTION")}
    cpu_shared = {k: cpu.parameters[k] for k in shared if k in cpu.parameters}
    assert {k: prod.parameters[k] for k in shared} == cpu_shared


@pytest.mark.parametrize("name", NETWORKS)
def test_network_configs(configs, name: str) -> None:
    prod, cpu = configs[name]
    assert prod.platform == "pytorch_libtorch" and cpu.backend == "python"
    assert [g.kind for g in prod.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    assert [g.kind for g in cpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    (image,) = prod.input
    uint8, fp32 = model_config_pb2.TYPE_UINT8, model_config_pb2.TYPE_FP32
    assert (image.name, image.data_type, list(image.dims)) == ("image__0", uint8, [299, 299, 3])
    (probs,) = prod.output
    assert (probs.name, probs.data_type, list(probs.dims)) == ("probabilities__0", fp32, [1000])
    assert probs.label_filename == "labels.txt"
    assert prod.dynamic_batching.preferred_batch_size
    assert prod.dynamic_batching.default_queue_policy.max_queue_size
    assert sorted(w.batch_size for w in prod.model_warmup) == list(range(1, MAX_BATCH_SIZE + 1))
    assert {w.batch_size for w in cpu.model_warmup} >= {1}
    params = {k: v.string_value for k, v in prod.parameters.items()}
    assert params["interpolation"] == "bicubic" and params["input_size"] == "299"
    assert params["crop_pct"] == {"inception_resnet_v2": "0.8975"}.get(name, "0.875")
    assert params["weights"] == "random-init" or params["weights"].startswith("pretrained:")
    assert (params["weights_sha256"] == "") == (params["weights"] == "random-init")


def test_ensemble_config(configs) -> None:
    prod, _ = configs["inception_ensemble"]
    assert prod.platform == "ensemble"
    steps = prod.ensemble_scheduling.step
    assert [s.model_name for s in steps] == [*NETWORKS, "inception_ensemble_mean"]
    assert [s.output_map["probabilities__0"] for s in steps[:3]] == ["member__0", "member__1", "member__2"]
    params = {k: v.string_value for k, v in prod.parameters.items()}
    assert params["members"] == ",".join(NETWORKS)
    assert params["member_weights"] == "0.333333,0.333333,0.333333"
    assert params["weights"] == "random-init"


def test_labels(cpu_repository: Path) -> None:
    labels = (ROOT / "inception" / "data" / "imagenet_labels.txt").read_text().splitlines()
    assert len(labels) == 1000
    assert labels[0] == "tench, Tinca tinca" and labels[999].startswith("toilet tissue")
    for name in ALL:
        assert (cpu_repository / name / "labels.txt").read_text().splitlines() == labels


def test_generated_files_stay_out_of_git() -> None:
    import subprocess

    git = ["git", "ls-files", "model_repository"]
    tracked = subprocess.run(git, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert tracked.split() == [f"model_repository/{n}/config.pbtxt" for n in sorted(ALL)]
