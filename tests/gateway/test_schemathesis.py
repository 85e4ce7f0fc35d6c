"""The API against its own OpenAPI: the schemathesis CLI, a real client, over HTTP to a
real gateway and Triton, with every check it has (`--checks all`): no 5xx, statuses,
content types, headers and bodies as documented, valid data accepted and invalid data
refused. `schemathesis_hooks.py` says what the schema cannot (images, the weights rule).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT, GatewayProcess

pytestmark = pytest.mark.integration

EXAMPLES = os.environ.get("SCHEMATHESIS_EXAMPLES", "30")


def test_api_conforms_to_its_openapi(gateway: GatewayProcess, tmp_path: Path) -> None:
    schemathesis = Path(sys.executable).with_name("schemathesis")
    environment = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.gateway.schemathesis_hooks",
        "PYTHONPATH": str(ROOT),
        "NO_COLOR": "1",
    }
    run = subprocess.run(
        [
            str(schemathesis),
            "run",
            f"{gateway.url}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            EXAMPLES,
            "--seed",
            "1",
            "--workers",
            "1",
            "--request-timeout",
            "120",
            "--generation-database",
            "none",
            "--report-dir",
            str(tmp_path),
            "--no-color",
        ],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-3000:]
    assert "/v1/classify" in run.stdout
