"""Triton's own figure of a model's speed, from its inference statistics: images computed
per second of compute (input, inference and output), the recent rate where enough images
were computed since the previous read, else the rate since Triton started.

What a worker that has measured nothing of its own knows of the model's speed
(service/gateway.py); apart from the client because it is arithmetic on counters that only
grow, with a memory of the previous read per model, and no call of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Images Triton must have computed since the previous read of its statistics for the rate
#: between the two reads to stand for the model's speed (fewer: the rate since its start).
RATE_SAMPLE_IMAGES = 8


class ServiceRates:
    """Each model's counters as last read, and the rate they give."""

    def __init__(self) -> None:
        self._counts: dict[str, tuple[int, int]] = {}  # model -> (images, compute ns) last read

    def update(self, name: str, stats: Mapping[str, Any]) -> float | None:
        """The rate of ``name`` from Triton's statistics answer (JSON), remembered for the
        next read; None where Triton has computed nothing yet."""
        images, compute_ns = 0, 0
        for model in stats.get("model_stats", []):
            images += int(model.get("inference_count", 0))
            inference = model.get("inference_stats", {})
            for stage in ("compute_input", "compute_infer", "compute_output"):
                compute_ns += int(inference.get(stage, {}).get("ns", 0))
        before = self._counts.get(name)
        self._counts[name] = (images, compute_ns)
        if before is not None and images - before[0] >= RATE_SAMPLE_IMAGES and compute_ns > before[1]:
            return (images - before[0]) / ((compute_ns - before[1]) / 1e9)  # the recent rate
        return images / (compute_ns / 1e9) if images and compute_ns else None
