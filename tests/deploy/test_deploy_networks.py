"""The deployment files that name the networks, held to `inception.contract.NETWORKS`.

A shell loop, a readiness probe, an alert's regex and its count cannot import the contract,
so each is checked here: a network added to the contract and missing from one of them
fails with the file and the network's name. A file of deploy/ that names two networks or
more and is checked by no test here fails too, so that a new list cannot slip past.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from inception.contract import ENSEMBLE_MEAN_NAME, ENSEMBLE_NAME, NETWORKS, REPOSITORY_MODELS

from ..helpers import ROOT

DEPLOY = ROOT / "deploy"
ENTRYPOINT = DEPLOY / "models-entrypoint.sh"
TRITON_K8S = DEPLOY / "k8s" / "triton.yaml"
GATEWAY_K8S = DEPLOY / "k8s" / "gateway.yaml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
PROMETHEUS_RULE = DEPLOY / "k8s" / "prometheusrule.yaml"
ADAPTER_VALUES = DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "inception-serving.json"
COMPOSE = ROOT / "docker-compose.yml"


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def compare(path: Path, what: str, listed: list[str], expected: tuple[str, ...]) -> list[str]:
    """Problems of one list: each missing or unknown name, with the file and the place."""
    problems = [f"{rel(path)}: {what} lacks {name}" for name in expected if name not in listed]
    problems += [
        f"{rel(path)}: {what} names {name}, which is no model" for name in listed if name not in expected
    ]
    return problems


def count_problem(path: Path, what: str, stated: str | None) -> list[str]:
    expected = len(REPOSITORY_MODELS)
    if stated is None:
        return [f"{rel(path)}: {what} not found (the check cannot follow the file)"]
    if int(stated) != expected:
        return [
            f"{rel(path)}: {what} is {stated}, but the repository has {expected} models {REPOSITORY_MODELS}"
        ]
    return []


# ----------------------------------------------------------------------------- the places


def entrypoint_loop() -> list[str]:
    """The models image's entry point looks for a checkpoint of each network."""
    loop = re.search(r"^for name in ([\w ]+); do", ENTRYPOINT.read_text(), re.M)
    listed = loop.group(1).split() if loop else []
    return compare(ENTRYPOINT, "the checkpoint loop (`for name in ...`)", listed, NETWORKS)


def readiness_loop() -> list[str]:
    """A Triton pod is ready when every network and the ensemble are."""
    pods = [
        doc for doc in yaml.safe_load_all(TRITON_K8S.read_text()) if doc and doc.get("kind") == "Deployment"
    ]
    probes = [
        " ".join(c["readinessProbe"]["exec"]["command"])
        for pod in pods
        for c in pod["spec"]["template"]["spec"]["containers"]
        if "exec" in c.get("readinessProbe", {})
    ]
    loop = re.search(r"for m in ([\w ]+);", " ".join(probes))
    listed = loop.group(1).split() if loop else []
    return compare(
        TRITON_K8S, "the readiness probe's loop (`for m in ...`)", listed, (*NETWORKS, ENSEMBLE_NAME)
    )


