"""Helpers of the deployment tests: finding the tools they drive, and a real Prometheus."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
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


#: The runbook base URL the tests give Prometheus (RUNBOOK_BASE_URL in compose).
RUNBOOK_BASE_URL = "https://runbooks.example.com/inception-serving/README.md"


@contextlib.contextmanager
def running_prometheus(
    prometheus_bin: str,
    work: Path,
    config: dict[str, Any],
    *,
    scrape_self: bool = False,
    extra_args: Sequence[str] = (),
) -> Iterator[str]:
    """A real Prometheus on a free port with this configuration (written under `work`),
    ready; its URL. Stopped on exit. As compose runs it, it expands environment variables in
    its external labels, with RUNBOOK_BASE_URL set; `scrape_self` adds a job scraping it;
    `extra_args` go on its command line."""
    port = free_port()
    if scrape_self:
        config = {**config, "scrape_configs": [
            *config.get("scrape_configs", []),
            {"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]},
        ]}  # fmt: skip
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    command = [
        prometheus_bin,
        f"--config.file={work / 'prometheus.yml'}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--enable-feature=expand-external-labels",
        *extra_args,
    ]
    env = {**os.environ, "RUNBOOK_BASE_URL": RUNBOOK_BASE_URL}
    with running(command, f"http://127.0.0.1:{port}/-/ready", 60, log_path=work / "prometheus.log", env=env):
        yield f"http://127.0.0.1:{port}"
