"""Prometheus configuration and alert rules: promtool's own checks and unit tests, and the
metric names every expression uses."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from .promql_tools import (
    ALERTS,
    KNOWN_METRICS,
    adapter_expressions,
    alert_expressions,
    alert_rules,
    dashboard_expressions,
    dashboard_variable_queries,
    metric_names,
)

PROMETHEUS_DIR = ALERTS.parent


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_check_config(promtool):
    result = run([promtool, "check", "config", "prometheus.yml"], PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_check_rules(promtool):
    result = run([promtool, "check", "rules", "alerts.yml"], PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules(promtool):
    result = run([promtool, "test", "rules", "alerts_test.yml"], PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules_can_fail(promtool, tmp_path):
    """The unit tests compare rendered annotations: a wrong expectation fails them."""
    broken = (PROMETHEUS_DIR / "alerts_test.yml").read_text().replace("6.25% of", "7% of")
    (tmp_path / "alerts_test.yml").write_text(broken)
    (tmp_path / "alerts.yml").write_text(ALERTS.read_text())
    result = run([promtool, "test", "rules", "alerts_test.yml"], tmp_path)
    assert result.returncode != 0


#: Changes that break what the rules promise; the unit tests must catch each one.
REGRESSIONS = {
    "no traffic guard on the error ratio": (
        """          and
            sum by (job, model) (rate(inception_gateway_requests_total{job="gateway"}[5m])) >= 0.1
""",
        "",
    ),
    "TritonDown pages while a new replica starts": (
        """        expr: up{job="triton"} == 0
        for: 10m""",
        """        expr: up{job="triton"} == 0
        for: 1m""",
    ),
    "a zeroed provenance series counts": (
        """(inception_model_weights_info{job="gateway"} == 1)""",
        """(inception_model_weights_info{job="gateway"})""",
    ),
    "no absent() rule for Triton": ('expr: absent(up{job="triton"})', 'expr: up{job="triton"} == -1'),
}


@pytest.mark.parametrize("change", sorted(REGRESSIONS))
def test_promtool_tests_catch_a_regression(promtool, tmp_path, change):
    old, new = REGRESSIONS[change]
    rules = ALERTS.read_text()
    assert old in rules, f"the rules no longer contain what this test changes: {old!r}"
    (tmp_path / "alerts.yml").write_text(rules.replace(old, new))
    (tmp_path / "alerts_test.yml").write_text((PROMETHEUS_DIR / "alerts_test.yml").read_text())
    result = run([promtool, "test", "rules", "alerts_test.yml"], tmp_path)
    assert result.returncode != 0, f"{change}: the unit tests still pass"


def test_the_issue_s_alerts_exist():
    names = {rule["alert"] for rule in alert_rules()}
    assert {
        "GatewayDown",
        "GatewayAbsent",
        "TritonDown",
        "TritonUnavailable",
        "TritonAbsent",
        "TritonModelNotReady",
        "ModelServesRandomWeights",
        "ModelWeightsDiffer",
        "GatewayHighErrorRatio",
        "GatewayLatencySLOBreach",
        "TritonQueueTimeHigh",
    } <= names


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_alert_links_its_runbook_entry(repo_root):
    """runbook_url names a heading of the README's Runbook section, one per alert."""
    readme = (repo_root / "README.md").read_text()
    runbook = readme.split("\n## Runbook\n", 1)
    assert len(runbook) == 2, "the README has no Runbook section"
    section = runbook[1].split("\n## ", 1)[0]
    anchors = {github_anchor(h) for h in re.findall(r"^#{3,4} (.+)$", section, re.M)}
    for rule in alert_rules():
        url = rule["annotations"].get("runbook_url", "")
        assert url == f"README.md#{rule['alert'].lower()}", f"{rule['alert']}: runbook_url {url!r}"
        assert url.split("#", 1)[1] in anchors, f"{rule['alert']}: no such entry in the README's runbook"


def test_queue_advice_does_not_lengthen_the_queue():
    rule = next(r for r in alert_rules() if r["alert"] == "TritonQueueTimeHigh")
    advice = rule["annotations"]["description"]
    # Triton's queue time includes the batcher's max_queue_delay: raising it lengthens the wait.
    assert not re.search(r"(?<!not )raise max_queue_delay", advice), advice
    assert "do not raise max_queue_delay" in advice


def test_the_rules_cite_files_that_exist(repo_root):
    for path in re.findall(r"((?:tests|deploy|service)/[\w/.-]+\.(?:py|yml|yaml))", ALERTS.read_text()):
        assert (repo_root / path).is_file(), f"alerts.yml cites {path}, which does not exist"


def test_every_alert_fires_and_stays_quiet_in_a_unit_test():
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    firing, quiet = set(), set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts never shown to fire"
    assert names - quiet == set(), "alerts never shown to stay quiet"


def test_every_alert_has_severity_and_text():
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), rule["alert"]
        assert rule.get("for"), f"{rule['alert']} fires on a single evaluation"


@pytest.mark.parametrize(
    "expression",
    [
        *alert_expressions(),
        *dashboard_expressions(),
        *dashboard_variable_queries(),
        *adapter_expressions('namespace="x"', "pod"),
    ],
    ids=lambda e: e.source,
)
def test_metric_names_are_exported_or_documented(expression):
    """Every name is one the gateway exports (service/metrics.py) or Triton documents."""
    names = metric_names(expression.expr)
    assert names, f"no metric in {expression.expr!r}"
    assert names <= KNOWN_METRICS, f"unknown metric names {sorted(names - KNOWN_METRICS)}"


def test_gateway_metric_names_match_the_gateway_code(repo_root):
    """The names the tests expect are the names service/metrics.py declares."""
    source = (repo_root / "service" / "metrics.py").read_text()
    for name in (
        "inception_gateway_requests",
        "inception_gateway_request_duration_seconds",
        "inception_gateway_stage_duration_seconds",
        "inception_gateway_errors",
        "inception_gateway_in_flight_requests",
        "inception_gateway_request_size_bytes",
        "inception_model_weights_info",
    ):
        assert f'"{name}"' in source, name


def test_scrape_jobs_match_the_rules_job_labels():
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["gateway"]["static_configs"][0]["targets"] == ["gateway:8080"]
    assert jobs["triton"]["static_configs"][0]["targets"] == ["triton:8002"]
    assert config["rule_files"] == ["alerts.yml"]
