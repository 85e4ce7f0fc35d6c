"""Helpers of the deployment tests: finding the tools they drive, and a real Prometheus."""

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
