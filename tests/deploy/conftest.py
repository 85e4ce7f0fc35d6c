"""Shared helpers of the deployment tests: the tools they drive (promtool, prometheus,
docker-compose, kubectl or kustomize, check-jsonschema) and the repository's paths.

`make test` installs every tool (Debian's prometheus and docker-compose, kubectl from the
image, check-jsonschema and kubernetes-validate from PyPI); a test skips, naming the tool,
only where one is genuinely absent, e.g. on a developer's machine that skipped the set-up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from promql_tools import DEPLOY

from embedded.processes import free_port, running

VENV_BIN = Path(sys.executable).parent


def find_tool(name: str) -> str | None:
    """A tool on PATH or beside this interpreter (console scripts of the venv)."""
    beside = VENV_BIN / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def require_tool(name: str, how: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({how}); `make test` installs it")
    return path


@pytest.fixture(scope="session")
def deploy_dir() -> Path:
    return DEPLOY


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("promtool", "Debian package prometheus")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return require_tool("prometheus", "Debian package prometheus")


@pytest.fixture(scope="session")
def docker_compose() -> str:
    return require_tool("docker-compose", "Debian package docker-compose")


@pytest.fixture(scope="session")
def check_jsonschema() -> str:
    return require_tool("check-jsonschema", "PyPI package check-jsonschema")


@pytest.fixture
def closed_hub() -> str:
    """A hub endpoint where nothing listens: what the exporter meets without network."""
    from embedded.processes import free_port

    return f"http://127.0.0.1:{free_port()}"


@contextlib.contextmanager
def running_prometheus(prometheus_bin: str, work: Path, config: dict[str, Any]) -> Iterator[str]:
    """A real Prometheus on a free port with this configuration (written under `work`),
    ready; its URL. Stopped on exit."""
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    command = [
        prometheus_bin,
        f"--config.file={work / 'prometheus.yml'}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with running(command, f"http://127.0.0.1:{port}/-/ready", 60, log_path=work / "prometheus.log"):
        yield f"http://127.0.0.1:{port}"
