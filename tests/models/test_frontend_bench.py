"""The front-end bench (bench/frontend.py) measures the gateway against a stand-in network:
the stand-in must keep the real network's contract, or the bench measures another gateway
path; and its profile summary must count what py-spy recorded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.draft import rate as draft_rate
from bench.frontend import MODEL, encoded, scene, top_costs, variant, write_repository
from inception.contract import CPU_VARIANT, PARAM_WEIGHTS, RANDOM_INIT
from inception.export import network_entry
from inception.registry import get_spec
from inception.repository import network_config, parse
from inception.rollout import served_model_file

ROOT = Path(__file__).resolve().parents[2]


def test_the_stand_in_keeps_the_networks_contract(tmp_path: Path) -> None:
    write_repository(tmp_path)
    config = parse((tmp_path / MODEL / "configs" / f"{CPU_VARIANT}.pbtxt").read_text())
    real = network_config(network_entry(get_spec(MODEL)), CPU_VARIANT)
    assert config.input == real.input and config.output == real.output
    assert config.max_batch_size == real.max_batch_size
    assert config.dynamic_batching == real.dynamic_batching
    for key in ("crop_pct", "interpolation", "input_size"):
        assert config.parameters[key] == real.parameters[key]
    assert config.parameters[PARAM_WEIGHTS].string_value == RANDOM_INIT  # the listing says so
    module = torch.jit.load(str(served_model_file(tmp_path, MODEL)))
    images = torch.randint(0, 256, (3, 299, 299, 3), dtype=torch.uint8)
    probabilities = module(images)
    assert probabilities.dtype == torch.float32 and tuple(probabilities.shape) == (3, 1000)
    np.testing.assert_allclose(probabilities.sum(dim=1).numpy(), 1.0, rtol=1e-5)


def test_the_profile_summary_counts_self_and_stage_shares() -> None:
    folded = "\n".join(
        [
            "process 1;thread (0x1);main (a.py:1);handle (service/x.py:5);resize (PIL/Image.py:9) 6",
            "process 1;thread (0x1);main (a.py:1);handle (service/x.py:5) 2",
            "process 1;thread (0x2);main (a.py:1);send (grpc/c.py:3) 2",
            "not a sample line",
        ]
    )
    costs = top_costs(folded)
    assert dict(costs["self"]) == {
        "resize (PIL/Image.py:9)": 60.0,
        "handle (service/x.py:5)": 20.0,
        "send (grpc/c.py:3)": 20.0,
    }
    assert dict(costs["stages"]) == {"handle (service/x.py:5)": 80.0}


@pytest.mark.integration
def test_a_short_run_answers_every_image(tmp_path: Path) -> None:
    """The bench end to end, briefly: a real tritonserver, a real gateway, every image
    answered (none refused, none failed) and the floor beside it."""
    out = tmp_path / "frontend.json"
    command = ["-m", "bench.frontend", "--only", "jpeg-500x375, single", "--workers", "1"]
    subprocess.run(
        [sys.executable, *command, "--seconds", "1.5", "--json", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )
    figures = json.loads(out.read_text())
    rows = figures["rows"]
    assert [r["case"] for r in rows] == ["jpeg-500x375, single", "jpeg-500x375, single (multipart)"]
    for row in rows:
        assert row["images"] > 0 and row["errors"] == 0
        assert row["gateway_cpu_ms_per_image"] > 0
    assert figures["floors"]["jpeg-500x375"]["images_per_cpu_s"] > 0


def test_a_variant_names_its_settings() -> None:
    assert variant("grpc payload:GATEWAY_TRITON_SHARED_MEMORY=off,GATEWAY_CACHE=false") == (
        "grpc payload",
        {"GATEWAY_TRITON_SHARED_MEMORY": "off", "GATEWAY_CACHE": "false"},
    )
    with pytest.raises(SystemExit):
        variant("no settings")


def test_the_draft_bench_compares_each_reduction_with_the_full_decode() -> None:
    """At 1024x768 a half-scale decode (384 px) keeps the 342 px a 299 crop needs (oversample
    1) but not twice it (the default, 2); the full decode is the reference."""
    data = encoded(scene(1024, 768), "JPEG")
    _, full_scale, full = draft_rate(data, None, 0.0)
    _, default_scale, default = draft_rate(data, 2.0, 0.0)
    _, halved_scale, halved = draft_rate(data, 1.0, 0.0)
    assert (full_scale, default_scale, halved_scale) == (1, 1, 2)
    assert np.array_equal(full, default)
    assert full.shape == halved.shape == (299, 299, 3) and not np.array_equal(full, halved)
