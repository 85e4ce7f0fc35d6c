"""The exported TorchScript files: frozen traces equal to eager at batch 1 and the largest
batch, fp16, the in-graph preprocessing, the ensemble mean, re-runs that skip work, and
the fingerprint's sources, found from each network's spec."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
from pathlib import Path

import pytest
import torch

import inception
from inception import create_model, get_spec, list_models
from inception.contract import NETWORKS
from inception.export import (
    ensemble_entry,
    example_images,
    export_mean,
    main,
    network_entry,
    network_sources,
    package_imports,
    quiet_torchscript,
    source_digest,
)
from inception.registry import MODELS
from inception.repository import MAX_BATCH_SIZE, repository_files
from inception.rollout import Rollout, served_model_file
from inception.serving import ServingModel, WeightedMean

PRODUCTION = Path(__file__).resolve().parents[2] / "model_repository"
PACKAGE = Path(inception.__file__).resolve().parent


def load(path: Path) -> torch.jit.ScriptModule:
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make repository` (make test does)")
    with quiet_torchscript():
        return torch.jit.load(str(path)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_exported_file_equals_eager(name: str) -> None:
    """The served file, loaded back, against eager on images it was not traced or checked on.
    Batch 1 and 3 show the batch is free (a trace has no branch on it); the export itself
    checked the frozen trace at the largest batch (`test_the_trace_check_reaches_the_largest_batch`),
    which costs a minute a network here."""
    traced = load(served_model_file(PRODUCTION, name))
    eager = ServingModel(create_model(name)).eval()
    with torch.no_grad():
        for batch in (1, 3):
            images = example_images(batch, seed=batch + 7)
            got, expected = traced(images), eager(images)
            assert got.shape == (batch, 1000) and got.dtype == torch.float32
            assert float((got - expected).abs().max()) <= 1e-5
            assert torch.allclose(got.sum(1), torch.ones(batch), atol=1e-5)


def test_in_graph_preprocessing_is_inception_normalisation() -> None:
    network = create_model("inception_resnet_v1")
    images = example_images(2)
    x = images.permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        expected = torch.softmax(network((x - 0.5) / 0.5), dim=1)
        got = ServingModel(network)(images)
    assert float((got - expected).abs().max()) <= 1e-6


def test_ensemble_mean_file_is_the_weighted_mean() -> None:
    mean = load(served_model_file(PRODUCTION, "inception_ensemble_mean"))
    members = [torch.softmax(torch.randn(4, 1000), 1) for _ in range(3)]
    assert float((mean(*members) - sum(members) / 3).abs().max()) <= 1e-6
    weighted = WeightedMean([1.0, 3.0])
    got = weighted(members[0], members[1])
    assert float((got - (0.25 * members[0] + 0.75 * members[1])).abs().max()) <= 1e-6
    with pytest.raises(ValueError):
        WeightedMean([0.0, 0.0])


@pytest.mark.parametrize("name", list_models())
def test_exported_file_is_frozen(name: str) -> None:
    """Frozen: no parameters left, batch norms folded into the convolutions."""
    module = load(served_model_file(PRODUCTION, name))
    assert list(module.parameters()) == []
    nodes = {node.kind() for node in module.inlined_graph.nodes()}
    assert "aten::batch_norm" not in nodes
    assert nodes & {"aten::_convolution", "aten::conv2d"}


class _Checked(Exception):
    """Stops an export once its check batches are known."""


def test_the_trace_check_reaches_the_largest_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """By default the frozen trace is checked against eager at batch 1 and at the largest
    batch Triton sends; `--check-batch` lowers the second (tests of what surrounds an
    export), within 1 and that largest batch."""
    import inception.export as exporter

    seen: list[list[int]] = []

    def record(module: torch.nn.Module, examples: list[tuple[torch.Tensor, ...]], precision: str = "fp32"):
        seen.append([int(example[0].shape[0]) for example in examples])
        raise _Checked

    monkeypatch.setattr(exporter, "trace_and_check", record)
    base = ["--models", "inception_resnet_v1", "--no-ensemble", "--repository", str(tmp_path / "repo")]
    for extra in ([], ["--check-batch", "2"]):
        with pytest.raises(_Checked):
            main([*base, *extra])
    assert seen == [[1, MAX_BATCH_SIZE], [1, 2]]
    for bad in ("0", str(MAX_BATCH_SIZE + 1)):
        assert main([*base, "--check-batch", bad]) == 2
        assert "--check-batch must be within 1 and" in capsys.readouterr().err


def test_rerun_with_unchanged_inputs_skips(capsys: pytest.CaptureFixture[str]) -> None:
    mtimes = {p: p.stat().st_mtime_ns for p in PRODUCTION.glob("*/*/*") if p.is_file()}
    code = main(["--repository", str(PRODUCTION)])
    out = capsys.readouterr().out
    assert code == 0
    for name in list_models():
        assert f"{name}: up to date (random-init), skipped" in out
    assert "inception_ensemble_mean: up to date, skipped" in out
    # Nothing was rewritten, so Triton's poller sees no newer file.
    assert {p: p.stat().st_mtime_ns for p in PRODUCTION.glob("*/*/*") if p.is_file()} == mtimes


def test_fp16_export_runs_in_half_precision_with_float32_output() -> None:
    from inception.export import trace_and_check

    module = ServingModel(create_model("inception_resnet_v1")).eval()
    half = trace_and_check(module, [(example_images(1),), (example_images(2, seed=3),)], "fp16")
    images = example_images(2, seed=9)
    with torch.no_grad():
        got, expected = half(images), module(images)
    assert got.dtype == torch.float32 and got.shape == (2, 1000)
    assert torch.isfinite(got).all()
    assert float((got - expected).abs().max()) <= 1e-2
    constants = [n.output().toIValue() for n in half.graph.findAllNodes("prim::Constant")]
    dtypes = {c.dtype for c in constants if isinstance(c, torch.Tensor) and c.dim() > 1}
    assert dtypes == {torch.float16}


def test_bad_options_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--models", "inception_v3", "--repository", str(tmp_path)]) == 2
    assert f"known models: {', '.join(NETWORKS)}" in capsys.readouterr().err
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    code = main(
        [
            "--models",
            "inception_v4",
            "--checkpoint",
            f"inception_v4={bad}",
            "--no-ensemble",
            "--repository",
            str(tmp_path / "prod"),
        ]
    )
    assert code == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def _builder_file(name: str) -> Path:
    return Path(inspect.getsourcefile(get_spec(name).builder) or "").resolve()


@pytest.mark.parametrize("name", NETWORKS)
def test_fingerprint_reads_the_networks_own_file_and_what_every_export_shares(name: str) -> None:
    sources = set(network_sources(get_spec(name)).values())
    shared = {PACKAGE / f for f in ("__init__.py", "contract.py", "export.py", "registry.py", "serving.py")}
    assert {_builder_file(name), PACKAGE / "layers.py", PACKAGE / "weights.py", *shared} <= sources
    others = {_builder_file(other) for other in NETWORKS if other != name}
    assert not sources & others, "another network's file would re-export this one when edited"
    mean = set(network_sources(None).values())
    assert shared <= mean and not mean & {_builder_file(n) for n in NETWORKS}


def test_imports_inside_functions_count() -> None:
    """create_model imports the weights module only when called: still a source."""
    imports = package_imports("inception", PACKAGE / "__init__.py")
    assert {"inception.weights", "inception.registry"} <= imports


def test_editing_a_network_reexports_that_network_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A network's file (here one outside the package, as nothing lists it by hand) and
    the helper module it imports are in its fingerprint and in no other network's."""
    (tmp_path / "fingerprinted_blocks.py").write_text("WIDTH = 8\n")
    module = tmp_path / "fingerprinted_net.py"
    module.write_text(
        "from fingerprinted_blocks import WIDTH\n"
        "from inception.layers import ClassifierHead\n\n\n"
        "class Net(ClassifierHead):\n"
        "    def __init__(self, num_classes: int = 1000) -> None:\n"
        "        super().__init__(WIDTH, num_classes, 0.0)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = dataclasses.replace(
        get_spec("inception_resnet_v1"),
        name="fingerprinted_net",
        builder=importlib.import_module(module.stem).Net,
    )
    assert (
        module in network_sources(spec).values() and PACKAGE / "layers.py" in network_sources(spec).values()
    )
    before = {name: source_digest(s) for name, s in MODELS.items()}
    digest = source_digest(spec)
    module.write_text(module.read_text() + "# edited\n")
    assert source_digest(spec) != digest
    assert {name: source_digest(s) for name, s in MODELS.items()} == before


