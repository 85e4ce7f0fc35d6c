"""The API against its own OpenAPI: the schemathesis CLI, a real client, over HTTP to a
real gateway and Triton: no 5xx, statuses, content types, headers and bodies as
documented, valid data accepted and invalid data refused. `schemathesis_hooks.py` says
what the schema cannot (images, the rules between fields, deadlines).

Two runs. Fuzzing with every check (`--checks all`). The coverage phase (boundary values,
each enum value, missing and malformed parts) with every check but one: in schemathesis
4.32 it labels some multipart bodies "negative" whose every field is valid (scenario
`valid_object`), so `negative_data_rejection` there would flag valid requests answered
200; the fuzzing run keeps that check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ...helpers import ROOT
from ..helpers import GatewayProcess

pytestmark = pytest.mark.integration

EXAMPLES = os.environ.get("SCHEMATHESIS_EXAMPLES", "30")
RUNS = {
    "fuzzing-all-checks": ["--phases", "fuzzing", "--checks", "all"],
    "coverage": [
        "--phases",
        "examples,coverage",
        "--checks",
        "all",
        "--exclude-checks",
        "negative_data_rejection",
    ],
}


@pytest.mark.parametrize("run", list(RUNS))
def test_api_conforms_to_its_openapi(gateway: GatewayProcess, tmp_path: Path, run: str) -> None:
    schemathesis = Path(sys.executable).with_name("schemathesis")
    environment = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.gateway.schemathesis_hooks",
        "PYTHONPATH": str(ROOT),
        "NO_COLOR": "1",
    }
    result = subprocess.run(
        [
            str(schemathesis),
            "run",
            f"{gateway.url}/openapi.json",
            *RUNS[run],
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
            "--report",
            "json",
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
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-3000:]
    (report_file,) = tmp_path.glob("*.json")
    report = json.loads(report_file.read_text())
    assert report["operations"]["tested"] == report["operations"]["total"] >= 5  # classify among them
    assert report["test_cases"]["generated"] >= int(EXAMPLES)
