"""Alerts reach someone: the real Prometheus (Debian's binary) evaluates the shipped rules
and sends what fires to the real Alertmanager (Debian's prometheus-alertmanager), which
routes it with the shipped config to its webhook receiver: here a small HTTP server in
this test, standing where the operator's endpoint stands.

Only what cannot run here is changed: the addresses (compose service names become
loopback ports), the gateway target (a port where nothing listens, so the gateway is
down), the rules' `for:` (zero, so the test takes seconds, not minutes) and the
Alertmanager's group_wait (one second).

amtool routes every alert by its labels, the compose ones through the shipped config and
the Kubernetes ones through a shared Alertmanager that routes by namespace. And when the
operator's receiver refuses everything, AlertmanagerNotificationsFailing cannot reach it
either: the Watchdog stops, and the heartbeat receiver hears nothing more (issue 25,
item 6)."""

from __future__ import annotations

import http.server
import json
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from embedded.processes import free_port, running

from .helpers import RUNBOOK_BASE_URL, require_tool, running_prometheus
from .k8s_rules import NAMESPACE
from .promql_tools import ALERTS, DEPLOY, alert_rules

pytestmark = pytest.mark.integration

ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"


@pytest.fixture(scope="module")
def alertmanager_bin() -> str:
    for name in ("prometheus-alertmanager", "alertmanager"):
        try:
            return require_tool(name, "Debian package prometheus-alertmanager")
        except pytest.skip.Exception:
            continue
    pytest.skip("Alertmanager is not installed (Debian package prometheus-alertmanager)")


@pytest.fixture(scope="module")
def amtool() -> str:
    return require_tool("amtool", "Debian package prometheus-alertmanager")


