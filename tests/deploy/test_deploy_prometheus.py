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
            sum by (job, model) (rate(inception_gateway_requests_total{job="inception-gateway"}[5m])) >= 0.1
""",
        "",
    ),
    "TritonDown pages while a new replica starts": (
        """        expr: up{job="inception-triton"} == 0
        for: 10m""",
        """        expr: up{job="inception-triton"} == 0
        for: 1m""",
    ),
    "a zeroed provenance series counts": (
        """(inception_model_weights_info{job="inception-gateway"} == 1)""",
        """(inception_model_weights_info{job="inception-gateway"})""",
    ),
    "the Watchdog stops firing": ("expr: vector(1)", "expr: vector(0) > 0"),
    "the Watchdog beats on while notifications fail": (
        ' unless on () ALERTS{alertname="AlertmanagerNotificationsFailing", alertstate="firing"}',
        "",
    ),
    "a receiver's failures page at once": (
        """rate(alertmanager_notifications_failed_total{job="alertmanager"}[5m])) > 0
        for: 5m""",
        """rate(alertmanager_notifications_failed_total{job="alertmanager"}[5m])) > 0
        for: 0m""",
    ),
    "another Alertmanager's failures page us": (
        'alertmanager_notifications_failed_total{job="alertmanager"}',
        "alertmanager_notifications_failed_total",
    ),
    "dropped alerts are ignored": (
        'rate(prometheus_notifications_dropped_total{job="prometheus"}[5m])) > 0',
        'rate(prometheus_notifications_dropped_total{job="prometheus"}[5m])) > 1',
    ),
    "another Prometheus' dropped alerts page us": (
        'prometheus_notifications_dropped_total{job="prometheus"}',
        "prometheus_notifications_dropped_total",
    ),
    "a failing model load pages at its first polls": (
        """(inception_gateway_model_load_failed{job="inception-gateway"}) == 1
        for: 10m""",
        """(inception_gateway_model_load_failed{job="inception-gateway"}) == 1
        for: 1m""",
    ),
    "one worker that has not seen the failure hides it": (
        'max by (job, model) (inception_gateway_model_load_failed{job="inception-gateway"})',
        'min by (job, model) (inception_gateway_model_load_failed{job="inception-gateway"})',
    ),
    "no absent() rule for Triton": (
        'expr: absent(up{job="inception-triton"})',
        'expr: up{job="inception-triton"} == -1',
    ),
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
        "Watchdog",
        "AlertmanagerNotificationsFailing",
        "PrometheusNotificationsDropped",
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
        "ModelLoadFailing",
    } <= names


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


RUNBOOK_TEMPLATE = "{{ $externalLabels.runbook_base_url }}#"
#: The heartbeat: always firing, unless our notifications are failing.
WATCHDOG_EXPR = (
    'vector(1) unless on () ALERTS{alertname="AlertmanagerNotificationsFailing", alertstate="firing"}'
)


def test_every_alert_links_its_runbook_entry(repo_root):
    """runbook_url is the one setting (the external label runbook_base_url) and the anchor
    of a heading of the README's Runbook section, one per alert."""
    readme = (repo_root / "README.md").read_text()
    runbook = readme.split("\n## Runbook\n", 1)
    assert len(runbook) == 2, "the README has no Runbook section"
    section = runbook[1].split("\n## ", 1)[0]
    anchors = {github_anchor(h) for h in re.findall(r"^#{3,4} (.+)$", section, re.M)}
    for rule in alert_rules():
        url = rule["annotations"].get("runbook_url", "")
        assert url == f"{RUNBOOK_TEMPLATE}{rule['alert'].lower()}", f"{rule['alert']}: runbook_url {url!r}"
        assert url.split("#", 1)[1] in anchors, f"{rule['alert']}: no such entry in the README's runbook"


def test_runbook_urls_render_absolute_in_every_unit_test():
    """Each promtool test group sets the external label as compose does, and every expected
    runbook_url is absolute: promtool compares the rendered annotation whole."""
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    for case in tests:
        base = case["external_labels"]["runbook_base_url"]
        assert re.fullmatch(r"https://[^#\s]+", base), base
        for check in case.get("alert_rule_test", []):
            for alert in check.get("exp_alerts", []):
                expected = f"{base}#{check['alertname'].lower()}"
                assert alert["exp_annotations"]["runbook_url"] == expected


def test_prometheus_expands_the_runbook_setting(repo_root):
    """compose hands RUNBOOK_BASE_URL to Prometheus, which expands it into the label."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert config["global"]["external_labels"]["runbook_base_url"] == "${RUNBOOK_BASE_URL}"
    prometheus = yaml.safe_load((repo_root / "docker-compose.yml").read_text())["services"]["prometheus"]
    assert "--enable-feature=expand-external-labels" in prometheus["command"]
    assert re.fullmatch(
        r"\$\{RUNBOOK_BASE_URL:-https://[^}#]+\}", prometheus["environment"]["RUNBOOK_BASE_URL"]
    )


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
    # The Watchdog too: it falls quiet while notifications fail, so that the switch pages.
    assert names - quiet == set(), "alerts never shown to stay quiet"


def test_every_alert_has_severity_and_text():
    """Every alert but the heartbeat pages or warns, and only after a `for:`; the Watchdog
    fires from the first evaluation, unless notifications are failing, and pages no one
    (its receiver is a dead man's switch)."""
    for rule in alert_rules():
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), rule["alert"]
        if rule["alert"] == "Watchdog":
            assert rule["expr"] == WATCHDOG_EXPR, rule["expr"]
            assert rule["labels"]["severity"] == "none" and "for" not in rule
            continue
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
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
        "inception_gateway_model_load_failed",
    ):
        assert f'"{name}"' in source, name


def test_scrape_jobs_match_the_rules_job_labels():
    """The jobs the rules select exist, named so that they cannot collide with another
    team's; each Triton replica is discovered through DNS as its own target."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["inception-gateway"]["static_configs"][0]["targets"] == ["gateway:8080"]
    (dns,) = jobs["inception-triton"]["dns_sd_configs"]
    assert dns["names"] == ["triton"] and dns["type"] == "A" and dns["port"] == 8002
    assert "static_configs" not in jobs["inception-triton"], "a static target hides the replicas"
    assert config["rule_files"] == ["alerts.yml"]
    selected = set(re.findall(r'job="([^"]+)"', ALERTS.read_text()))
    # Ours, and the alerting pipeline's own (the meta rules: compose's Alertmanager and
    # this Prometheus, not any other one it may scrape).
    assert selected == {"inception-gateway", "inception-triton", "alertmanager", "prometheus"}, selected
    assert selected <= set(jobs)
    assert (
        jobs["alertmanager"]["static_configs"][0]["targets"]
        == config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    ), "the meta rules watch another Alertmanager than the one alerts go to"
