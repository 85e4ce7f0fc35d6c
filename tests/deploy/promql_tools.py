"""Small PromQL helpers for the deployment tests: collect the expressions of the dashboard,
the alert rules and the prometheus-adapter rule, substitute Grafana's variables, and find
the vector selectors (metric names with their matchers) inside an expression.

This is a tokenizer, not a parser: Prometheus itself parses every expression in the live
test. It only has to find the selectors so that each one can be queried on its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import yaml

from ..helpers import ROOT

DEPLOY = ROOT / "deploy"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ADAPTER_VALUES = DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml"

#: The gateway's metrics (service/metrics.py), histograms with their series suffixes.
GATEWAY_METRICS = {
    "inception_gateway_requests_total",
    "inception_gateway_errors_total",
    "inception_gateway_in_flight_requests",
    "inception_model_weights_info",
    "inception_gateway_shed_total",
    "inception_gateway_model_load_failed",
    "inception_gateway_admission_limit_images",
    "inception_gateway_service_rate_images_per_second",
    *(
        f"{name}{suffix}"
        for name in (
            "inception_gateway_request_duration_seconds",
            "inception_gateway_stage_duration_seconds",
            "inception_gateway_request_size_bytes",
        )
        for suffix in ("_bucket", "_count", "_sum")
    ),
}
#: prometheus_client's process collector, Prometheus' own scrape metrics and alert
#: series, and what the alerting pipeline exports about itself (Prometheus' notifier,
#: Alertmanager's).
STANDARD_METRICS = {
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "up",
    "ALERTS",
    "prometheus_notifications_dropped_total",
    "alertmanager_notifications_failed_total",
}
#: The metric names Triton documents (docs/user_guide/metrics.md of Triton 2.51 / 24.10).
TRITON_DOCUMENTED = {
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_pending_request_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
    *(
        f"{name}{suffix}"
        for name in (
            "nv_inference_request_summary_us",
            "nv_inference_queue_summary_us",
            "nv_inference_compute_input_summary_us",
            "nv_inference_compute_infer_summary_us",
            "nv_inference_compute_output_summary_us",
        )
        for suffix in ("", "_count", "_sum")
    ),
    "nv_gpu_utilization",
    "nv_gpu_memory_total_bytes",
    "nv_gpu_memory_used_bytes",
    "nv_gpu_power_usage",
    "nv_gpu_power_limit",
    "nv_energy_consumption",
    "nv_cpu_utilization",
    "nv_cpu_memory_total_bytes",
    "nv_cpu_memory_used_bytes",
    "nv_pinned_memory_pool_total_bytes",
    "nv_pinned_memory_pool_used_bytes",
}
KNOWN_METRICS = GATEWAY_METRICS | STANDARD_METRICS | TRITON_DOCUMENTED
#: Exported only by a Triton that sees a GPU (DCGM): absent on the CPU test stack.
GPU_ONLY_PREFIX = ("nv_gpu_", "nv_energy_")

#: What Grafana's built-in variables become when the tests run an expression.
GRAFANA_BUILTINS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "${__rate_interval}": "1m",
    "${__interval}": "15s",
    "${__range}": "5m",
}

_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan", "atan2",
}  # fmt: skip
_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio",
}  # fmt: skip
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_TOKEN = re.compile(
    r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<braces>\{(?:[^{}"']|"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')*\})
  | (?P<brackets>\[[^\]]*\])
  | (?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)(?:[smhdwy]|ms)*)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<lparen>\()
  | (?P<rparen>\))
  | (?P<space>\s+)
  | (?P<other>.)
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class Expression:
    source: str  # where it comes from, for messages
    expr: str


def tokens(expr: str) -> list[tuple[str, str]]:
    return [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr) if m.lastgroup != "space"]


def selectors(expr: str) -> list[str]:
    """The vector selectors of `expr`, e.g. `rate(a{x="1"}[5m]) / b` -> ['a{x="1"}', 'b']."""
    toks = tokens(expr)
    found: list[str] = []
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else ("", "")
        if kind == "ident" and text.lower() in _GROUPING and nxt[0] == "lparen":
            depth, i = 0, i + 1  # skip the label list
            while i < len(toks):
                depth += {"lparen": 1, "rparen": -1}.get(toks[i][0], 0)
                i += 1
                if depth == 0:
                    break
            continue
        if kind == "ident" and (nxt[0] == "lparen" or text.lower() in _AGGREGATIONS):
            i += 1  # a function or an aggregation
            continue
        if kind == "ident" and text.lower() not in _KEYWORDS:
            if nxt[0] == "braces":
                found.append(text + nxt[1])
                i += 2
                continue
            found.append(text)
        elif kind == "braces":
            found.append(text)
        i += 1
    return found


def metric_names(expr: str) -> set[str]:
    names = set()
    for selector in selectors(expr):
        match = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", selector)
        if match:
            names.add(match.group())
        else:
            inner = re.search(r'__name__\s*=\s*"([^"]+)"', selector)
            if inner:
                names.add(inner.group(1))
    return names


def is_gpu_only(expr: str) -> bool:
    return any(name.startswith(GPU_ONLY_PREFIX) for name in metric_names(expr))


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's built-ins, then the dashboard variables ($name, ${name}, [[name]])."""
    for key, value in GRAFANA_BUILTINS.items():
        expr = expr.replace(key, value)
    for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(f"${{{name}}}", value).replace(f"[[{name}]]", value)
        expr = re.sub(rf"\${re.escape(name)}\b", lambda _m, v=value: v, expr)
    return expr


def load_dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def iter_panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_expressions() -> list[Expression]:
    out = []
    for name, dashboard in load_dashboards().items():
        for panel in iter_panels(dashboard.get("panels", [])):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append(
                        Expression(
                            f"{name} panel {panel.get('title')!r} {target.get('refId')}", target["expr"]
                        )
                    )
    return out


def dashboard_variable_queries() -> list[Expression]:
    """The PromQL inside `label_values(<selector>, label)` of query variables."""
    out = []
    for name, dashboard in load_dashboards().items():
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable.get("type") != "query":
                continue
            query = variable.get("query")
            query = query.get("query", "") if isinstance(query, dict) else query or ""
            match = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)\s*", query, re.S)
            assert match, f"{name} variable {variable['name']}: unsupported query {query!r}"
            out.append(Expression(f"{name} variable {variable['name']}", match.group(1)))
    return out


def alert_rules() -> list[dict]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def alert_expressions() -> list[Expression]:
    return [
        Expression(f"alert {rule.get('alert') or rule.get('record')}", rule["expr"]) for rule in alert_rules()
    ]


def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


def adapter_expressions(label_matchers: str, group_by: str) -> list[Expression]:
    """prometheus-adapter's metricsQuery templates, filled the way the adapter fills them."""
    out = []
    for rule in adapter_rules():
        query = rule["metricsQuery"].replace("<<.LabelMatchers>>", label_matchers)
        query = query.replace("<<.GroupBy>>", group_by)
        out.append(Expression(f"prometheus-adapter {rule['name']['as']}", query))
    return out
