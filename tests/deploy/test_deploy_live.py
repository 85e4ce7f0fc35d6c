"""The dashboards and alert rules against live metrics.

A real Prometheus (Debian's binary) scrapes a real gateway (uvicorn with two workers and
multiprocess metrics, as the image runs it) and the session's real tritonserver (the
``triton`` fixture of tests/conftest.py: the CPU stack from the nvidia-pytriton wheel)
after a short burst of classify requests. Then every PromQL expression of the dashboards
(with their variables substituted), of the alert rules and of the prometheus-adapter rule
goes through Prometheus' HTTP API:

- a dashboard expression must return data, for "All" models and for single models;
- an alert expression must parse, and each of its selectors must return data (a healthy
  stack fires no alert, so the whole expression is rightly empty);
- expressions over GPU metrics (nv_gpu_*), which a CPU Triton does not export, must parse,
  and their names must be ones Triton documents.

Prometheus also scrapes itself and a real Alertmanager (Debian's), whose notification
metrics the alerting pipeline's own alerts select. The gateway runs with admission control
held at one image in flight per model and worker, and the burst ends with concurrent
requests, so that some are shed: the shed panel has data to show.

A misspelt metric or label name in a panel or rule makes this fail.
"""

from __future__ import annotations

import io
import math
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from embedded.gateway import Gateway
from embedded.processes import free_port, running

from .helpers import require_tool, running_prometheus
from .promql_tools import (
    ALERTS,
    DEPLOY,
    TRITON_DOCUMENTED,
    adapter_expressions,
    alert_expressions,
    dashboard_expressions,
    dashboard_variable_queries,
    is_gpu_only,
    metric_names,
    selectors,
    substitute,
)

pytestmark = pytest.mark.integration

#: The values the dashboards' $model variable is tried with: All, a network, the ensemble.
MODEL_VALUES = (".*", "inception_v4", "inception_ensemble")
BURST = {"inception_v4": 4, "inception_ensemble": 2}


@pytest.fixture(scope="module")
def gateway(triton, tmp_path_factory) -> Iterator[str]:
    """The gateway as the image runs it: uvicorn, two workers, multiprocess metrics;
    admission control kept at one image in flight per model and worker (an objective no
    answer meets), so that concurrent requests are shed."""
    work = tmp_path_factory.mktemp("gateway")
    gateway = Gateway(
        triton.grpc_url,
        work / "gateway.log",
        workers=2,
        env={
            "GATEWAY_API_KEYS": "",
            "GATEWAY_ADMISSION_INITIAL_LIMIT": "1",
            "GATEWAY_ADMISSION_MIN_LIMIT": "1",
            "GATEWAY_LATENCY_TARGET_S": "0.001",
        },
        multiproc_dir=work / "metrics",
    )
    try:
        gateway.start().wait("/readyz", timeout=180)
        yield f"127.0.0.1:{gateway.port}"
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory) -> Iterator[str]:
    """Debian's Alertmanager with the shipped config: its metrics are scraped."""
    binary = require_tool("prometheus-alertmanager", "Debian package prometheus-alertmanager")
    work = tmp_path_factory.mktemp("alertmanager")
    port = free_port()
    command = [
        binary,
        f"--config.file={DEPLOY / 'alertmanager' / 'alertmanager.yml'}",
        f"--storage.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",  # no peers: no wait for gossip to settle
    ]
    with running(command, f"http://127.0.0.1:{port}/-/ready", 60, log_path=work / "alertmanager.log"):
        yield f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def prometheus(prometheus_bin, gateway, triton, alertmanager, tmp_path_factory) -> Iterator[str]:
    """The shipped job names; Prometheus scrapes itself too, as compose's does."""
    work = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {
            "scrape_interval": "1s",
            "evaluation_interval": "1s",
            "external_labels": {"runbook_base_url": "${RUNBOOK_BASE_URL}"},
        },
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "inception-gateway", "static_configs": [{"targets": [gateway]}]},
            {"job_name": "inception-triton", "static_configs": [{"targets": [triton.metrics_url]}]},
            {"job_name": "alertmanager", "static_configs": [{"targets": [alertmanager]}]},
        ],
    }
    with running_prometheus(prometheus_bin, work, config, scrape_self=True) as url:
        yield url


def jpeg() -> bytes:
    from PIL import Image

    try:
        from skimage import data

        image = Image.fromarray(data.chelsea())
    except ImportError:
        image = Image.linear_gradient("L").convert("RGB").resize((320, 240))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def query(prometheus: str, expr: str) -> dict:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=30)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (
        f"{expr}\n-> {body.get('error', body)}"
    )
    return body["data"]


