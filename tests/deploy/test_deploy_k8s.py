"""Kubernetes manifests: `kubectl kustomize` builds them, kubernetes-validate validates the
built objects offline against current Kubernetes versions, and the references between them
(selectors, ports, the autoscalers' metrics, probes) are followed by hand.

PodMonitor is a CRD of prometheus-operator: kubernetes-validate carries no schema for it and
none can be fetched here, so it is checked by hand against the fields prometheus-operator
documents, and against the pods it selects.
"""

from __future__ import annotations

import subprocess

import pytest
import yaml

from .helpers import find_tool
from .promql_tools import DEPLOY, adapter_rules

K8S = DEPLOY / "k8s"
SERVED_MODELS = ("inception_v4", "inception_resnet_v1", "inception_resnet_v2", "inception_ensemble")
#: The oldest and newest Kubernetes versions the manifests are validated against.
VERSIONS = ("1.30.0", None)  # None: the newest kubernetes-validate knows


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    kubectl = find_tool("kubectl")
    kustomize = find_tool("kustomize")
    if kubectl:
        cmd = [kubectl, "kustomize", str(K8S)]
    elif kustomize:
        cmd = [kustomize, "build", str(K8S)]
    else:
        pytest.skip("neither kubectl nor kustomize is installed")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def test_kustomize_builds_everything(objects):
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {
        ("Namespace", "inception-serving"),
        ("Deployment", "triton"),
        ("Deployment", "gateway"),
        ("Service", "triton"),
        ("Service", "triton-headless"),
        ("Service", "gateway"),
        ("PodDisruptionBudget", "triton"),
        ("PodDisruptionBudget", "gateway"),
        ("HorizontalPodAutoscaler", "gateway"),
        ("HorizontalPodAutoscaler", "triton"),
        ("PodMonitor", "gateway"),
        ("PodMonitor", "triton"),
    } <= kinds
    for o in objects:
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == "inception-serving", o["metadata"]["name"]


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v or "newest")
def test_manifests_validate_offline(objects, version):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="PyPI package kubernetes-validate"
    )
    from kubernetes_validate.utils import latest_version

    target = version or latest_version()
    validated = 0
    for o in objects:
        if o["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: see test_podmonitors_select_real_pods_and_ports
        kubernetes_validate.validate(o, target, strict=True)
        validated += 1
    assert validated == len(objects) - 3


def test_validation_rejects_a_broken_manifest(objects):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="PyPI package kubernetes-validate"
    )
    from kubernetes_validate.utils import latest_version

    deployment = dict(by_kind(objects, "Deployment")["gateway"])
    deployment["spec"] = {**deployment["spec"], "replica": 2}  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, latest_version(), strict=True)


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def test_triton_gets_a_gpu_and_is_ready_only_with_every_model(objects):
    triton = by_kind(objects, "Deployment")["triton"]
    spec = pod_spec(triton)
    container = next(c for c in spec["containers"] if c["name"] == "triton")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"].startswith("nvcr.io/nvidia/tritonserver:") and container["image"].endswith(
        "-py3"
    )
    probe = " ".join(container["readinessProbe"]["exec"]["command"])
    for model in SERVED_MODELS:
        assert model in probe
    assert "/v2/models/$m/ready" in probe
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "--metrics-config=summary_latencies=true" in container["args"]
    # The repository comes from a volume that an init container fills from the repository
    # image, built once with its weights: no pod downloads, traces or chooses weights.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (init,) = spec["initContainers"]
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert mounts["repository"] == init_mounts["repository"] == "/models"
    assert init["image"].startswith("inception-serving/repository:")
    assert "env" not in init and "checkpoints" not in init_mounts
    dockerfile = (DEPLOY / "repository.Dockerfile").read_text()
    assert 'ENTRYPOINT ["cp", "-R", "/repository/.", "/models/"]' in dockerfile
    assert "RUN --mount=type=bind,from=checkpoints,target=/checkpoints models-entrypoint" in dockerfile
    assert "--model-repository=/models" in container["args"]
    assert "--model-config-name=gpu" in container["args"]  # configs/gpu.pbtxt: GPU instances, provenance
    assert mounts["dshm"] == "/dev/shm"


def test_gateway_deployment(objects):
    gateway = by_kind(objects, "Deployment")["gateway"]
    spec = pod_spec(gateway)
    container = spec["containers"][0]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # Ready while Triton is away (it answers 503 with Retry-After then): /readyz asks Triton.
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in container["env"]}
    assert env["GATEWAY_TRITON_GRPC_URL"]["value"] == "dns:///triton-headless:8001"
    assert env.get("GATEWAY_TRITON_LB_POLICY", {}).get("value", "round_robin") == "round_robin"
    secret = env["GATEWAY_API_KEYS"]["valueFrom"]["secretKeyRef"]
    # Keys are meant to be used: no Secret, no pod (rather than a pod without authentication).
    assert secret["optional"] is False
    assert "cpu" in container["resources"]["requests"], "the CPU autoscaler needs a CPU request"
    # The Service the gateway names is headless: one DNS record per ready Triton pod.
    headless = by_kind(objects, "Service")["triton-headless"]
    assert headless["spec"]["clusterIP"] == "None"
    assert not headless["spec"].get("publishNotReadyAddresses", False)
    assert any(p["port"] == 8001 and p["targetPort"] == "grpc" for p in headless["spec"]["ports"])


