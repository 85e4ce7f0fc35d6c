"""The Kubernetes PrometheusRule, made from the compose rules (deploy/prometheus/alerts.yml).

    python -m tests.deploy.k8s_rules      # rewrites deploy/k8s/prometheusrule.yaml

The compose Prometheus is ours alone; kube-prometheus-stack's is shared by every team of
the cluster, and another namespace may run this same stack (a staging copy) under the same
job names. So the rules there are the compose rules scoped, and nothing else changes:

- every selector of our jobs (`inception-gateway`, `inception-triton`) and of the alerts
  themselves (`ALERTS`) also matches `namespace="inception-serving"`, so another copy's
  targets neither fire our alerts nor hide an outage of ours (`absent()`, `max by`);
- the meta rules select the platform's Alertmanager and Prometheus (kube-prometheus-stack
  released as `kube-prometheus-stack` in `monitoring`, as podmonitors.yaml and
  networkpolicies.yaml assume) instead of compose's, not any Alertmanager a team runs;
- every aggregation and match keeps `namespace`, and every alert carries the label
  `namespace: inception-serving`: a shared Alertmanager routes by it, and prometheus-
  operator's AlertmanagerConfig in our namespace only ever sees alerts that carry it.

Alertmanager counts failed notifications per integration only (no receiver label), so on
a shared Alertmanager another team's failing webhook also stops our Watchdog: the switch
then pages for a pipeline that may be ours too, which errs on the side of a page.

The test (tests/deploy/test_deploy_k8s.py) fails when the committed file differs from what
this makes, and runs the compose rules' promtool tests, scoped the same way, against it.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import yaml

from .promql_tools import ALERTS, DEPLOY

PROMETHEUS_RULE = DEPLOY / "k8s" / "prometheusrule.yaml"
#: Our namespace: kustomization.yaml's `namespace` (a test holds the two equal).
NAMESPACE = "inception-serving"
OUR_JOBS = ("inception-gateway", "inception-triton")
#: The compose stack's own Alertmanager and Prometheus jobs, and what selects the
#: platform's in the cluster.
PLATFORM = {
    "alertmanager": 'namespace="monitoring", job="kube-prometheus-stack-alertmanager"',
    "prometheus": 'namespace="monitoring", job="kube-prometheus-stack-prometheus"',
}

HEADER = f"""\
# GENERATED from deploy/prometheus/alerts.yml by tests/deploy/k8s_rules.py: do not edit;
# change alerts.yml and run `python -m tests.deploy.k8s_rules` (tests/deploy/test_deploy_k8s.py
# fails when this file is not what that makes). The alert rules of alerts.yml for
# kube-prometheus-stack's Prometheus, scoped to the namespace {NAMESPACE}: every selector of
# our jobs matches the namespace too, the meta rules select the platform's Alertmanager
# and Prometheus (release kube-prometheus-stack in namespace monitoring; change PLATFORM
# in the generator for another), and every alert carries the label namespace, which a
# shared Alertmanager (and an AlertmanagerConfig of this namespace) routes by. Kustomize
# writes the runbook_base_url of settings.yaml in place of the
# `{{{{ $externalLabels.runbook_base_url }}}}` part of every runbook_url. The PodMonitors'
# jobLabel gives the series the same job labels ("inception-gateway", "inception-triton").
"""

_BRACES = re.compile(r"\{([^{}]*)\}")
_GROUPING = re.compile(r"\b(by|on)\s*\(([^()]*)\)")


def _scope_matchers(match: re.Match[str], name: str) -> str:
    body = match.group(1)
    job = re.search(r'\bjob="([^"]*)"', body)
    if job and job.group(1) in PLATFORM:
        return "{" + body.replace(job.group(0), PLATFORM[job.group(1)]) + "}"
    if (job and job.group(1) in OUR_JOBS) or name == "ALERTS":
        return "{" + f'namespace="{NAMESPACE}", ' + body.lstrip() + "}"
    return match.group(0)


def scope_selectors(text: str) -> str:
    """Every `{...}` of `text` (an expression, or a promtool input series) scoped: ours to
    our namespace, compose's Alertmanager and Prometheus to the platform's."""

    def one(match: re.Match[str]) -> str:
        name = re.search(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*$", text[: match.start()])
        return _scope_matchers(match, name.group(1) if name else "")

    return _BRACES.sub(one, text)


def keep_namespace(expr: str) -> str:
    """`by (...)` and `on (...)` with labels keep `namespace` as well; `on ()` (the
    Watchdog's: any failing alert of ours) stays as it is."""

    def one(match: re.Match[str]) -> str:
        labels = [label.strip() for label in match.group(2).split(",") if label.strip()]
        if not labels or "namespace" in labels:
            return match.group(0)
        return f"{match.group(1)} ({', '.join(['namespace', *labels])})"

    return _GROUPING.sub(one, expr)


def scope_expr(expr: str) -> str:
    return keep_namespace(scope_selectors(expr))


def scope_rule(rule: dict[str, Any]) -> dict[str, Any]:
    scoped = dict(rule)
    scoped["expr"] = scope_expr(rule["expr"])
    scoped["labels"] = {**rule.get("labels", {}), "namespace": NAMESPACE}
    return scoped


def k8s_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The compose rule groups, scoped for the shared Prometheus."""
    return [{**group, "rules": [scope_rule(rule) for rule in group["rules"]]} for group in groups]


def compose_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(ALERTS.read_text())["groups"]
    return groups


def prometheus_rule() -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "inception-serving", "labels": {"release": "kube-prometheus-stack"}},
        "spec": {"groups": k8s_groups(compose_groups())},
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line expressions as literal blocks, as alerts.yml writes them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def render() -> str:
    body = yaml.dump(prometheus_rule(), Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)
    return HEADER + body


def scope_unit_tests(tests: dict[str, Any], rule_file: str) -> dict[str, Any]:
    """The compose rules' promtool tests (alerts_test.yml) for the scoped rules: input
    series of our jobs in our namespace, compose's Alertmanager and Prometheus as the
    platform's, and every expected alert with the namespace label."""
    scoped_cases = []
    for case in tests["tests"]:
        scoped = dict(case)
        scoped["input_series"] = [
            {**series, "series": scope_selectors(series["series"])} for series in case.get("input_series", [])
        ]
        checks = []
        for check in case.get("alert_rule_test", []):
            expected = [
                {**alert, "exp_labels": {**alert.get("exp_labels", {}), "namespace": NAMESPACE}}
                for alert in check.get("exp_alerts", [])
            ]
            checks.append({**check, "exp_alerts": expected})
        scoped["alert_rule_test"] = checks
        scoped_cases.append(scoped)
    return {**tests, "rule_files": [rule_file], "tests": scoped_cases}


def main(argv: list[str]) -> int:
    """Writes deploy/k8s/prometheusrule.yaml; with `--check`, only says whether it is current."""
    text = render()
    if "--check" in argv:
        current = PROMETHEUS_RULE.read_text() == text
        print("up to date" if current else f"{PROMETHEUS_RULE} is stale: python -m tests.deploy.k8s_rules")
        return 0 if current else 1
    PROMETHEUS_RULE.write_text(text)
    print(f"wrote {PROMETHEUS_RULE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