def scalar_sum(prometheus: str, expr: str) -> float:
    result = query(prometheus, expr)["result"]
    return float(result[0]["value"][1]) if result else 0.0


@pytest.fixture(scope="module")
def scraped(prometheus, gateway) -> str:
    """The burst is sent and Prometheus has scraped its effects."""
    body = jpeg()
    headers = {"Content-Type": "image/jpeg"}
    url = f"http://{gateway}/v1/classify"

    answers = []

    def classify(model: str, data: bytes = body) -> int:
        response = httpx.post(url, params={"model": model}, content=data, headers=headers, timeout=120)
        answers.append(f"{model}: {response.status_code} {response.text[:300]}")
        return response.status_code

    def wait_seen(expected: int, v4: int) -> None:
        deadline = time.monotonic() + 60
        seen = triton = 0.0
        while time.monotonic() < deadline:
            seen = scalar_sum(prometheus, 'sum(inception_gateway_requests_total{job="inception-gateway"})')
            triton = scalar_sum(
                prometheus, 'sum(nv_inference_request_success{job="inception-triton", model="inception_v4"})'
            )
            if seen >= expected and triton >= v4:
                return
            time.sleep(0.5)
        pytest.fail(f"Prometheus saw {seen} of {expected} gateway requests and {triton} Triton inferences")

    # Two rounds: a labelled series appears at its first request, so rate() has a starting
    # point only if Prometheus scrapes it between the rounds. Each round sends every model
    # and a bad request per model (for the error panels), one at a time: admission control
    # admits one image per model and worker, and these must all be answered.
    rounds = [list(BURST), [m for m, n in BURST.items() for _ in range(n - 1)]]
    sent = v4 = 0
    for i, round_jobs in enumerate(rounds):
        with ThreadPoolExecutor(max_workers=1) as pool:
            statuses = list(pool.map(classify, round_jobs))
        assert statuses == [200] * len(round_jobs), answers
        bad = [classify(model, b"not an image at all") for model in BURST]
        assert all(400 <= s < 500 for s in bad), answers
        sent += len(round_jobs) + len(bad)
        v4 += round_jobs.count("inception_v4")
        wait_seen(sent, v4)
        time.sleep(2.5 if i == 0 else 2)  # a scrape after each round's last change, for rate()
    shed_twice(prometheus, classify)
    return prometheus


def shed_twice(prometheus: str, classify) -> None:
    """Concurrent requests past the admission limit until some of each model of the burst
    are shed (503), then again after a scrape, so that the shed counter has a rate for
    every model. Answers are 200 or 503, nothing else."""
    for _ in range(2):
        before = {
            m: scalar_sum(prometheus, f'sum(inception_gateway_shed_total{{model="{m}"}})') for m in BURST
        }
        for model in BURST:
            for _attempt in range(5):
                with ThreadPoolExecutor(max_workers=6) as pool:
                    statuses = list(pool.map(classify, [model] * 6))
                assert set(statuses) <= {200, 503}, statuses
                if 503 in statuses:
                    break
            else:
                pytest.fail(f"six concurrent {model} requests at an admission limit of one: none was shed")
        deadline = time.monotonic() + 30
        for model, count in before.items():
            selector = f'sum(inception_gateway_shed_total{{model="{model}"}})'
            while scalar_sum(prometheus, selector) <= count:
                assert time.monotonic() < deadline, f"Prometheus never saw {model}'s shed requests"
                time.sleep(0.5)
        time.sleep(2.5)


def finite(data: dict) -> bool:
    values = [float(s["value"][1]) for s in data["result"]] if data["resultType"] == "vector" else []
    return any(math.isfinite(v) for v in values)


DASHBOARD = dashboard_expressions()


@pytest.mark.parametrize(
    "expression", [e for e in DASHBOARD if not is_gpu_only(e.expr)], ids=lambda e: e.source
)  # GPU metrics: test_gpu_expressions_parse
def test_dashboard_expression_returns_data(scraped, expression):
    for model in MODEL_VALUES:
        expr = substitute(expression.expr, {"model": model})
        assert "$" not in expr, f"unsubstituted variable in {expr}"
        data = query(scraped, expr)
        assert data["result"], f"$model={model}: no data for {expr}"
        if model == ".*":
            assert finite(data), f"only NaN/Inf for {expr}: {data['result']}"