def test_an_export_into_hard_linked_copies_leaves_the_originals_alone(tmp_path: Path) -> None:
    """A folder seeded with hard links to another export (so an unchanged model costs
    nothing) gets a new version where the export runs again, and keeps the linked one as
    the version before it: nothing is written through the links."""
    seed, copy = (tmp_path / side / "inception_ensemble_mean" / "1" for side in ("seed", "copy"))
    seed.mkdir(parents=True)
    copy.mkdir(parents=True)
    (seed / "model.pt").write_bytes(b"another export")
    (seed / ".export.json").write_text('{"fingerprint": "another", "weights": "none"}')
    for item in ("model.pt", ".export.json"):
        os.link(seed / item, copy / item)
    ensemble = ensemble_entry([network_entry(get_spec(n)) for n in NETWORKS])
    with Rollout(tmp_path / "copy", log=lambda message: None) as rollout:
        export_mean(ensemble, rollout, log=lambda message: None)
        rollout.publish_all(repository_files([], ensemble))
    assert (seed / "model.pt").read_bytes() == b"another export"
    assert (seed / ".export.json").read_text() == '{"fingerprint": "another", "weights": "none"}'
    assert (copy / "model.pt").read_bytes() == b"another export"  # kept as the previous version
    new = copy.parent / "2"
    assert json.loads((new / ".export.json").read_text())["fingerprint"] != "another"
    assert served_model_file(tmp_path / "copy", "inception_ensemble_mean") == new / "model.pt"


def _archive_entries(path: Path) -> dict[str, bytes]:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        # PyTorch writes a random id into every archive it saves; everything else must match.
        return {n: archive.read(n) for n in archive.namelist() if not n.endswith(".data/serialization_id")}


_TRACE_IN_A_FRESH_PROCESS = """
import sys, torch
from inception import create_model
from inception.export import example_images, quiet_torchscript, trace_and_check
from inception.serving import ServingModel
traced = trace_and_check(ServingModel(create_model("inception_resnet_v1")), [(example_images(1),)])
with quiet_torchscript():
    torch.jit.save(traced, sys.argv[1])
"""


@pytest.mark.slow
def test_same_inputs_give_the_same_file(tmp_path: Path) -> None:
    """Each export runs in a process of its own, as `python -m inception.export` does
    (TorchScript numbers the classes it traces per process)."""
    import subprocess
    import sys

    paths = []
    for i in range(2):
        path = tmp_path / str(i) / "model.pt"
        path.parent.mkdir()
        subprocess.run(
            [sys.executable, "-c", _TRACE_IN_A_FRESH_PROCESS, str(path)], check=True, cwd=PRODUCTION.parent
        )
        paths.append(path)
    first, second = (_archive_entries(p) for p in paths)
    assert first.keys() == second.keys()
    assert [n for n in first if first[n] != second[n]] == []
