"""Session fixtures shared by every test folder: the repository root and one real
tritonserver (from the nvidia-pytriton wheel, with the PyTorch backend built by `make
backend`) serving `model_repository/` in its CPU config variant."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedded.tritonserver import TritonServer
from inception.rollout import served_version

from .helpers import REPOSITORY, ROOT, TritonEndpoint

# Error pacing (service/policy/ledger.py) holds a client's error answers once it has had its burst
# of them: that is its point against a client that loops on refusals, and the tests that
# send hundreds of bad requests from one address (schemathesis, the overload and admission
# tests) would wait seconds for each. It is off for the suite's gateways, in process here and
# in subprocesses by GatewayProcess; tests/gateway/load/test_error_pacing.py and
# `make bench-hostile` run it on.
os.environ.setdefault("GATEWAY_ERROR_RATE_PER_S", "0")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def repository() -> Path:
    """The exported repository: `make repository` (which `make test` runs) writes the
    model files and config variants the tests serve."""
    if (
        served_version(REPOSITORY / "inception_v4") is None
        or not (REPOSITORY / "inception_v4" / "configs" / "cpu.pbtxt").is_file()
    ):
        pytest.fail(f"{REPOSITORY} is not exported: run `make repository` (make test does)")
    return REPOSITORY


@pytest.fixture(scope="session")
def triton(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    with TritonServer(repository, log_path=log).running(timeout=600) as server:
        yield server


@pytest.fixture(scope="session")
def gateway_triton(request: pytest.FixtureRequest) -> TritonEndpoint:
    """The Triton the shared gateways talk to."""
    external = os.environ.get("GATEWAY_TEST_TRITON")
    if external:
        return TritonEndpoint(grpc_url=external)
    triton = request.getfixturevalue("triton")
    return TritonEndpoint(grpc_url=triton.grpc_url)
