"""The networks' layouts: parameter counts against timm's, the paper's stage widths for
Inception-ResNet-v1, the registry's entry point, and deterministic initialisation."""

from __future__ import annotations

import pytest
import torch

import inception
from inception import create_model, list_models
from inception.inception_resnet_v1 import BLOCK_COUNTS, InceptionResNetV1
from inception.layers import ResidualInception


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "expected"),
    [("inception_v4", 42_679_816), ("inception_resnet_v2", 55_843_464), ("inception_resnet_v1", 22_756_328)],
)
def test_parameter_counts(name: str, expected: int) -> None:
    assert n_params(create_model(name)) == expected


def test_inception_resnet_v1_follows_the_paper() -> None:
    model = InceptionResNetV1().eval()
    assert (len(model.blocks_a), len(model.blocks_b), len(model.blocks_c)) == BLOCK_COUNTS == (5, 10, 5)
    shapes = {}
    for stage in ("stem", "reduction_a", "reduction_b"):
        module = getattr(model, stage)
        module.register_forward_hook(lambda m, i, o, stage=stage: shapes.__setitem__(stage, o.shape))
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, 299, 299))
    assert shapes["stem"][1:] == (256, 35, 35)
    assert shapes["reduction_a"][1:] == (896, 17, 17)
    assert shapes["reduction_b"][1:] == (1792, 8, 8)
    assert logits.shape == (1, 1000)
    # Reduction-A with k, l, m, n = 192, 192, 256, 384.
    conv_n = model.reduction_a.branches[0].conv
    convs_klm = [layer.conv for layer in model.reduction_a.branches[1]]
    assert conv_n.out_channels == 384
    assert [c.out_channels for c in convs_klm] == [192, 192, 256]


@pytest.mark.parametrize("name", ["inception_resnet_v1", "inception_resnet_v2"])
def test_residual_scale_is_a_constructor_parameter(name: str) -> None:
    default = create_model(name)
    scales = sorted({m.scale for m in default.modules() if isinstance(m, ResidualInception)})
    assert scales == [0.1, 0.17, 0.2] + ([1.0] if name == "inception_resnet_v2" else [])
    custom = create_model(name, scales=(0.3, 0.3, 0.3))
    blocks = [m for m in custom.modules() if isinstance(m, ResidualInception)]
    assert {m.scale for m in blocks if m.activate} == {0.3}
    x = torch.randn(1, 3, 299, 299)
    with torch.no_grad():
        assert not torch.allclose(default(x), custom(x))


def test_entry_point_lists_known_models_and_rejects_unknown() -> None:
    assert list_models() == ["inception_v4", "inception_resnet_v1", "inception_resnet_v2"]
    with pytest.raises(inception.UnknownModelError) as err:
        create_model("inception_v3")
    message = str(err.value)
    assert "inception_v3" in message
    assert all(name in message for name in list_models())


def test_random_initialisation_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = create_model("inception_resnet_v1")
    after = torch.rand(1)
    b = create_model("inception_resnet_v1")
    assert torch.equal(before, after), "create_model must not consume the caller's random state"
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb), ka
    assert a.weights_info.is_random and a.weights_info.provenance == "random-init"
    assert not a.training
