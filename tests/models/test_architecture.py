"""The networks' layouts: parameter counts and MACs against their specs, the paper's
stage widths and block counts, timm's `forward_features`/`forward_head` split, the
registry against `contract.NETWORKS`, the README's table against the specs, and
deterministic initialisation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import inception
from inception import create_model, get_spec, list_models
from inception import inception_resnet_v1 as irv1
from inception import inception_resnet_v2 as irv2
from inception import inception_v4 as v4
from inception.contract import NETWORKS
from inception.inception_resnet_v1 import InceptionResNetV1
from inception.layers import Network, ResidualInception
from inception.registry import MODELS, RegistryError, in_contract_order

README = Path(__file__).resolve().parents[2] / "README.md"


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", NETWORKS)
def test_parameters_and_macs_are_the_specs(name: str) -> None:
    spec = get_spec(name)
    model = create_model(name)
    assert n_params(model) == spec.num_params
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        model(torch.zeros(1, 3, spec.input_size, spec.input_size))
    assert round(flops.get_total_flops() / 2e9, 2) == spec.gmacs


def test_inception_resnet_v1_follows_the_paper() -> None:
    model = InceptionResNetV1().eval()
    assert (len(model.blocks_a), len(model.blocks_b), len(model.blocks_c)) == irv1.BLOCK_COUNTS == (5, 10, 5)
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


def test_block_counts_are_named_and_built() -> None:
    """Each network states its blocks per stage once, and builds that many."""
    built = {
        "inception_v4": (v4.BLOCK_COUNTS, ("inception_a", "inception_b", "inception_c")),
        "inception_resnet_v1": (irv1.BLOCK_COUNTS, ("blocks_a", "blocks_b", "blocks_c")),
        "inception_resnet_v2": (irv2.BLOCK_COUNTS, ("blocks_a", "blocks_b", "blocks_c")),
    }
    assert {name: counts for name, (counts, _) in built.items()} == {
        "inception_v4": (4, 7, 3),  # Figure 9
        "inception_resnet_v1": (5, 10, 5),  # Figure 15
        "inception_resnet_v2": (10, 20, 10),  # the checkpoint's, not Figure 15's
    }
    for name, (counts, stages) in built.items():
        model = get_spec(name).builder()
        assert tuple(len(getattr(model, stage)) for stage in stages) == counts, name


@pytest.mark.parametrize("name", NETWORKS)
def test_forward_is_forward_head_of_forward_features(name: str) -> None:
    """timm's split, on every network alike: features `num_features` wide at 8×8, the
    pooled features before the classifier, and the logits."""
    spec = get_spec(name)
    model = create_model(name)
    assert isinstance(model, Network)
    x = torch.randn(2, 3, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        logits = model.forward_head(features)
        assert features.shape == (2, model.num_features, 8, 8)
        assert pooled.shape == (2, model.num_features)
        assert torch.allclose(pooled, features.mean((2, 3)), atol=1e-6)
        assert torch.equal(logits, model(x))
        assert logits.shape == (2, spec.num_classes)


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


def test_entry_point_lists_the_contracts_networks_and_rejects_unknown() -> None:
    assert list_models() == list(NETWORKS) == [spec.name for spec in MODELS.values()]
    with pytest.raises(inception.UnknownModelError) as err:
        create_model("inception_v3")
    message = str(err.value)
    assert "inception_v3" in message
    assert all(name in message for name in list_models())


def test_registry_refuses_what_the_contract_does_not_list() -> None:
    """`registry.MODELS` is built by `in_contract_order` at import: a network named on one
    side only stops every import of the registry, naming the file that lacks it."""
    specs = list(MODELS.values())
    with pytest.raises(
        RegistryError, match=r"inception_v3 in NETWORKS \(inception/contract\.py\) but without"
    ):
        in_contract_order(specs, (*NETWORKS, "inception_v3"))
    with pytest.raises(
        RegistryError, match=r"inception_resnet_v2 in MODELS \(inception/registry\.py\) but not"
    ):
        in_contract_order(specs, NETWORKS[:2])
    reordered = in_contract_order(specs, tuple(reversed(NETWORKS)))
    assert list(reordered) == list(reversed(NETWORKS))


def _readme_networks() -> dict[str, dict[str, str]]:
    """The rows of the README's table of networks (the table with a "Triton name" column),
    by Triton name, each by column header."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and "Triton name" in line)
    columns = [cell.strip() for cell in lines[start].strip("|").split("|")]
    table = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = dict(zip(columns, (cell.strip() for cell in line.strip("|").split("|")), strict=False))
        name = re.fullmatch(r"`(\w+)`", cells.get("Triton name", ""))
        if name:
            table[name.group(1)] = cells
    return table


def test_readme_table_states_the_specs() -> None:
    """The README's figures are the specs': a network added without its row, or a count
    changed in one place only, fails here by name."""
    table = _readme_networks()
    missing = [name for name in NETWORKS if name not in table]
    assert not missing, f"README.md's table of networks has no row for {', '.join(missing)}"
    for name in NETWORKS:
        spec, row = get_spec(name), table[name]
        stated = {
            "parameters": f"{spec.num_params:,}",
            "GMACs": f"{spec.gmacs:.2f}",
            "paper": f"{spec.paper_top1_error} / {spec.paper_top5_error}",
            "crop": f"{spec.crop_pct:g}, {spec.interpolation}",
        }
        read = {
            key: next(value for column, value in row.items() if column.startswith(prefix))
            for key, prefix in (
                ("parameters", "parameters"),
                ("GMACs", "GMACs"),
                ("paper", "paper"),
                ("crop", "crop"),
            )
        }
        assert read == stated, f"README.md's row of {name} disagrees with its spec (inception/registry.py)"


def test_evaluation_quotes_the_specs_table_2() -> None:
    """The evaluation's table of the paper's figures (torch-free, so it keeps its own)
    gives each network's single-crop errors as its spec does."""
    from evaluation.imagenet import PAPER

    for name in NETWORKS:
        spec = get_spec(name)
        if spec.paper_top1_error is None:
            continue  # a network the paper does not report
        source, top1, top5 = PAPER[name][1]
        assert (source, top1, top5) == ("Table 2", spec.paper_top1_error, spec.paper_top5_error), name


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