def test_gpu_expressions_parse(scraped):
    gpu = [e for e in DASHBOARD + alert_expressions() if is_gpu_only(e.expr)]
    assert gpu, "the dashboard shows no GPU metric"
    for expression in gpu:
        names = {n for n in metric_names(expression.expr) if n.startswith("nv_")}
        assert names <= TRITON_DOCUMENTED, f"{expression.source}: {sorted(names - TRITON_DOCUMENTED)}"
        query(scraped, substitute(expression.expr, {"model": ".*"}))  # parses (raises otherwise)


@pytest.mark.parametrize("expression", dashboard_variable_queries(), ids=lambda e: e.source)
def test_variable_query_lists_the_models(scraped, expression):
    data = query(scraped, expression.expr)
    models = {s["metric"].get("model") for s in data["result"]}
    assert set(BURST) <= models, models


MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")\s*,?')


def selects_live_series(prometheus: str, selector: str) -> bool:
    """The selector returns data; or, where it filters on a label's value that the healthy
    stack does not have yet (no 5xx answers: `status=~"5.."`), the selector without that
    one matcher returns series that do carry the label, so no name is misspelt."""
    if query(prometheus, selector)["result"]:
        return True
    name, _, body = selector.partition("{")
    matchers = MATCHER.findall(body.rstrip("}"))
    for i, (label, _op, _value) in enumerate(matchers):
        rest = ", ".join(f"{lbl}{op}{val}" for j, (lbl, op, val) in enumerate(matchers) if j != i)
        result = query(prometheus, f"{name}{{{rest}}}")["result"]
        if result and all(label in series["metric"] for series in result):
            return True
    return False


@pytest.mark.parametrize("expression", alert_expressions(), ids=lambda e: e.source)
def test_alert_expression_parses_and_selects_live_series(scraped, expression):
    data = query(scraped, expression.expr)
    if expression.source == "alert Watchdog":
        assert data["result"], "the Watchdog does not fire"  # over no metric: it always fires
        return
    found = selectors(expression.expr)
    assert found, expression.expr
    for selector in found:
        assert selects_live_series(scraped, selector), f"{expression.source}: {selector} selects nothing"


def test_a_misspelt_selector_is_caught(scraped):
    assert selects_live_series(
        scraped, 'inception_gateway_requests_total{job="inception-gateway", status=~"5..|429"}'
    )
    assert not selects_live_series(scraped, 'inception_gateway_request_total{job="inception-gateway"}')
    assert not selects_live_series(
        scraped, 'inception_gateway_requests_total{job="inception-gateway", stauts=~"5.."}'
    )
    assert not selects_live_series(
        scraped, 'nv_inference_queue_duration_us{job="inception-triton", modle="inception_v4"}'
    )


def test_alert_rules_are_loaded_and_healthy(scraped):
    groups = httpx.get(f"{scraped}/api/v1/rules", timeout=30).json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == len(alert_expressions())
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"


def test_runbook_urls_are_absolute_in_firing_alerts(scraped):
    """The Watchdog fires in the real Prometheus with its runbook_url made absolute from
    the external label (expanded from RUNBOOK_BASE_URL, as compose runs it)."""
    from .helpers import RUNBOOK_BASE_URL

    alerts = httpx.get(f"{scraped}/api/v1/alerts", timeout=30).json()["data"]["alerts"]
    watchdog = [a for a in alerts if a["labels"]["alertname"] == "Watchdog"]
    assert watchdog, alerts
    assert watchdog[0]["annotations"]["runbook_url"] == f"{RUNBOOK_BASE_URL}#watchdog"


def test_no_availability_alert_fires_on_a_healthy_stack(scraped):
    for name in (
        "GatewayDown",
        "GatewayAbsent",
        "TritonDown",
        "TritonUnavailable",
        "TritonAbsent",
        "TritonModelNotReady",
        "ModelWeightsDiffer",
        "AlertmanagerNotificationsFailing",
        "PrometheusNotificationsDropped",
        "ModelLoadFailing",
    ):
        alert = next(e for e in alert_expressions() if e.source == f"alert {name}")
        assert query(scraped, alert.expr)["result"] == [], name


@pytest.mark.parametrize(
    "expression", adapter_expressions('job="inception-triton"', "instance"), ids=lambda e: e.source
)
def test_prometheus_adapter_query_returns_data(scraped, expression):
    data = query(scraped, expression.expr)
    assert data["result"] and finite(data), data
