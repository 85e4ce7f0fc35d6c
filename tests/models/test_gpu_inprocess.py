"""`bench/gpu/inprocess.py` runs on a lent GPU machine, once, on a budget: its GPU-only paths
(the TF32 variant, the fp16-against-fp32 comparison, the tables) are exercised here on the
CPU first. No timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.gpu import inprocess as gpu


def test_tf32_switch_restores_the_setting() -> None:
    before = torch.backends.cudnn.allow_tf32
    with gpu.cudnn_tf32(not before):
        assert torch.backends.cudnn.allow_tf32 is (not before)
    assert torch.backends.cudnn.allow_tf32 is before


def test_synthetic_images_are_uint8_nhwc() -> None:
    images = gpu.synthetic_images(2)
    assert images.shape == (5, 299, 299, 3)
    assert images.dtype == torch.uint8
    assert len({bytes(image.numpy()) for image in images}) == 5


@pytest.mark.slow
def test_cpu_smoke_run_with_the_gpu_variants(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The whole run, tiny counts, one network, with the variant list a CUDA device gets."""
    monkeypatch.setattr(gpu, "variants_for", lambda device: [gpu.FP32, gpu.FP32_NO_TF32, gpu.FP16])
    out = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--networks", "inception_resnet_v1", "--batches", "2"]
    argv += ["--latency-runs", "2", "--warmup", "1", "--images-per-block", "2", "--blocks", "1"]
    assert gpu.main([*argv, "--random-images", "0", "--out", str(out)]) == 0

    result = json.loads(out.read_text())["results"]["inception_resnet_v1"]
    assert set(result["variants"]) == {"fp32", "fp32 no-TF32", "fp16"}
    for figures in result["variants"].values():
        assert figures["traced_on"] == "cpu"
        assert figures["latency_ms"]["median"] > 0
        assert figures["images_per_s"]["2"]["median"] > 0
    # The trace records cuDNN's TF32 flag into each convolution: the exporter's file allows it.
    assert set(result["variants"]["fp32"]["conv_allow_tf32"]) == {"True"}
    assert set(result["variants"]["fp32 no-TF32"]["conv_allow_tf32"]) == {"False"}
    accuracy = result["accuracy"]
    assert accuracy["reference"] == "fp32 no-TF32"
    assert set(accuracy["against_reference"]) == {"fp32", "fp16"}
    # On the CPU TF32 does not exist: the flag must change nothing.
    assert accuracy["against_reference"]["fp32"]["max_abs_prob"] == 0
    assert accuracy["fp16_against_fp32"]["max_abs_prob"] < 1e-2
