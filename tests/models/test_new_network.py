"""Adding a network is its module, its spec and a regenerated repository (issue 18).

A fresh process registers a small network of another input size (64) as a developer
would: its module, its name added to `NETWORKS` in contract.py (the module's own text
with that one edit, re-run), its `ModelSpec` added to the registry. Then everything else
must follow it without an edit (the exporter's default and its fingerprint, the configs'
dims, the ensemble's members and inputs, the gateway's routable models) or fail a test
that names it (the deployment's lists).
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import inception.layers
from inception.contract import ENSEMBLE_NAME, NETWORKS
from inception.export import quiet_torchscript
from inception.registry import get_spec
from inception.repository import parse

from ..helpers import ROOT

NAME = "tiny_net"
SIZE = 64

MODULE = '''"""A network small enough to export in a second: one conv-BN-ReLU and the classifier."""

import torch

from inception.layers import ClassifierHead, ConvBnReLU, Network


class TinyNet(Network):
    num_features = 16

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = ConvBnReLU(3, 16, 3, stride=2)
        self.head = ClassifierHead(16, num_classes, 0.0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)
'''

# Runs in a fresh process: argv = module folder, repository, mode ("import" or "follow").
SCRIPT = r'''
import json, re, sys
from pathlib import Path

folder, repository, mode = sys.argv[1:]
sys.path.insert(0, folder)
from inception import contract


def add_to_contract(name):
    """The one edit of contract.py: the name appended to NETWORKS."""
    path = Path(contract.__file__)
    edited, count = re.subn(r"^(NETWORKS = \(.*)\)$", rf'\1, "{name}")', path.read_text(), flags=re.M)
    if count != 1:
        sys.exit("NETWORKS is no longer one line of contract.py: update this test's edit")
    exec(compile(edited, str(path), "exec"), vars(contract))


if mode == "import":  # the contract names it, the registry has no spec yet
    add_to_contract("tiny_net")
    try:
        import inception.registry
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
    sys.exit(0)

from inception import registry

add_to_contract("tiny_net")
from tiny_net import TinyNet

spec = registry.ModelSpec(
    name="tiny_net", builder=TinyNet, input_size=64, crop_pct=0.875, num_params=17_464, gmacs=0.0
)
specs = [*registry.MODELS.values(), spec]
registry.MODELS.clear()
registry.MODELS.update(registry.in_contract_order(specs, contract.NETWORKS))

import pytest
from inception import list_models
from inception.export import ensemble_entry, main, network_entry, network_sources
from inception.rollout import write_repository
from service.settings import default_models

out = {"models": list_models(), "routable": default_models()}
out["sources"] = {s.name: [str(p) for p in network_sources(s).values()] for s in registry.MODELS.values()}
# The exporter's own path for the new network: trace, check, configs, its ensemble.
out["export"] = main(["--repository", f"{repository}/export", "--models", "tiny_net"])
# The default repository's configs (the writer over every network, the ensemble of all):
# exporting the three big networks again would take minutes for nothing new.
networks = [network_entry(s) for s in registry.MODELS.values()]
write_repository(Path(repository) / "all", networks, ensemble_entry(networks))
# The deployment's lists, as their test sees them.
out["deploy"] = int(pytest.main(["-q", "-p", "no:cacheprovider", "tests/deploy/test_deploy_networks.py"]))
print("RESULT " + json.dumps(out))
'''


def run(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / f"{NAME}.py").write_text(MODULE)
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), str(tmp_path / "repository"), mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def added(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    folder = tmp_path_factory.mktemp("new_network")
    result = run(folder, "follow")
    line = next((x for x in result.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(line.removeprefix("RESULT ")), folder / "repository", result.stdout


def test_a_name_without_a_spec_stops_the_registry(tmp_path: Path) -> None:
    result = run(tmp_path, "import")
    assert result.returncode == 0, result.stderr
    error = json.loads(result.stdout.strip().splitlines()[-1])
    assert error["error"] == "RegistryError"
    assert "tiny_net in NETWORKS (inception/contract.py) but without a ModelSpec" in error["message"]
    assert "inception/registry.py" in error["message"]


def test_the_export_follows(added) -> None:
    """The exporter's default list, and its path for the new network: a traced file that
    takes 64×64 images, configs with those dims, an ensemble input of that size."""
    out, repository, _ = added
    assert out["models"] == [*NETWORKS, NAME]
    assert out["export"] == 0
    folder = repository / "export" / NAME
    for config in ("config.pbtxt", "configs/gpu.pbtxt", "configs/cpu.pbtxt"):
        parsed = parse((folder / config).read_text())
        assert [list(i.dims) for i in parsed.input] == [[SIZE, SIZE, 3]], config
        assert all(list(w.inputs["image__0"].dims) == [SIZE, SIZE, 3] for w in parsed.model_warmup), config
        assert parsed.parameters["input_size"].string_value == str(SIZE)
    with quiet_torchscript():
        model = torch.jit.load(str(folder / "1" / "model.pt"))
    probabilities = model(torch.zeros(2, SIZE, SIZE, 3, dtype=torch.uint8))
    assert probabilities.shape == (2, 1000)
    assert torch.allclose(probabilities.sum(1), torch.ones(2))
    ensemble = parse((repository / "export" / "inception_ensemble" / "config.pbtxt").read_text())
    assert [list(i.dims) for i in ensemble.input] == [[SIZE, SIZE, 3]]


def test_the_ensemble_follows(added) -> None:
    """Every network is a member by default; the new one, of another size, gets an input
    of its own, with its preprocessing in the parameters."""
    _, repository, _ = added
    ensemble = parse((repository / "all" / "inception_ensemble" / "config.pbtxt").read_text())
    members = [*NETWORKS, NAME]
    assert ensemble.parameters["members"].string_value == ",".join(members)
    assert ensemble.parameters["member_weights"].string_value == ",".join(["0.25"] * 4)
    steps = {s.model_name: s.input_map["image__0"] for s in ensemble.ensemble_scheduling.step}
    image = steps[NAME]
    assert image not in {steps[n] for n in NETWORKS}
    assert {i.name: list(i.dims) for i in ensemble.input}[image] == [SIZE, SIZE, 3]
    assert ensemble.parameters[f"{image}.input_size"].string_value == str(SIZE)
    mean = parse((repository / "all" / "inception_ensemble_mean" / "config.pbtxt").read_text())
    assert [i.name for i in mean.input] == [f"member__{i}" for i in range(4)]
    tiny = parse((repository / "all" / NAME / "config.pbtxt").read_text())
    assert [list(i.dims) for i in tiny.input] == [[SIZE, SIZE, 3]]


def test_the_fingerprint_follows(added) -> None:
    """The new module is in its own fingerprint, with the layers it imports, and in no
    other network's; no other network's module is in its: nothing lists it by hand."""
    out, repository, _ = added
    module = str(repository.parent / f"{NAME}.py")
    sources = out["sources"]
    assert module in sources[NAME]
    assert str(Path(inception.layers.__file__).resolve()) in sources[NAME]
    assert not {
        str(Path(inspect.getsourcefile(get_spec(n).builder) or "").resolve()) for n in NETWORKS
    } & set(sources[NAME])
    assert all(module not in sources[name] for name in NETWORKS)


def test_the_gateway_routes_it(added) -> None:
    """service.settings' routable models derive from the contract."""
    out, _, _ = added
    assert out["routable"] == [*NETWORKS, NAME, ENSEMBLE_NAME]


def test_the_deployment_lists_fail_naming_it(added) -> None:
    """The lists that cannot import the contract fail their test, naming file and network."""
    out, _, stdout = added
    assert out["deploy"] == 1, "the deployment's lists passed with a network they do not name"
    lines = stdout.splitlines()
    for path in (
        "deploy/models-entrypoint.sh",
        "deploy/k8s/triton.yaml",
        "deploy/prometheus/alerts.yml",
        "deploy/k8s/prometheusrule.yaml",
        "deploy/prometheus/alerts_test.yml",
    ):
        assert any(f"{path}: " in line and "lacks tiny_net" in line for line in lines), path
    assert any("inception-serving.json: " in line and "6 models" in line for line in lines)
