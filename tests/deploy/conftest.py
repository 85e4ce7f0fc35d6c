"""Fixtures of the deployment tests: the tools they drive (promtool, prometheus,
docker-compose, check-jsonschema) and the repository's paths.

`make test` installs every tool (Debian's prometheus and docker-compose, kubectl from the
image, check-jsonschema and kubernetes-validate from PyPI); a test skips, naming the tool,
only where one is genuinely absent, e.g. on a developer's machine that skipped the set-up.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import require_tool
from .promql_tools import DEPLOY


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
