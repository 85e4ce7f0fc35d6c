"""Alerts reach someone: the real Prometheus (Debian's binary) evaluates the shipped rules
and sends what fires to the real Alertmanager (Debian's prometheus-alertmanager), which
routes it with the shipped config to its webhook receiver: here a small HTTP server in
this test, standing where the operator's endpoint stands.

Only what cannot run here is changed: the addresses (compose service names become
loopback ports), the gateway target (a port where nothing listens, so the gateway is
down), the rules' `for:` (zero, so the test takes seconds, not minutes) and the
Alertmanager's group_wait (one second)."""

from __future__ import annotations

import http.server
import json
import queue
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import yaml

from embedded.processes import free_port, running

from .helpers import RUNBOOK_BASE_URL, require_tool, running_prometheus
from .promql_tools import ALERTS, DEPLOY

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
    import subprocess

    result = subprocess.run(
        [amtool, "check-config", str(ALERTMANAGER_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 receivers" in result.stdout


def test_amtool_routes_the_watchdog_to_the_heartbeat(amtool):
    """The heartbeat goes to its own receiver, and nothing else does."""
    import subprocess

    def route(*labels: str) -> str:
        result = subprocess.run(
            [amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}", *labels],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout.strip()

    assert route("alertname=Watchdog", "severity=none") == "heartbeat"
    assert route("alertname=GatewayDown", "severity=critical") == "operator-webhook"
    assert route("alertname=AlertmanagerNotificationsFailing", "severity=critical") == "operator-webhook"


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
    port, cluster = free_port(), free_port()
    command = [
        alertmanager_bin,
        f"--config.file={work / 'alertmanager.yml'}",
        f"--storage.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--cluster.listen-address=127.0.0.1:{cluster}",
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
    with running_prometheus(prometheus_bin, work, config) as url:
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
