"""Fixtures of the gateway tests: real uvicorn processes serving the gateway over HTTP
against a real tritonserver.

The shared Triton comes from the session fixture ``triton`` of ``tests/conftest.py``. For
quick iterations on the gateway alone, ``GATEWAY_TEST_TRITON=<grpc host:port>`` points the
tests at an already running Triton instead (the tests never stop that one).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ..helpers import ROOT, TritonEndpoint
from .helpers import MODEL, GatewayProcess, running_gateway


@pytest.fixture(scope="session")
def gateway(
    gateway_triton: TritonEndpoint, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """The shared gateway: defaults, one worker."""
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    with running_gateway(gateway_triton.grpc_url, log) as process:
        yield process


@pytest.fixture(scope="session")
def client(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with gateway.client() as http:
        yield http


@pytest.fixture
def one_model_repository(tmp_path: Path) -> Path:
    """A repository of the cheapest model alone (linked, not copied): for tests that start
    and stop their own tritonserver, which then starts in seconds."""
    source = Path(os.environ.get("GATEWAY_TEST_REPOSITORY", ROOT / "model_repository"))
    if not (source / MODEL / "configs" / "cpu.pbtxt").is_file():
        pytest.skip(f"no model repository at {source}: run `make repository`")
    repository = tmp_path / "repository"
    repository.mkdir()
    (repository / MODEL).symlink_to((source / MODEL).resolve(), target_is_directory=True)
    return repository
