"""`inception_model_weights_info`: the provenance of each served model as a gauge, which the
alerts on random weights and on replicas that disagree select (deploy/prometheus/alerts.yml)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import REGISTRY

from service import metrics


@dataclass(frozen=True)
class Info:
    provenance: str
    checkpoint_sha256: str = ""

    @property
    def random_init(self) -> bool:
        return self.provenance == "random-init"


def value(model: str, weights: str, sha: str, random_init: str) -> float | None:
    labels = {"model": model, "weights": weights, "weights_sha256": sha, "random_init": random_init}
    return REGISTRY.get_sample_value("inception_model_weights_info", labels)


def test_the_gauge_follows_the_configs_read() -> None:
    metrics.set_model_weights({"m1": Info("random-init"), "m2": Info("pretrained:a.safetensors", "ab")})
    assert value("m1", "random-init", "", "true") == 1
    assert value("m2", "pretrained:a.safetensors", "ab", "false") == 1
    # m1 now serves real weights, m2 is gone: their old series drop to 0, never linger at 1.
    metrics.set_model_weights({"m1": Info("pretrained:b.pth", "cd")})
    assert value("m1", "pretrained:b.pth", "cd", "false") == 1
    assert value("m1", "random-init", "", "true") == 0
    assert value("m2", "pretrained:a.safetensors", "ab", "false") == 0
    metrics.set_model_weights({})
    assert value("m1", "pretrained:b.pth", "cd", "false") == 0
