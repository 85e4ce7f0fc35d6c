"""Loading timm's checkpoints (files the tests make themselves from timm's own models),
our state dicts, the hub path without network, and clear errors for what does not fit."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from inception import CheckpointError, create_model, get_spec
from inception import weights as weights_module

timm = pytest.importorskip("timm")


def _realistic_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights with default batch-norm statistics give logits near zero, where a
    relative comparison means nothing; statistics and affine terms drawn at random keep
    activations, and so the logits, at a sensible scale."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(c, generator=gen) * 0.5 + 0.5)
            module.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            module.bias.data.copy_(torch.randn(c, generator=gen) * 0.1)


@pytest.fixture(scope="module", params=["inception_v4", "inception_resnet_v2"])
def timm_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    name = request.param
    reference = timm.create_model(name, pretrained=False).eval()
    _realistic_batchnorm(reference)
    folder = tmp_path_factory.mktemp(name)
    path = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    torch.save(reference.state_dict(), folder / "pytorch_model.pth")
    return name, reference, path


def test_timm_checkpoint_gives_timm_outputs(timm_checkpoint) -> None:
    name, reference, path = timm_checkpoint
    ours = create_model(name, path)
    size = get_spec(name).input_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    scale = float(expected.abs().max())
    assert scale > 1e-2, "logits too close to zero for a meaningful comparison"
    assert float((expected - got).abs().max()) <= 1e-5 * scale
    assert ours.weights_info.provenance == "pretrained:model.safetensors"
    assert ours.weights_info.sha256 == weights_module.sha256_of(path)
    assert len(ours.weights_info.sha256) == 64


def test_pth_and_our_own_state_dict_load(timm_checkpoint, tmp_path: Path) -> None:
    name, _, path = timm_checkpoint
    from_pth = create_model(name, path.with_name("pytorch_model.pth"))
    own = tmp_path / "ours.pt"
    torch.save({"state_dict": from_pth.state_dict()}, own)
    reloaded = create_model(name, own)
    for key, value in from_pth.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key


def test_truncated_checkpoint_is_a_clear_error(timm_checkpoint, tmp_path: Path) -> None:
    name, _, path = timm_checkpoint
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*truncated\.safetensors"):
        create_model(name, truncated)
    with pytest.raises(CheckpointError, match="does not exist"):
        create_model(name, tmp_path / "missing.safetensors")


def test_mismatching_checkpoint_names_keys_and_shapes(tmp_path: Path) -> None:
    # Inception-ResNet-v2's checkpoint into Inception-v4: nothing fits.
    state = create_model("inception_v4").state_dict()
    state["head.fc.weight"] = torch.zeros(10, 1536)
    del state["stem.conv1.conv.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        create_model("inception_v4", path)
    message = str(err.value)
    assert "missing keys: stem.conv1.conv.weight" in message
    assert "unexpected keys: extra.weight" in message
    assert "head.fc.weight (checkpoint (10, 1536), model (1000, 1536))" in message


def test_hub_download_uses_timm_repository_without_network(monkeypatch, tmp_path: Path) -> None:
    reference = timm.create_model("inception_v4", pretrained=False).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    calls = []

    def fake_download(repo_id: str, filename: str, revision: str) -> str:  # stands in for the network only
        calls.append((repo_id, filename, revision))
        return str(path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = create_model("inception_v4", "hub")
    revision = get_spec("inception_v4").hub_revision
    assert calls == [("timm/inception_v4.tf_in1k", "model.safetensors", revision)]
    assert model.weights_info.provenance == f"pretrained:hf-hub:timm/inception_v4.tf_in1k@{revision}"
    with pytest.raises(CheckpointError, match="no public checkpoint exists for inception_resnet_v1"):
        create_model("inception_resnet_v1", "hub")
    assert get_spec("inception_resnet_v2").hub_repo == "timm/inception_resnet_v2.tf_in1k"


def test_preprocessing_matches_timm_pretrained_config() -> None:
    for name in ("inception_v4", "inception_resnet_v2"):
        cfg = timm.create_model(name, pretrained=False).pretrained_cfg
        spec = get_spec(name)
        assert cfg["crop_pct"] == spec.crop_pct
        assert cfg["interpolation"] == spec.interpolation
        assert cfg["input_size"] == (3, spec.input_size, spec.input_size)
        assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
        assert cfg["num_classes"] == spec.num_classes


def _tracked_copy(tmp_path: Path) -> Path:
    """The repository's tracked model_repository files and .gitignore, committed in a git
    repository of their own: what a fresh clone has before its first export."""
    root = Path(__file__).resolve().parents[2]
    clone = tmp_path / "clone"
    tracked = subprocess.run(
        ["git", "ls-files", "model_repository", ".gitignore"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for path in tracked:
        (clone / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / path, clone / path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(clone)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "tracked"], check=True)
    return clone


@pytest.mark.slow
def test_export_with_a_checkpoint_records_provenance_and_leaves_tracked_files_alone(tmp_path: Path) -> None:
    from inception.export import main
    from inception.repository import parse

    reference = timm.create_model("inception_v4", pretrained=False).eval()
    checkpoint = tmp_path / "inception_v4.tf_in1k.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(checkpoint))
    clone = _tracked_copy(tmp_path)
    repository = clone / "model_repository"
    args = [
        "--models",
        "inception_v4",
        "--no-ensemble",
        "--repository",
        str(repository),
        "--checkpoint",
        f"inception_v4={checkpoint}",
        "--check-batch",  # the check at the largest batch is tested in test_export.py
        "2",
    ]
    assert main(args) == 0
    for variant in ("gpu", "cpu"):
        config = parse((repository / "inception_v4" / "configs" / f"{variant}.pbtxt").read_text())
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert params["weights"] == "pretrained:inception_v4.tf_in1k.safetensors"
        assert params["weights_sha256"] == weights_module.sha256_of(checkpoint)
        assert params["precision"] == "fp32"
    # What the export generated (weights, provenance) is ignored; what is tracked is as committed.
    status = subprocess.run(
        ["git", "-C", str(clone), "status", "--porcelain"], capture_output=True, text=True, check=True
    )
    assert status.stdout == ""
    assert (repository / "inception_v4" / "1" / "model.pt").is_file()
    mtime = (repository / "inception_v4" / "1" / "model.pt").stat().st_mtime_ns
    assert main(args) == 0  # unchanged inputs: the file is kept, the provenance too
    assert (repository / "inception_v4" / "1" / "model.pt").stat().st_mtime_ns == mtime
    assert (
        "pretrained:inception_v4.tf_in1k.safetensors"
        in (repository / "inception_v4" / "configs" / "gpu.pbtxt").read_text()
    )
