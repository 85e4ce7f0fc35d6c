"""The Kubernetes alert rules (issue 25, item 6): scoped to our namespace and the
platform's alerting jobs, every alert labelled with the namespace, the committed
PrometheusRule exactly what tests/deploy/k8s_rules.py makes of alerts.yml, and promtool's
unit tests on it: the compose rules' own, scoped the same way, and the cases a shared
Prometheus adds (k8s_alerts_test.yml: another namespace running this same stack, another
team's Alertmanager)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from .k8s_rules import NAMESPACE, PLATFORM, PROMETHEUS_RULE, render, scope_unit_tests
from .promql_tools import ALERTS, DEPLOY, selectors

HERE = Path(__file__).resolve().parent
COMPOSE_TESTS = ALERTS.parent / "alerts_test.yml"


def k8s_rules() -> list[dict]:
    groups = yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]["groups"]
    return [rule for group in groups for rule in group["rules"]]


def write_rules(folder: Path) -> None:
    """The PrometheusRule's groups as a plain rule file, as prometheus-operator hands them
    to Prometheus (runbook template and all: the tests give the external label)."""
    groups = yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]["groups"]
    (folder / "k8s_rules.yml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))


def promtool_test(promtool: str, folder: Path, test_file: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, "test", "rules", test_file], cwd=folder, capture_output=True, text=True, timeout=120
    )


def test_the_prometheusrule_is_generated_from_alerts_yml():
    assert PROMETHEUS_RULE.read_text() == render(), (
        "deploy/k8s/prometheusrule.yaml is not what alerts.yml makes: python -m tests.deploy.k8s_rules"
    )


def test_the_rules_namespace_is_the_one_kustomize_deploys_into():
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == NAMESPACE


def test_every_alert_is_scoped_and_carries_the_namespace():
    platform = {f"{{{matchers}}}" for matchers in PLATFORM.values()}
    for rule in k8s_rules():
        assert rule["labels"]["namespace"] == NAMESPACE, rule["alert"]
        found = selectors(rule["expr"])
        if rule["alert"] != "Watchdog":
            assert found, rule["alert"]
        for selector in found:
            braces = selector[selector.index("{") :] if "{" in selector else ""
            if any(braces.startswith(p[:-1]) for p in platform):
                continue  # the platform's Alertmanager or Prometheus, by namespace and job
            assert braces.startswith(f'{{namespace="{NAMESPACE}", '), f"{rule['alert']}: {selector}"
        for clause in re.findall(r"\b(?:by|on)\s*\(([^()]*)\)", rule["expr"]):
            labels = {label.strip() for label in clause.split(",") if label.strip()}
            assert not labels or "namespace" in labels, f"{rule['alert']}: ({clause}) drops the namespace"


def test_promtool_runs_the_compose_unit_tests_on_the_k8s_rules(promtool, tmp_path):
    """Every case of alerts_test.yml, its series in our namespace (and the platform's
    Alertmanager and Prometheus), passes on the scoped rules, and every alert it expects
    carries the namespace label: the scoping changed what is selected, nothing else."""
    write_rules(tmp_path)
    tests = scope_unit_tests(yaml.safe_load(COMPOSE_TESTS.read_text()), "k8s_rules.yml")
    (tmp_path / "scoped_test.yml").write_text(yaml.safe_dump(tests, sort_keys=False, width=1000))
    result = promtool_test(promtool, tmp_path, "scoped_test.yml")
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    expected = [
        alert for case in tests["tests"] for check in case["alert_rule_test"] for alert in check["exp_alerts"]
    ]
    assert expected and all(a["exp_labels"]["namespace"] == NAMESPACE for a in expected)


def test_promtool_shows_other_namespaces_and_alertmanagers_do_not_page_us(promtool, tmp_path):
    write_rules(tmp_path)
    (tmp_path / "k8s_alerts_test.yml").write_text((HERE / "k8s_alerts_test.yml").read_text())
    result = promtool_test(promtool, tmp_path, "k8s_alerts_test.yml")
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_the_scoping_cases_fail_on_unscoped_rules(promtool, tmp_path):
    """The compose rules as they are, without the scoping, fail the shared-Prometheus
    cases: those cases test the scoping, not only the rules."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule["labels"] = {**rule.get("labels", {}), "namespace": NAMESPACE}
    (tmp_path / "k8s_rules.yml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    (tmp_path / "k8s_alerts_test.yml").write_text((HERE / "k8s_alerts_test.yml").read_text())
    result = promtool_test(promtool, tmp_path, "k8s_alerts_test.yml")
    assert result.returncode != 0, result.stdout
    for alert in ("GatewayAbsent", "TritonUnavailable", "AlertmanagerNotificationsFailing"):
        assert f"alertname: {alert}" in result.stdout + result.stderr, alert
