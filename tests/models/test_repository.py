"""One repository, one backend: the committed configs are what the writer writes, the two
variants differ only in instance kind and warm-up, and every model runs on
`pytorch_libtorch`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from inception.contract import (
    ENSEMBLE_MEAN_NAME,
    ENSEMBLE_NAME,
    GENERATED_PARAMS,
    NETWORKS,
    REPOSITORY_MODELS,
    image_dims,
)
from inception.export import network_entry
from inception.registry import get_spec
from inception.repository import (
    GPU_WARMUP_BATCH_SIZES,
    MAX_BATCH_SIZE,
    EnsembleEntry,
    Export,
    NetworkEntry,
    ensemble_config,
    mean_config,
    network_config,
    parse,
    render,
)

from ..helpers import ROOT

ALL = list(REPOSITORY_MODELS)
#: The export's default: every network, weighted equally.
EQUAL = round(1 / len(NETWORKS), 6)


def read(path: Path) -> mc.ModelConfig:
    return parse(path.read_text())


@pytest.fixture(scope="module")
def configs(repository: Path) -> dict[str, dict[str, mc.ModelConfig]]:
    """Per model: the committed config and the two generated variants."""
    return {
        name: {
            "committed": read(repository / name / "config.pbtxt"),
            "gpu": read(repository / name / "configs" / "gpu.pbtxt"),
            "cpu": read(repository / name / "configs" / "cpu.pbtxt"),
        }
        for name in ALL
    }


def without(config: mc.ModelConfig, *fields: str, params: tuple[str, ...] = ()) -> mc.ModelConfig:
    copy = mc.ModelConfig()
    copy.CopyFrom(config)
    for field in fields:
        copy.ClearField(field)
    for key in params:
        copy.parameters.pop(key, None)
    return copy


def default_entries() -> tuple[list[NetworkEntry], EnsembleEntry]:
    networks = [network_entry(get_spec(n)) for n in NETWORKS]
    return networks, EnsembleEntry(tuple(networks), (EQUAL,) * len(networks))


@pytest.mark.parametrize("name", ALL)
def test_variants_differ_only_in_instance_kind_and_warmup(configs, name: str) -> None:
    gpu, cpu = configs[name]["gpu"], configs[name]["cpu"]
    assert without(gpu, "instance_group", "model_warmup") == without(cpu, "instance_group", "model_warmup")
    assert [g.count for g in gpu.instance_group] == [g.count for g in cpu.instance_group]


@pytest.mark.parametrize("name", ALL)
def test_committed_config_is_the_gpu_variant_without_export_facts(configs, name: str) -> None:
    committed, gpu = configs[name]["committed"], configs[name]["gpu"]
    assert committed == without(gpu, params=GENERATED_PARAMS)
    assert not set(GENERATED_PARAMS) & set(committed.parameters)


def test_committed_configs_are_what_the_writer_writes(repository: Path) -> None:
    """No hand edits and no drift: every export rewrites config.pbtxt with the writer's
    text, and git must see no change (commit the configs after changing the writer)."""
    networks, ensemble = default_entries()
    expected = {n.name: network_config(n, None) for n in networks}
    expected[ENSEMBLE_MEAN_NAME] = mean_config(ensemble, None)
    expected[ENSEMBLE_NAME] = ensemble_config(ensemble, None)
    for name, config in expected.items():
        assert (repository / name / "config.pbtxt").read_text() == render(config), name
    diff = subprocess.run(
        ["git", "diff", "--stat", "HEAD", "--", "model_repository"], cwd=ROOT, capture_output=True, text=True
    )
    assert diff.returncode == 0 and diff.stdout == "", diff.stdout


def test_render_is_what_triton_parses() -> None:
    networks, ensemble = default_entries()
    for config in (network_config(networks[0], "gpu"), ensemble_config(ensemble, "cpu")):
        assert parse(render(config)) == config


@pytest.mark.parametrize("name", NETWORKS)
def test_network_configs(configs, name: str) -> None:
    gpu, cpu = configs[name]["gpu"], configs[name]["cpu"]
    assert gpu.platform == cpu.platform == "pytorch_libtorch"
    assert gpu.max_batch_size == MAX_BATCH_SIZE
    assert [g.kind for g in gpu.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert [g.kind for g in cpu.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    spec = get_spec(name)
    (image,) = gpu.input
    dims = list(image_dims(spec.input_size))
    assert (image.name, image.data_type, list(image.dims)) == ("image__0", mc.TYPE_UINT8, dims)
    (probs,) = gpu.output
    assert (probs.name, probs.data_type, list(probs.dims)) == ("probabilities__0", mc.TYPE_FP32, [1000])
    assert probs.label_filename == "labels.txt"
    assert gpu.dynamic_batching.preferred_batch_size
    for variant in (gpu, cpu):  # Triton drops what has expired in its queue, GPU and CPU alike
        policy = variant.dynamic_batching.default_queue_policy
        assert policy.max_queue_size
        assert policy.timeout_action == mc.ModelQueuePolicy.REJECT
        assert policy.allow_timeout_override and policy.default_timeout_microseconds > 0
    # TorchScript optimises a shape after running it twice: warm each one more than that.
    assert [w.batch_size for w in gpu.model_warmup] == list(GPU_WARMUP_BATCH_SIZES)
    assert [w.batch_size for w in cpu.model_warmup] == [1]
    assert all(w.count >= 3 for w in [*gpu.model_warmup, *cpu.model_warmup])
    assert all(list(w.inputs["image__0"].dims) == dims for w in [*gpu.model_warmup, *cpu.model_warmup])
    params = {k: v.string_value for k, v in gpu.parameters.items()}
    assert params["interpolation"] == spec.interpolation and params["input_size"] == str(spec.input_size)
    assert float(params["crop_pct"]) == spec.crop_pct
    assert params["weights"] == "random-init" or params["weights"].startswith("pretrained:")
    assert (params["weights_sha256"] == "") == (params["weights"] == "random-init")
    assert params["precision"] in ("fp32", "fp16")
    assert params["INFERENCE_MODE"] == "true"


def test_ensemble_config(configs) -> None:
    gpu = configs[ENSEMBLE_NAME]["gpu"]
    assert gpu.platform == "ensemble"
    steps = gpu.ensemble_scheduling.step
    assert [s.model_name for s in steps] == [*NETWORKS, ENSEMBLE_MEAN_NAME]
    members = steps[: len(NETWORKS)]
    assert [s.output_map["probabilities__0"] for s in members] == [
        f"member__{i}" for i in range(len(NETWORKS))
    ]
    params = {k: v.string_value for k, v in gpu.parameters.items()}
    assert params["members"] == ",".join(NETWORKS)
    assert params["member_weights"] == ",".join([f"{EQUAL:g}"] * len(NETWORKS))
    assert params["weights"] == "random-init"
    assert configs[ENSEMBLE_MEAN_NAME]["cpu"].platform == "pytorch_libtorch"


def test_mixed_ensemble_provenance_is_random() -> None:
    networks, _ = default_entries()
    pretrained = Export("pretrained:a.safetensors", "ab" * 32)
    members = (
        NetworkEntry(**{**networks[0].__dict__, "export": pretrained}),
        NetworkEntry(**{**networks[1].__dict__, "export": Export("random-init")}),
    )
    assert EnsembleEntry(members, (0.5, 0.5)).export == Export("random-init", "", "fp32")
    both = (members[0], NetworkEntry(**{**networks[1].__dict__, "export": pretrained}))
    export = EnsembleEntry(both, (0.5, 0.5)).export
    assert export is not None
    assert export.provenance == "pretrained:inception_v4=a.safetensors,inception_resnet_v1=a.safetensors"


def test_labels(repository: Path) -> None:
    labels = (ROOT / "inception" / "data" / "imagenet_labels.txt").read_text().splitlines()
    assert len(labels) == 1000
    assert labels[0] == "tench, Tinca tinca" and labels[999].startswith("toilet tissue")
    for name in ALL:
        assert (repository / name / "labels.txt").read_text().splitlines() == labels


def test_generated_files_stay_out_of_git() -> None:
    git = ["git", "ls-files", "model_repository"]
    tracked = subprocess.run(git, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert tracked.split() == [f"model_repository/{n}/config.pbtxt" for n in sorted(ALL)]
    generated = [
        "model_repository/inception_v4/configs/gpu.pbtxt", "model_repository/inception_v4/1/model.pt",
        "model_repository/inception_v4/12/.export.json", "model_repository/inception_v4/labels.txt",
        ".model_repository.rollout/lock", ".model_repository.rollout/staging/inception_v4/3/model.pt",
    ]  # fmt: skip
    ignored = subprocess.run(["git", "check-ignore", *generated], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == generated, ignored


def test_ensemble_takes_one_input_per_distinct_preprocessing(configs) -> None:
    """Inception-ResNet-v2 crops at 0.8975, the others at 0.875: the ensemble takes two
    images, says in its parameters which is which, and feeds each member its own."""
    committed = configs[ENSEMBLE_NAME]["committed"]
    params = {k: v.string_value for k, v in committed.parameters.items()}
    dims = {i.name: list(i.dims) for i in committed.input}
    fed = {s.model_name: s.input_map["image__0"] for s in committed.ensemble_scheduling.step[: len(NETWORKS)]}
    for network in NETWORKS:
        spec, image = get_spec(network), fed[network]
        assert float(params[f"{image}.crop_pct"]) == spec.crop_pct, network
        assert params[f"{image}.interpolation"] == spec.interpolation, network
        assert int(params[f"{image}.input_size"]) == spec.input_size, network
        assert dims[image] == list(image_dims(spec.input_size)), network
    distinct = {(s.crop_pct, s.interpolation, s.input_size) for s in map(get_spec, NETWORKS)}
    assert list(dims) == [f"image__{i}" for i in range(len(distinct))]
    assert {n: fed[n] for n in ("inception_v4", "inception_resnet_v1", "inception_resnet_v2")} == {
        "inception_v4": "image__0",
        "inception_resnet_v1": "image__0",
        "inception_resnet_v2": "image__1",
    }
    assert params["crop_pct"] == params["image__0.crop_pct"] == "0.875"  # the plain keys are image__0's
    # Members that all crop alike keep the one input `image__0` and the plain keys alone.
    networks, _ = default_entries()
    alike = ensemble_config(EnsembleEntry((networks[0], networks[1]), (0.5, 0.5)), None)
    assert [i.name for i in alike.input] == ["image__0"]
    assert not any("." in key for key in alike.parameters)


def test_a_network_of_another_size_gets_its_own_dims() -> None:
    """Dims follow each network's input_size: its input and warm-up, and in an ensemble
    an input of its own, described by its own parameters."""
    networks, _ = default_entries()
    small = NetworkEntry("small_net", crop_pct=0.875, interpolation="bicubic", input_size=64)
    for variant in (None, "gpu", "cpu"):
        config = network_config(small, variant)
        assert [list(i.dims) for i in config.input] == [[64, 64, 3]]
        assert all(list(w.inputs["image__0"].dims) == [64, 64, 3] for w in config.model_warmup)
        assert config.parameters["input_size"].string_value == "64"
    # Same crop and interpolation as inception_v4, another size: an input of its own.
    ensemble = ensemble_config(EnsembleEntry((networks[0], small), (0.5, 0.5)), None)
    assert [(i.name, list(i.dims)) for i in ensemble.input] == [
        ("image__0", list(image_dims(networks[0].input_size))),
        ("image__1", [64, 64, 3]),
    ]
    assert [s.input_map["image__0"] for s in ensemble.ensemble_scheduling.step[:2]] == [
        "image__0",
        "image__1",
    ]
    assert ensemble.parameters["image__1.input_size"].string_value == "64"
