"""Which Triton model(s) a request's options route to, and the options refused."""

from __future__ import annotations

import pytest

from service.errors import InvalidRequest, UnknownModel
from service.routing import metric_label, resolve
from service.settings import Settings

from ..helpers import UNREACHABLE

PAIR = ["inception_v4", "inception_resnet_v2"]


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(triton_grpc_url=UNREACHABLE)


@pytest.mark.parametrize(
    ("model", "targets"),
    [
        (None, ("inception_v4",)),
        ("ensemble", ("inception_ensemble",)),
        ("inception_resnet_v1", ("inception_resnet_v1",)),
    ],
)
def test_one_model(settings: Settings, model: str | None, targets: tuple[str, ...]) -> None:
    plan = resolve(settings, model)
    assert plan.targets == targets and not plan.custom


def test_per_request_ensemble_normalises_its_coefficients(settings: Settings) -> None:
    plan = resolve(settings, None, PAIR, [1, 3])
    assert plan.targets == tuple(PAIR) and plan.coefficients == (0.25, 0.75)
    assert plan.name == "ensemble(inception_v4,inception_resnet_v2)" and plan.label == "custom_ensemble"


def test_internal_model_is_never_routable(settings: Settings) -> None:
    with pytest.raises(UnknownModel) as unknown:
        resolve(settings, "inception_ensemble_mean")
    assert "inception_v4" in unknown.value.message


@pytest.mark.parametrize(
    "options",
    [
        dict(model="inception_v4", models=["inception_v4", "inception_resnet_v1"]),
        dict(model=None, models=["inception_v4"]),
        dict(model=None, models=["inception_v4", "inception_v4"]),
        dict(model=None, models=["inception_v4", "inception_ensemble"]),
        dict(model=None, models=["inception_v4", "inception_resnet_v1"], weights=[1.0]),
        dict(model=None, models=["inception_v4", "inception_resnet_v1"], weights=[0.0, 0.0]),
        dict(model="inception_v4", weights=[1.0]),
    ],
    ids=["model-and-models", "one-member", "repeated", "nested-ensemble", "weight-count", "zero", "lone"],
)
def test_bad_options_are_refused(settings: Settings, options: dict) -> None:
    with pytest.raises(InvalidRequest):
        resolve(settings, **options)


@pytest.mark.parametrize(
    "weights", [[float("nan"), 1.0], [float("inf"), 1.0], [1e308, 1e308], [-1.0, 2.0]], ids=str
)
def test_per_request_ensemble_weights_must_be_finite(settings: Settings, weights: list[float]) -> None:
    """NaN passes every comparison and infinities sum to NaN or to all-zero weights."""
    with pytest.raises(InvalidRequest):
        resolve(settings, None, PAIR, weights)


@pytest.mark.parametrize(
    ("requested", "label"), [("whatever-a-client-sends", "unknown"), ("ensemble", "inception_ensemble")]
)
def test_metric_label_is_bounded(settings: Settings, requested: str, label: str) -> None:
    assert metric_label(settings, requested) == label