def test_no_secret_values_are_shipped(objects):
    assert not by_kind(objects, "Secret"), "secrets must be created by the operator, not shipped"


def test_images_are_pinned(objects):
    for deployment in by_kind(objects, "Deployment").values():
        spec = pod_spec(deployment)
        for container in spec["containers"] + spec.get("initContainers", []):
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1], f"{image} has no tag"
            assert not image.endswith(":latest"), image


def test_services_select_their_pods(objects):
    deployments = by_kind(objects, "Deployment")
    for name, service in by_kind(objects, "Service").items():
        selected = [
            d
            for d in deployments.values()
            if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, f"Service {name} selects {len(selected)} Deployments"
        ports = {p["name"] for c in pod_spec(selected[0])["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports


def test_autoscalers(objects):
    hpas = by_kind(objects, "HorizontalPodAutoscaler")
    deployments = by_kind(objects, "Deployment")
    for hpa in hpas.values():
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    cpu = hpas["gateway"]["spec"]["metrics"][0]
    assert cpu["type"] == "Resource" and cpu["resource"]["name"] == "cpu"
    queue = hpas["triton"]["spec"]["metrics"][0]
    assert queue["type"] == "Pods"
    served = {rule["name"]["as"] for rule in adapter_rules()}
    assert queue["pods"]["metric"]["name"] in served, "prometheus-adapter serves no such metric"


def test_autoscaled_deployments_set_no_replica_count(objects):
    """The HPA owns the count: a `replicas` in the manifest resets it on every apply."""
    hpas = by_kind(objects, "HorizontalPodAutoscaler")
    for hpa in hpas.values():
        deployment = by_kind(objects, "Deployment")[hpa["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in deployment["spec"], deployment["metadata"]["name"]
    assert {"gateway", "triton"} <= set(hpas)


def test_disruptions_and_rollouts_cannot_deadlock(objects):
    """A drain or a rollout on a small cluster always proceeds: each budget lets one pod go
    whatever the replica count (never `minAvailable`), and Triton's rollout needs no spare
    GPU (maxUnavailable >= 1)."""
    budgets = by_kind(objects, "PodDisruptionBudget")
    deployments = by_kind(objects, "Deployment")
    assert set(budgets) == set(deployments)
    for name, budget in budgets.items():
        spec = budget["spec"]
        assert "minAvailable" not in spec, name
        assert int(spec["maxUnavailable"]) >= 1, name
        assert spec.get("unhealthyPodEvictionPolicy") == "AlwaysAllow", name
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
    for name, deployment in deployments.items():
        rolling = deployment["spec"]["strategy"]["rollingUpdate"]
        assert int(rolling["maxUnavailable"]) >= 1, f"{name}: a rollout waits for a surge pod"


def test_gateway_probes_outlast_its_own_triton_deadline(objects):
    from service.settings import Settings

    deadline = Settings(_env_file=None).triton_probe_timeout_s
    container = pod_spec(by_kind(objects, "Deployment")["gateway"])["containers"][0]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe].get("timeoutSeconds", 1) > deadline, probe


def test_triton_ends_connections_so_new_pods_are_found(objects):
    container = pod_spec(by_kind(objects, "Deployment")["triton"])["containers"][0]
    ages = [a for a in container["args"] if a.startswith("--grpc-max-connection-age=")]
    assert ages and 0 < int(ages[0].split("=")[1]) <= 300_000, container["args"]


def test_adapter_rule_shape():
    for rule in adapter_rules():
        overrides = rule["resources"]["overrides"]
        assert overrides["pod"]["resource"] == "pod" and overrides["namespace"]["resource"] == "namespace"
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def test_podmonitors_select_real_pods_and_ports(objects):
    """PodMonitor (monitoring.coreos.com/v1) by hand: selector, named ports, job label."""
    deployments = by_kind(objects, "Deployment")
    monitors = by_kind(objects, "PodMonitor")
    allowed_spec = {"jobLabel", "selector", "podMetricsEndpoints", "namespaceSelector", "podTargetLabels"}
    allowed_endpoint = {
        "port",
        "path",
        "interval",
        "scrapeTimeout",
        "scheme",
        "relabelings",
        "metricRelabelings",
    }
    for name, monitor in monitors.items():
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        spec = monitor["spec"]
        assert set(spec) <= allowed_spec, set(spec) - allowed_spec
        template_labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= template_labels.items()
        # The job label of the scraped series: the same as in the compose Prometheus.
        assert template_labels[spec["jobLabel"]] == name
        ports = {p["name"] for c in pod_spec(deployments[name])["containers"] for p in c.get("ports", [])}
        for endpoint in spec["podMetricsEndpoints"]:
            assert set(endpoint) <= allowed_endpoint
            assert endpoint["port"] in ports
            assert endpoint["path"] == "/metrics"
    assert monitors["triton"]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_prometheusrule_carries_the_alert_rules(objects):
    """kube-prometheus-stack gets the same rules the compose Prometheus loads."""
    rule = by_kind(objects, "PrometheusRule")["inception-serving"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    compose_rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    assert rule["spec"]["groups"] == compose_rules
