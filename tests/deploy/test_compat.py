"""Compose's model path: the repository exported by the torch that deploy/models.Dockerfile
pins, served through the embedded tritonserver with Triton's PyTorch backend built against
that same torch (the NGC image's libtorch is that version), answers equal to that torch's
in-process. `make compat` (part of `make test`) prepares the environment, the export and
the backend (tests/deploy/compat.py); without them the served checks skip, naming it,
while the pin checks fail whenever what was prepared is not what the Dockerfile pins."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from embedded.tritonserver import TritonServer
from inception.rollout import served_model_file

from . import compat
from .promql_tools import ROOT

SIZE = 299
BATCH = 2
NETWORKS = ("inception_v4", "inception_resnet_v1", "inception_resnet_v2")


def require_prepared() -> None:
    if not (compat.PYTHON.exists() and compat.STAMP.is_file()):
        pytest.skip("no compat environment: run `make compat` (`make test` does)")


def test_make_test_runs_compat_from_the_dockerfile_pin():
    """`make test` prepares what the Dockerfile pins (`compat-prepare`) before its suite,
    which holds this file; `make compat` is the preparation and this file alone."""
    makefile = (ROOT / "Makefile").read_text()

    def rule(name: str) -> tuple[list[str], str]:
        found = re.search(rf"^{name}:([^\n]*)\n((?:\t[^\n]*\n)*)", makefile, re.M)
        assert found, f"the Makefile has no {name} target"
        return found.group(1).split(), found.group(2)

    test_prerequisites, test_recipe = rule("test")
    assert "compat-prepare" in test_prerequisites, "make test does not prepare compat"
    assert re.search(r"-m pytest\s*$", test_recipe, re.M), "make test's suite is not the whole suite"
    _, prepare_recipe = rule("compat-prepare")
    assert "tests.deploy.compat" in prepare_recipe
    compat_prerequisites, compat_recipe = rule("compat")
    assert "compat-prepare" in compat_prerequisites and "tests/deploy/test_compat.py" in compat_recipe
    assert compat.pinned_torch() == re.search(
        r"^ARG TORCH_VERSION=(\S+)$", compat.DOCKERFILE.read_text(), re.M
    ).group(1)


def test_the_tested_torch_is_the_dockerfile_pin():
    """What the compat environment holds, and what its backend was built against, is the
    torch the models image installs: a new pin fails here until `make compat` ran again."""
    require_prepared()
    pinned = compat.pinned_torch()
    version = subprocess.run(
        [compat.PYTHON, "-c", "import torch; print(torch.__version__)"],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout.strip()  # fmt: skip
    assert version.split("+")[0] == pinned, f"compat tests torch {version}, the Dockerfile pins {pinned}"
    assert json.loads(compat.STAMP.read_text())["torch"] == pinned
    build = json.loads((compat.BACKENDS / "current" / "build.json").read_text())
    assert build["torch"].split("+")[0] == pinned, f"the compat backend was built against {build['torch']}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """The export, every model of it (strict readiness: the mean model and the ensemble
    loaded too), served with the backend built against the pinned torch."""
    require_prepared()
    log = tmp_path_factory.mktemp("compat") / "tritonserver.log"
    server = TritonServer(compat.REPOSITORY, log_path=log, backend_directory=compat.BACKENDS / "current")
    with server.running(timeout=600):
        yield server


def in_process(inputs: Path, outputs: Path) -> None:
    """Each exported file, loaded by the pinned torch in its own environment, run on the
    same batch."""
    files = {name: str(served_model_file(compat.REPOSITORY, name)) for name in NETWORKS}
    script = f"""
import numpy as np, torch
images = torch.from_numpy(np.load({str(inputs)!r}))
out = {{}}
with torch.no_grad():
    for name, path in {files!r}.items():
        module = torch.jit.load(path)
        out[name] = module(images).numpy()
np.savez({str(outputs)!r}, **out)
"""
    subprocess.run([compat.PYTHON, "-c", script], check=True, timeout=600)


@pytest.mark.integration
@pytest.mark.slow
def test_the_pinned_torch_s_export_serves_what_it_computes(served, tmp_path):
    import tritonclient.http as httpclient

    images = np.random.default_rng(0).integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    in_process(tmp_path / "images.npy", tmp_path / "expected.npz")
    expected = np.load(tmp_path / "expected.npz")
    client = httpclient.InferenceServerClient(served.http_url, network_timeout=300)
    for name in NETWORKS:
        tensor = httpclient.InferInput("image__0", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        got = client.infer(name, [tensor]).as_numpy("probabilities__0")
        assert got.shape == (BATCH, 1000)
        np.testing.assert_allclose(got, expected[name], atol=1e-5, rtol=0, err_msg=name)
        assert np.allclose(got.sum(axis=1), 1.0, atol=1e-4), name
