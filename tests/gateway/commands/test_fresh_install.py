"""The gateway installed alone, from its extra, in a fresh virtual environment: no torch,
and it still serves (health, and one classification against the shared Triton).

Slow (pip resolves and installs the gateway's dependencies); one test on purpose.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from ...helpers import ROOT, TritonEndpoint
from ..helpers import classify, photo, running_gateway

pytestmark = pytest.mark.integration


def _copy_project(dest: Path) -> Path:
    """The files a build of the distribution reads, and nothing of this checkout's state
    (no .venv, no build/), so that the install proves the package stands alone."""
    dest.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", dest)
    readme = ROOT / "README.md"
    if readme.is_file():
        shutil.copy2(readme, dest)
    else:
        (dest / "README.md").write_text("placeholder\n")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pt")
    for package in ("service", "inception"):
        shutil.copytree(ROOT / package, dest / package, ignore=ignore)
    return dest


def test_gateway_extra_installs_without_torch_and_serves(
    gateway_triton: TritonEndpoint, tmp_path: Path
) -> None:
    project = _copy_project(tmp_path / "project")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            f"{project}[gateway]",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    check = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util, sys\n"
            "assert importlib.util.find_spec('torch') is None, 'torch is installed'\n"
            "from service.app import create_app\n"
            "create_app()\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            # The contract is the one module of the exporter's package the gateway shares.
            "shared = {m for m in sys.modules if m.startswith('inception')}\n"
            "assert shared <= {'inception', 'inception.contract'}, shared\n"
            "import service; print(service.__file__)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the checkout: the installed package must be the one imported
        timeout=120,
    )
    assert check.returncode == 0, check.stderr[-3000:]
    assert str(env_dir) in check.stdout and str(ROOT) not in check.stdout

    with (
        running_gateway(
            gateway_triton.grpc_url, tmp_path / "gateway.log", python=str(python), cwd=tmp_path
        ) as gateway,
        gateway.client() as client,
    ):
        assert client.get("/healthz").json() == {"status": "ok"}
        page = client.get("/")  # the page's files ship in the wheel, not only in the checkout
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert client.get("/static/page.js").status_code == 200
        answer = classify(client, photo("chelsea.png").read_bytes(), "image/png", model="inception_resnet_v1")
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["predictions"]) == 5
    assert sys.executable != str(python)