def _rules(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def model_not_ready(path: Path) -> list[str]:
    """TritonModelNotReady counts the models with metrics on each Triton against all of them."""
    document = yaml.safe_load(path.read_text())
    groups = document["spec"]["groups"] if document.get("kind") == "PrometheusRule" else document["groups"]
    rule = _rules(groups).get("TritonModelNotReady")
    if rule is None:
        return [f"{rel(path)}: no TritonModelNotReady alert (the check cannot follow the file)"]
    regex = re.search(r'nv_inference_request_success\{[^}]*model=~"([^"]+)"', rule["expr"])
    listed = regex.group(1).split("|") if regex else []
    below = re.search(r"\)\s*<\s*(\d+)", rule["expr"])
    of_the = re.search(r"of the (\d+) inception models", rule["annotations"]["summary"])
    return [
        *compare(path, "TritonModelNotReady's model regex", listed, REPOSITORY_MODELS),
        *count_problem(path, "TritonModelNotReady's count (`) < N`)", below.group(1) if below else None),
        *count_problem(
            path, "TritonModelNotReady's summary (`of the N`)", of_the.group(1) if of_the else None
        ),
    ]


def alerts_rules() -> list[str]:
    return model_not_ready(ALERTS)


def prometheus_rule() -> list[str]:
    return model_not_ready(PROMETHEUS_RULE)


def alerts_unit_tests() -> list[str]:
    """promtool's tests of the alerts: one case has every model loaded (the quiet case),
    and the summaries they expect count all the models."""
    cases = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    loaded = [
        {
            m.group(1)
            for series in case.get("input_series", [])
            if (m := re.search(r'^nv_inference_request_success\{.*model="(\w+)"', series["series"]))
        }
        for case in cases
    ]
    quiet = max(loaded, key=len, default=set())
    problems = compare(ALERTS_TEST, "the case with every model loaded", sorted(quiet), REPOSITORY_MODELS)
    for stated in re.findall(r"of the (\d+) inception models", ALERTS_TEST.read_text()):
        problems += count_problem(ALERTS_TEST, "an expected summary's count (`of the N`)", stated)
    return problems


def dashboard_panel() -> list[str]:
    """The stat panel of loaded models turns green at all of them."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    panel = next((p for p in panels if p.get("title") == "Triton models loaded"), None)
    if panel is None:
        return [f"{rel(DASHBOARD)}: no 'Triton models loaded' panel (the check cannot follow the file)"]
    green = [
        s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"] if s["color"] == "green"
    ]
    expected = re.search(r"(\d+) expected \((\d+) networks", panel.get("description", ""))
    problems = count_problem(
        DASHBOARD, "the 'Triton models loaded' green threshold", str(green[0]) if green else None
    )
    problems += count_problem(
        DASHBOARD, "the panel's description (`N expected`)", expected.group(1) if expected else None
    )
    if expected and int(expected.group(2)) != len(NETWORKS):
        problems.append(
            f"{rel(DASHBOARD)}: the panel's description counts {expected.group(2)} networks, "
            f"not {len(NETWORKS)}"
        )
    return problems


def default_models() -> list[str]:
    """The gateway's default model, where a deployment sets it, is a routable one."""
    routable = (*NETWORKS, ENSEMBLE_NAME)
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["gateway"]["environment"][
        "GATEWAY_DEFAULT_MODEL"
    ]
    in_compose = re.fullmatch(r"\$\{GATEWAY_DEFAULT_MODEL:-(\w+)\}", compose)
    k8s = [
        env["value"]
        for doc in yaml.safe_load_all(GATEWAY_K8S.read_text())
        if doc and doc.get("kind") == "Deployment"
        for c in doc["spec"]["template"]["spec"]["containers"]
        for env in c.get("env", [])
        if env["name"] == "GATEWAY_DEFAULT_MODEL"
    ]
    stated = {
        rel(COMPOSE): in_compose.group(1) if in_compose else compose,
        **{rel(GATEWAY_K8S): v for v in k8s},
    }
    return [
        f"{path}: GATEWAY_DEFAULT_MODEL {model} is no routable model"
        for path, model in stated.items()
        if model not in routable
    ]


def adapter_excludes_only_the_ensemble() -> list[str]:
    """The autoscaling metric leaves out the ensemble and its mean step by a name pattern,
    which must catch both and no network."""
    patterns = set(re.findall(r'model!~"([^"]+)"', ADAPTER_VALUES.read_text()))
    problems = (
        [] if patterns else [f"{rel(ADAPTER_VALUES)}: no model!~ pattern (the check cannot follow the file)"]
    )
    for pattern in patterns:
        problems += [
            f'{rel(ADAPTER_VALUES)}: model!~"{pattern}" leaves out the network {n}'
            for n in NETWORKS
            if re.fullmatch(pattern, n)
        ]
        problems += [
            f'{rel(ADAPTER_VALUES)}: model!~"{pattern}" counts {n}'
            for n in (ENSEMBLE_NAME, ENSEMBLE_MEAN_NAME)
            if not re.fullmatch(pattern, n)
        ]
    return problems


PLACES: dict[str, Callable[[], list[str]]] = {
    rel(ENTRYPOINT): entrypoint_loop,
    rel(TRITON_K8S): readiness_loop,
    rel(ALERTS): alerts_rules,
    rel(PROMETHEUS_RULE): prometheus_rule,
    rel(ALERTS_TEST): alerts_unit_tests,
    rel(DASHBOARD): dashboard_panel,
    rel(GATEWAY_K8S): default_models,
    rel(ADAPTER_VALUES): adapter_excludes_only_the_ensemble,
}
#: Files that name networks without listing them for the deployment to follow.
PROSE = {
    rel(COMPOSE): "comments naming examples (which checkpoints are published); the default model is checked",
}


@pytest.mark.parametrize("place", list(PLACES))
def test_deploy_lists_follow_the_contract(place: str) -> None:
    problems = PLACES[place]()
    assert not problems, "the deployment does not follow inception/contract.py NETWORKS:\n" + "\n".join(
        problems
    )


def _deploy_files() -> Iterator[Path]:
    yield COMPOSE
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.suffix in {".sh", ".yml", ".yaml", ".json", ".Dockerfile", ""}:
            yield path


def test_every_list_of_networks_in_deploy_is_checked() -> None:
    """A file that names several networks is a list the deployment follows; if no check
    above reads it, adding a network could leave it behind unnoticed."""
    unchecked = []
    for path in _deploy_files():
        text = path.read_text(errors="replace")
        named = [n for n in NETWORKS if re.search(rf"\b{n}\b", text)]
        if len(named) >= 2 and rel(path) not in PLACES and rel(path) not in PROSE:
            unchecked.append(f"{rel(path)} names {', '.join(named)}")
    assert not unchecked, "lists of networks that no test holds to the contract:\n" + "\n".join(unchecked)
