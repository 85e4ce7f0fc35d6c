"""Grafana provisioning and dashboards, checked the way Grafana loads them: no Grafana server
can run here, so the dashboard JSON is validated against the JSON schema of the dashboard
model of the Grafana release the compose file pins (schemas/, generated from
@grafana/schema's types of that release), and the references between the files are
followed by hand."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from .promql_tools import DASHBOARDS, DEPLOY, ROOT, iter_panels, load_dashboards, metric_names

SCHEMAS = Path(__file__).parent / "schemas"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
#: Grafana release -> the dashboard schemaVersion it writes (and our schema file for it).
SCHEMA_VERSIONS = {"11.3.0": 39}


def datasources() -> list[dict]:
    out = []
    for path in sorted((PROVISIONING / "datasources").glob("*.y*ml")):
        document = yaml.safe_load(path.read_text())
        assert document["apiVersion"] == 1, path
        out.extend(document["datasources"])
    return out


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


#: Keys of Grafana's "export for sharing externally" around the dashboard model: the import
#: reads them, the dashboard model (and so its schema) does not have them.
EXPORT_ENVELOPE = ("__inputs", "__requires", "__elements")


def without_export_envelope(dashboard: dict) -> dict:
    return {k: v for k, v in dashboard.items() if k not in EXPORT_ENVELOPE}


def validator(schema_version: int) -> jsonschema.Draft7Validator:
    path = SCHEMAS / f"grafana-dashboard-v{schema_version}.schema.json"
    assert path.is_file(), f"no schema for dashboard schemaVersion {schema_version}"
    schema = json.loads(path.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


DASHBOARD_FILES = sorted(DASHBOARDS.glob("*.json"))


def test_there_is_a_dashboard():
    assert DASHBOARD_FILES


def test_the_pinned_grafana_matches_the_schema_version():
    image = compose()["services"]["grafana"]["image"]
    release = image.rsplit(":", 1)[1]
    assert release in SCHEMA_VERSIONS, f"no dashboard schema known for Grafana {release}"
    for name, dashboard in load_dashboards().items():
        assert dashboard["schemaVersion"] == SCHEMA_VERSIONS[release], name


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_dashboard_is_valid_for_its_schema_version(path):
    dashboard = without_export_envelope(json.loads(path.read_text()))
    errors = sorted(validator(dashboard["schemaVersion"]).iter_errors(dashboard), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:20])


def test_schema_rejects_broken_dashboards():
    """The schema is not vacuous: a misspelt panel key, a bad gridPos and a wrong
    thresholds mode are each rejected."""
    dashboard = without_export_envelope(next(iter(load_dashboards().values())))
    check = validator(dashboard["schemaVersion"])
    panel_index = next(i for i, p in enumerate(dashboard["panels"]) if p["type"] != "row")
    mutations = [
        lambda d: d["panels"][panel_index].update({"datasoruce": d["panels"][panel_index]["datasource"]}),
        lambda d: d["panels"][panel_index]["gridPos"].pop("w"),
        lambda d: d["panels"][panel_index]["fieldConfig"]["defaults"]["thresholds"].update(
            {"mode": "relative"}
        ),
        lambda d: d.pop("schemaVersion"),
    ]
    for mutate in mutations:
        broken = copy.deepcopy(dashboard)
        mutate(broken)
        assert not check.is_valid(broken)


def test_datasource_provisioning():
    sources = datasources()
    assert len({s["uid"] for s in sources}) == len(sources)
    prometheus = [s for s in sources if s["type"] == "prometheus"]
    assert len(prometheus) == 1
    source = prometheus[0]
    assert source["access"] == "proxy"
    # The URL names the compose service and its port.
    match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", source["url"])
    assert match, source["url"]
    assert match.group(1) in compose()["services"]
    assert match.group(2) == "9090"


#: The uid kube-prometheus-stack gives its Prometheus datasource (its Grafana's
#: provisioned datasource); the compose stack provisions the same uid.
KUBE_PROMETHEUS_STACK_UID = "prometheus"


def datasource_variable(dashboard: dict) -> dict:
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    return variable


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_every_panel_and_query_uses_the_datasource_variable(path):
    """Every query goes through the dashboard's `datasource` variable (of type prometheus),
    whose default is a uid that the compose stack provisions and kube-prometheus-stack has:
    no query falls back to whatever datasource happens to be the default."""
    types = {s["uid"]: s["type"] for s in datasources()}
    dashboard = json.loads(path.read_text())
    variable = datasource_variable(dashboard)
    assert variable["query"] == "prometheus"
    assert variable["current"]["value"] == KUBE_PROMETHEUS_STACK_UID
    assert types.get(KUBE_PROMETHEUS_STACK_UID) == "prometheus", "compose provisions another uid"
    expected = {"type": "prometheus", "uid": f"${{{variable['name']}}}"}
    refs = []
    for panel in iter_panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        refs.append((f"panel {panel['title']}", panel.get("datasource")))
        for target in panel.get("targets", []):
            refs.append((f"panel {panel['title']} target {target['refId']}", target.get("datasource")))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] == "query":
            refs.append((f"variable {variable['name']}", variable.get("datasource")))
    assert refs
    for where, ref in refs:
        assert ref == expected, f"{where}: datasource {ref!r}, not the variable"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_dashboard_declares_its_inputs_for_import(path):
    """`__inputs` and `__requires`, as Grafana's export writes them, so the import dialog
    of another Grafana (kube-prometheus-stack's) asks for the Prometheus datasource."""
    dashboard = json.loads(path.read_text())
    inputs = dashboard["__inputs"]
    assert [(i["type"], i["pluginId"]) for i in inputs] == [("datasource", "prometheus")]
    required = {(r["type"], r["id"]) for r in dashboard["__requires"]}
    assert ("datasource", "prometheus") in required
    panel_types = {p["type"] for p in iter_panels(dashboard["panels"])} - {"row"}
    assert {("panel", t) for t in panel_types} <= required
    grafana = next(r for r in dashboard["__requires"] if r["id"] == "grafana")
    assert grafana["version"] == compose()["services"]["grafana"]["image"].rsplit(":", 1)[1]


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_panels_have_units_thresholds_ids_and_fit_the_grid(path):
    dashboard = json.loads(path.read_text())
    ids = []
    cells = set()
    for panel in iter_panels(dashboard["panels"]):
        ids.append(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"panel {panel['title']!r} overlaps another"
                cells.add((x, y))
        if panel["type"] == "row":
            continue
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults.get("unit"), f"panel {panel['title']!r} has no unit"
        steps = defaults["thresholds"]["steps"]
        assert steps and steps[0]["value"] is None, f"panel {panel['title']!r}: thresholds need a base step"
        values = [s["value"] for s in steps[1:]]
        assert values == sorted(values), f"panel {panel['title']!r}: thresholds out of order"
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs)
    assert len(set(ids)) == len(ids), "duplicate panel ids"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_model_variable_filters_every_per_model_query(path):
    dashboard = json.loads(path.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    model = variables["model"]
    assert model["includeAll"] and model["multi"] and model["allValue"] == ".*"
    per_model = re.compile(r"^(inception_gateway_(?!in_flight)|nv_inference_)")
    for panel in iter_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            if panel["title"] == "Triton models loaded":
                continue  # counts every model on purpose
            if any(per_model.match(name) for name in metric_names(expr)):
                assert 'model=~"$model"' in expr, f"panel {panel['title']!r} ignores $model: {expr}"


def test_dashboard_covers_what_the_issue_asks_for():
    exprs = " ".join(
        t["expr"]
        for d in load_dashboards().values()
        for p in iter_panels(d["panels"])
        for t in p.get("targets", [])
    )
    for needle in (
        "inception_gateway_requests_total",  # request rate by status, error ratio
        'status=~"5..|429"',
        "histogram_quantile(0.5, sum by (le, model) (rate(inception_gateway_request_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (le, model) (rate(inception_gateway_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le, model) (rate(inception_gateway_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(inception_gateway_request_duration_seconds_bucket",
        "histogram_quantile(0.5, sum by (le, stage) (rate(inception_gateway_stage_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (le, stage) (rate(inception_gateway_stage_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le, stage) (rate(inception_gateway_stage_duration_seconds_bucket",
        "inception_gateway_in_flight_requests",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "rate(nv_inference_count{",  # average batch size ...
        "rate(nv_inference_exec_count{",  # ... = inferences / executions
        "nv_gpu_utilization",
        "nv_gpu_memory_used_bytes",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        # shed requests, admission limits, weights provenance, each Triton replica's share
        "rate(inception_gateway_shed_total{",
        "inception_gateway_admission_limit_images{",
        "(inception_model_weights_info{",
        "sum by (instance) (rate(nv_inference_request_success{",
    ):
        assert needle in exprs, needle


def test_dashboard_provider_reads_the_mounted_folder():
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "dashboards.yml").read_text())
    assert providers["apiVersion"] == 1
    paths = {p["options"]["path"] for p in providers["providers"] if p["type"] == "file"}
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2][::-1] for v in grafana["volumes"] if v.startswith("./"))
    assert paths, "no file provider"
    for path in paths:
        assert mounts.get(path) == "./deploy/grafana/dashboards", (
            f"{path} is not where the dashboards are mounted"
        )
    assert mounts.get("/etc/grafana/provisioning") == "./deploy/grafana/provisioning"


def test_no_password_in_grafana_files():
    for path in (DEPLOY / "grafana").rglob("*"):
        if path.is_file():
            text = path.read_text().lower()
            assert "admin_password" not in text and "password:" not in text, path