def test_amtool_checks_the_shipped_config(amtool):
    result = subprocess.run(
        [amtool, "check-config", str(ALERTMANAGER_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 receivers" in result.stdout


def amtool_route(amtool: str, config: Path, labels: dict[str, str]) -> str:
    """The receiver(s) `amtool config routes test` finds for an alert with `labels`."""
    matchers = [f"{key}={value}" for key, value in labels.items()]
    result = subprocess.run(
        [amtool, "config", "routes", "test", f"--config.file={config}", *matchers],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


def static_labels(rule: dict) -> dict[str, str]:
    """What Alertmanager routes an alert of `rule` by: its name and its rule's labels."""
    return {"alertname": rule["alert"], **rule.get("labels", {})}


def test_amtool_routes_the_watchdog_to_the_heartbeat(amtool):
    """The heartbeat goes to its own receiver, and nothing else does: amtool routes every
    alert of alerts.yml by its labels."""
    for rule in alert_rules():
        expected = "heartbeat" if rule["alert"] == "Watchdog" else "operator-webhook"
        assert amtool_route(amtool, ALERTMANAGER_CONFIG, static_labels(rule)) == expected, rule["alert"]


def test_amtool_routes_every_k8s_alert_to_us_in_a_shared_alertmanager(amtool, tmp_path):
    """A shared Alertmanager (kube-prometheus-stack's) with our routes nested under a
    `namespace` matcher, as prometheus-operator nests an AlertmanagerConfig of our
    namespace: every alert of the PrometheusRule reaches our receivers by its namespace
    label; the same alert from another namespace, or without the label, does not."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    shared = {
        "route": {
            "receiver": "platform-default",
            "group_by": ["alertname"],
            "routes": [{**config["route"], "matchers": [f'namespace="{NAMESPACE}"']}],
        },
        "receivers": [{"name": "platform-default", "webhook_configs": [{"url": "http://platform.invalid/"}]}]
        + config["receivers"],
    }
    path = tmp_path / "shared.yml"
    path.write_text(yaml.safe_dump(shared))
    groups = yaml.safe_load((DEPLOY / "k8s" / "prometheusrule.yaml").read_text())["spec"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert rules
    for rule in rules:
        labels = static_labels(rule)
        expected = "heartbeat" if rule["alert"] == "Watchdog" else "operator-webhook"
        assert amtool_route(amtool, path, labels) == expected, rule["alert"]
        assert amtool_route(amtool, path, {**labels, "namespace": "staging"}) == "platform-default"
        unlabelled = {k: v for k, v in labels.items() if k != "namespace"}
        assert amtool_route(amtool, path, unlabelled) == "platform-default", rule["alert"]


@pytest.fixture(scope="module")
def webhook() -> Iterator[tuple[str, queue.Queue[dict], list[dict]]]:
    """The receiver: records every notification Alertmanager POSTs (to be taken from the
    queue, and kept in the history)."""
    received: queue.Queue[dict] = queue.Queue()
    history: list[dict] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            notification = {"path": self.path, "body": json.loads(self.rfile.read(length))}
            history.append(notification)
            received.put(notification)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/alerts", received, history
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def alertmanager(alertmanager_bin, webhook, tmp_path_factory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("alertmanager")
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    receivers = {r["name"]: r for r in config["receivers"]}
    assert set(receivers) == {"operator-webhook", "heartbeat"}
    # Both receivers post to this test's server, each at the path it ships with.
    for receiver in receivers.values():
        (hook,) = receiver["webhook_configs"]
        path = hook["url"].rsplit("/", 1)[1]
        assert path in ("alerts", "heartbeat"), hook["url"]
        hook["url"] = webhook[0].rsplit("/", 1)[0] + "/" + path
    config["route"]["group_wait"] = "1s"
    (work / "alertmanager.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    command = [
        alertmanager_bin,
        f"--config.file={work / 'alertmanager.yml'}",
        f"--storage.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",  # no peers: no wait for gossip to settle before sending
    ]
    with running(command, f"http://127.0.0.1:{port}/-/ready", 60, log_path=work / "alertmanager.log"):
        yield f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def prometheus(prometheus_bin, alertmanager, tmp_path_factory) -> Iterator[str]:
    """The shipped prometheus.yml, its addresses made local, and the shipped rules."""
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (alerting,) = config["alerting"]["alertmanagers"]
    assert alerting["static_configs"] == [{"targets": ["alertmanager:9093"]}]
    alerting["static_configs"] = [{"targets": [alertmanager]}]
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    # Nothing listens at these ports: the gateway and the only Triton are down.
    config["scrape_configs"] = [
        {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{free_port()}"]}]}
        for job in ("inception-gateway", "inception-triton")
    ]
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    (work / "alerts.yml").write_text(yaml.safe_dump(rules))
    config["rule_files"] = [str(work / "alerts.yml")]
    # Firing alerts are sent again every second, not every minute: the Watchdog fires at the
    # first evaluation, before Prometheus has found its Alertmanager, and waited for that.
    resend = ["--rules.alert.resend-delay=1s"]
    with running_prometheus(prometheus_bin, work, config, extra_args=resend) as url:
        yield url


def test_a_firing_rule_reaches_the_webhook(prometheus, webhook):
    """GatewayDown fires in Prometheus and arrives at the receiver, with its runbook."""
    _, received, _ = webhook
    deadline = time.monotonic() + 90
    notifications: list[dict] = []
    while time.monotonic() < deadline:
        try:
            notifications.append(received.get(timeout=1))
        except queue.Empty:
            continue
        alerts = [a for n in notifications for a in n["body"]["alerts"]]
        if any(a["labels"]["alertname"] == "GatewayDown" for a in alerts):
            break
    else:
        active = httpx.get(f"{prometheus}/api/v1/alertmanagers", timeout=10).json()
        pytest.fail(f"no GatewayDown notification in {notifications}; Prometheus' alertmanagers: {active}")
    gateway_down = next(
        (n, a)
        for n in notifications
        for a in n["body"]["alerts"]
        if a["labels"]["alertname"] == "GatewayDown"
    )
    notification, alert = gateway_down
    assert notification["path"] == "/alerts"
    assert notification["body"]["receiver"] == "operator-webhook"
    assert alert["status"] == "firing"
    assert alert["labels"]["severity"] == "critical" and alert["labels"]["job"] == "inception-gateway"
    assert alert["annotations"]["runbook_url"] == f"{RUNBOOK_BASE_URL}#gatewaydown"
    assert alert["annotations"]["summary"].startswith("Gateway 127.0.0.1:")


def test_an_outage_pages_once(prometheus, alertmanager, webhook):
    """The only Triton is down: TritonUnavailable pages, and the shipped inhibition keeps
    TritonDown (which fires too) from paging beside it."""
    deadline = time.monotonic() + 60
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        alerts = httpx.get(f"http://{alertmanager}/api/v2/alerts", timeout=10).json()
        states = {a["labels"]["alertname"]: a["status"]["state"] for a in alerts}
        if states.get("TritonUnavailable") == "active" and states.get("TritonDown") == "suppressed":
            break
        time.sleep(1)
    assert states.get("TritonUnavailable") == "active", states
    assert states.get("TritonDown") == "suppressed", states
    time.sleep(3)  # group_wait is 1 s: whatever was to be sent has been
    _, received, _ = webhook
    sent = []
    while not received.empty():
        sent += [a["labels"]["alertname"] for a in received.get()["body"]["alerts"]]
    assert "TritonDown" not in sent, sent


def test_prometheus_knows_its_alertmanager(prometheus, alertmanager):
    data = httpx.get(f"{prometheus}/api/v1/alertmanagers", timeout=10).json()["data"]
    urls = [a["url"] for a in data["activeAlertmanagers"]]
    assert urls == [f"http://{alertmanager}/api/v2/alerts"], data


def test_the_watchdog_reaches_the_heartbeat_receiver(prometheus, webhook):
    """The dead man's switch gets its heartbeat, alone, through the shipped route."""
    _, _, history = webhook
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        beats = [n for n in list(history) if n["path"] == "/heartbeat"]
        if beats:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no heartbeat among {[n['path'] for n in history]}")
    body = beats[0]["body"]
    assert body["receiver"] == "heartbeat"
    assert [a["labels"]["alertname"] for a in body["alerts"]] == ["Watchdog"]
    assert body["alerts"][0]["annotations"]["runbook_url"] == f"{RUNBOOK_BASE_URL}#watchdog"
    alerts = [a for n in list(history) if n["path"] == "/alerts" for a in n["body"]["alerts"]]
    assert all(a["labels"]["alertname"] != "Watchdog" for a in alerts)


# ----------------------------------------------- a failing receiver stops the heartbeat


@pytest.fixture(scope="module")
def refusing_webhook() -> Iterator[tuple[str, list[dict]]]:
    """A receiver whose alert endpoint refuses every notification (403: a revoked key)
    from the first heartbeat on, while its heartbeat endpoint, the dead man's switch,
    accepts them: the pipeline is seen working before the receiver breaks."""
    history: list[dict] = []
    broken = threading.Event()

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            history.append({"path": self.path, "body": json.loads(self.rfile.read(length))})
            if self.path == "/heartbeat":
                broken.set()
            self.send_response(403 if self.path != "/heartbeat" and broken.is_set() else 200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", history
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def failing_pipeline(alertmanager_bin, prometheus_bin, refusing_webhook, tmp_path_factory) -> Iterator[str]:
    """The shipped Alertmanager config and rules, with the operator's receiver refusing.
    Beside the usual changes (addresses, `for: 0s`), the heartbeat route repeats every
    second instead of every minute, so that its stopping shows in seconds; the other
    alerts wait 5 s for their group (group_wait), so that the first heartbeat comes before
    the first refusal, and an alert that joins a group is sent a second later, not five
    minutes (group_interval); Prometheus sends its firing alerts again every second, not every
    minute (an alert that fires before it has found its Alertmanager waits for that), and
    scrapes this Alertmanager as compose's does (job `alertmanager`)."""
    work = tmp_path_factory.mktemp("failing")
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    for receiver in config["receivers"]:
        (hook,) = receiver["webhook_configs"]
        hook["url"] = refusing_webhook[0] + "/" + hook["url"].rsplit("/", 1)[1]
    config["route"].update(group_wait="5s", group_interval="1s")
    (heartbeat,) = [r for r in config["route"]["routes"] if r["receiver"] == "heartbeat"]
    heartbeat.update(group_interval="1s", repeat_interval="1s")
    (work / "alertmanager.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    command = [
        alertmanager_bin,
        f"--config.file={work / 'alertmanager.yml'}",
        f"--storage.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",  # no peers: no wait for gossip to settle before sending
    ]
    with running(command, f"http://127.0.0.1:{port}/-/ready", 60, log_path=work / "alertmanager.log"):
        prometheus_config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        prometheus_config["alerting"]["alertmanagers"][0]["static_configs"] = [
            {"targets": [f"127.0.0.1:{port}"]}
        ]
        prometheus_config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        prometheus_config["scrape_configs"] = [
            # The gateway is down: GatewayDown goes to the refusing receiver.
            {"job_name": "inception-gateway", "static_configs": [{"targets": [f"127.0.0.1:{free_port()}"]}]},
            {"job_name": "alertmanager", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]},
        ]
        rules = yaml.safe_load(ALERTS.read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                rule["for"] = "0s"
        (work / "alerts.yml").write_text(yaml.safe_dump(rules))
        prometheus_config["rule_files"] = [str(work / "alerts.yml")]
        resend = ["--rules.alert.resend-delay=1s"]
        with running_prometheus(prometheus_bin, work, prometheus_config, extra_args=resend) as url:
            yield url


def firing(prometheus: str) -> set[str]:
    alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}


def test_a_failing_receiver_stops_the_heartbeat(failing_pipeline, refusing_webhook):
    """The operator's receiver refuses: AlertmanagerNotificationsFailing fires, but its own
    notification goes to that same receiver and is refused too. The page still comes: the
    Watchdog stops, and the dead man's switch hears no more heartbeats."""
    _, history = refusing_webhook
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not any(n["path"] == "/heartbeat" for n in list(history)):
        time.sleep(0.5)
    assert any(n["path"] == "/heartbeat" for n in list(history)), "the heartbeat never started"
    states: set[str] = set()
    while time.monotonic() < deadline:
        states = firing(failing_pipeline)
        if "AlertmanagerNotificationsFailing" in states and "Watchdog" not in states:
            break
        time.sleep(0.5)
    assert "AlertmanagerNotificationsFailing" in states and "Watchdog" not in states, states
    refused: list[str] = []
    while time.monotonic() < deadline:  # the page about the gateway was sent, and refused
        refused = [
            a["labels"]["alertname"]
            for n in list(history)
            if n["path"] == "/alerts"
            for a in n["body"]["alerts"]
        ]
        if "GatewayDown" in refused:
            break
        time.sleep(0.5)
    assert "GatewayDown" in refused, refused
    # Prometheus tells Alertmanager the Watchdog resolved; give that a few seconds, then
    # the heartbeat (every second until now) must stay silent.
    time.sleep(4)
    last = len([n for n in list(history) if n["path"] == "/heartbeat"])
    time.sleep(5)
    beats = [n for n in list(history) if n["path"] == "/heartbeat"]
    assert len(beats) == last, f"{len(beats) - last} heartbeats after the Watchdog stopped"
    assert "Watchdog" not in firing(failing_pipeline)
