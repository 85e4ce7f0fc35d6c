"""Session fixtures shared by every test folder: the repository root and one real
tritonserver (from the nvidia-pytriton wheel) serving the exported CPU repository."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from embedded.tritonserver import TritonServer

ROOT = Path(__file__).resolve().parents[1]
CPU_REPOSITORY = ROOT / "build" / "model_repository_cpu"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def cpu_repository() -> Path:
    if not (CPU_REPOSITORY / "inception_v4" / "config.pbtxt").is_file():
        pytest.fail(f"no CPU repository at {CPU_REPOSITORY}: run `make repository` (make test does)")
    return CPU_REPOSITORY


@pytest.fixture(scope="session")
def triton(cpu_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    server = TritonServer(cpu_repository, log_path=log)
    server.start()
    try:
        server.wait_ready(timeout=600)
        yield server
    finally:
        server.stop()
