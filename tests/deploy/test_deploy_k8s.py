"""Kubernetes manifests: `kubectl kustomize` builds them, kubernetes-validate validates the
built objects offline against current Kubernetes versions, and the references between them
(selectors, ports, the autoscalers' metrics, probes) are followed by hand.

PodMonitor is a CRD of prometheus-operator: kubernetes-validate carries no schema for it and
none can be fetched here, so it is checked by hand against the fields prometheus-operator
documents, and against the pods it selects.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from .helpers import find_tool
from .k8s_rules import k8s_groups
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
        ("Service", "triton-headless"),
        ("Service", "gateway"),
        ("PodDisruptionBudget", "triton"),
        ("PodDisruptionBudget", "gateway"),
        ("HorizontalPodAutoscaler", "gateway"),
        ("HorizontalPodAutoscaler", "triton"),
        ("PodMonitor", "gateway"),
        ("PodMonitor", "triton"),
        ("NetworkPolicy", "default-deny-ingress"),
        ("NetworkPolicy", "triton"),
        ("NetworkPolicy", "gateway"),
    } <= kinds
    # No ClusterIP Service in front of Triton: the gateway uses the headless one, the
    # PodMonitor selects pods, and any other path to Triton would bypass the gateway.
    assert ("Service", "triton") not in kinds
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
        # The job label of the scraped series: the same as in the compose Prometheus, and
        # named for the project, so another team's `gateway` or `triton` cannot collide.
        assert template_labels[spec["jobLabel"]] == f"inception-{name}"
        ports = {p["name"] for c in pod_spec(deployments[name])["containers"] for p in c.get("ports", [])}
        for endpoint in spec["podMetricsEndpoints"]:
            assert set(endpoint) <= allowed_endpoint
            assert endpoint["port"] in ports
            assert endpoint["path"] == "/metrics"
    assert monitors["triton"]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_prometheusrule_carries_the_alert_rules(objects):
    """kube-prometheus-stack gets the rules the compose Prometheus loads, scoped to our
    namespace (tests/deploy/k8s_rules.py); kustomize writes the one runbook setting
    (settings.yaml) in front of every runbook anchor."""
    rule = by_kind(objects, "PrometheusRule")["inception-serving"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    compose_rules = k8s_groups(yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"])
    shipped = yaml.safe_load((K8S / "prometheusrule.yaml").read_text())["spec"]["groups"]
    assert shipped == compose_rules, "prometheusrule.yaml is stale: python -m tests.deploy.k8s_rules"
    settings = yaml.safe_load((K8S / "settings.yaml").read_text())
    base = settings["data"]["runbook_base_url"]
    assert re.fullmatch(r"https://[^#\s]+", base), base
    template = "{{ $externalLabels.runbook_base_url }}#"
    built = rule["spec"]["groups"]
    urls = 0
    for group, built_group in zip(compose_rules, built, strict=True):
        for source, result in zip(group["rules"], built_group["rules"], strict=True):
            url = source["annotations"]["runbook_url"]
            assert url.startswith(template), url
            assert result["annotations"]["runbook_url"] == base + url[len(template) - 1 :]
            urls += 1
            assert {**result, "annotations": {**result["annotations"], "runbook_url": url}} == source
    assert urls == sum(len(g["rules"]) for g in compose_rules)
    assert "ConfigMap" not in {o["kind"] for o in objects}, "the settings are applied to the cluster"


# ---------------------------------------------------------------------------- hardening


def triton_container(objects: list[dict]) -> dict:
    return next(
        c for c in pod_spec(by_kind(objects, "Deployment")["triton"])["containers"] if c["name"] == "triton"
    )


def test_namespace_enforces_the_restricted_pod_security_level(objects):
    labels = by_kind(objects, "Namespace")["inception-serving"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"


@pytest.mark.parametrize("name", ["triton", "gateway"])
def test_pods_meet_the_restricted_level(objects, name):
    """What Pod Security's `restricted` profile checks, for every container of the pod."""
    spec = pod_spec(by_kind(objects, "Deployment")[name])
    pod = spec.get("securityContext", {})
    assert pod.get("runAsNonRoot") is True
    assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    for container in spec["containers"] + spec.get("initContainers", []):
        context = container.get("securityContext", {})
        assert context.get("allowPrivilegeEscalation") is False, container["name"]
        assert context.get("capabilities", {}).get("drop") == ["ALL"], container["name"]
        assert not context.get("capabilities", {}).get("add"), container["name"]
        assert not context.get("privileged"), container["name"]
        assert context.get("runAsUser", pod.get("runAsUser", 0)) != 0, container["name"]
    for volume in spec.get("volumes", []):
        assert set(volume) - {"name"} <= {"emptyDir", "configMap", "secret", "projected"}, volume


def test_triton_runs_as_the_images_own_user(objects):
    spec = pod_spec(by_kind(objects, "Deployment")["triton"])
    context = spec["securityContext"]
    # triton-server, uid 1000, in the NGC image; the repository volume belongs to its group.
    assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (1000, 1000, 1000)
    (init,) = spec["initContainers"]
    assert init["securityContext"]["runAsGroup"] == context["fsGroup"]


def run_triton_args(args: list[str], tmp_path) -> list[str]:
    """The container's args as the image's entry point runs them (Kubernetes turns $$ into
    $), with a stand-in tritonserver that prints what it gets."""
    import os

    fake = tmp_path / "tritonserver"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    command = [a.replace("$$", "$") for a in args]
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_triton_restricts_its_admin_apis(objects, tmp_path):
    """Repository control, logging and trace need a key drawn at each start on both
    protocols; every other flag still reaches tritonserver."""
    args = triton_container(objects)["args"]
    assert args[:2] == ["/bin/sh", "-c"] and args[3] == "tritonserver"
    first, second = run_triton_args(args, tmp_path), run_triton_args(args, tmp_path)
    assert first[: len(args) - 4] == args[4:]
    keys = []
    for got in (first, second):
        http = next(a for a in got if a.startswith("--http-restricted-api="))
        apis, key = http.split("=", 1)[1].split(":admin-key=")
        assert set(apis.split(",")) == {"model-repository", "logging", "trace"}
        assert f"--grpc-restricted-protocol={apis}:admin-key={key}" in got
        assert re.fullmatch(r"[0-9a-f-]{36}", key)
        keys.append(key)
    assert keys[0] != keys[1]


def flags(container: dict) -> dict[str, str]:
    return dict(a.split("=", 1) for a in container["args"] if a.startswith("--") and "=" in a)


def test_triton_keepalive_lets_the_gateway_ping(objects):
    """Triton pings idle connections and accepts the gateway's pings every 10 s (its
    keepalive time) without calls in flight, never counting them as strikes."""
    triton = flags(triton_container(objects))
    assert int(triton["--grpc-keepalive-time"]) <= 30_000
    assert int(triton["--grpc-keepalive-timeout"]) <= 10_000
    assert triton["--grpc-keepalive-permit-without-calls"] == "1"
    assert triton["--grpc-http2-max-pings-without-data"] == "0"
    assert int(triton["--grpc-http2-min-recv-ping-interval-without-data"]) <= 10_000
    # The keepalive was measured with these flags (bench/keepalive.py, bench/README.md).
    from bench.keepalive import TRITON_KEEPALIVE

    assert set(TRITON_KEEPALIVE) <= set(triton_container(objects)["args"])


@pytest.mark.parametrize("name", ["triton", "gateway"])
def test_termination_outlasts_prestop_and_drain(objects, name):
    """The kubelet waits for the preStop delay and then the server's own drain (Triton:
    --exit-timeout-secs; the gateway: its 30 s Triton deadline) before it kills the pod."""
    deployment = by_kind(objects, "Deployment")[name]
    container = pod_spec(deployment)["containers"][0]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    delay = int(command[1])
    assert delay >= 5
    drain = int(flags(container)["--exit-timeout-secs"]) if name == "triton" else 30
    if name == "triton":
        assert drain > 0
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > delay + drain


def allowed_peers(objects: list[dict], pod_labels: dict[str, str], port: str) -> list[dict]:
    """The `from` peers of every policy that selects these pods and opens this port."""
    peers = []
    for policy in by_kind(objects, "NetworkPolicy").values():
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        if not selector.items() <= pod_labels.items():
            continue
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", []):
            if any(p["port"] == port for p in rule.get("ports", [])):
                peers += rule["from"]
    return peers


def test_network_policies(objects):
    """Deny by default; only the gateway reaches Triton's gRPC port, only monitoring's
    Prometheus the metrics ports, and the ingress controller only the gateway."""
    policies = by_kind(objects, "NetworkPolicy")
    deny = policies["default-deny-ingress"]["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    deployments = by_kind(objects, "Deployment")
    triton = deployments["triton"]["spec"]["template"]["metadata"]["labels"]
    gateway = deployments["gateway"]["spec"]["template"]["metadata"]["labels"]
    gateway_pods = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}}}
    prometheus = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }
    ingress = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    assert allowed_peers(objects, triton, "grpc") == [gateway_pods]
    assert allowed_peers(objects, triton, "metrics") == [prometheus]
    assert allowed_peers(objects, triton, "http") == []
    assert allowed_peers(objects, gateway, "http") == [ingress, prometheus]
    assert gateway_pods["podSelector"]["matchLabels"].items() <= gateway.items()
    # The policies name ports the pods have.
    for name, labels in (("triton", triton), ("gateway", gateway)):
        ports = {p["name"] for c in pod_spec(deployments[name])["containers"] for p in c.get("ports", [])}
        for policy in policies.values():
            if policy["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items():
                for rule in policy["spec"].get("ingress", []):
                    assert {p["port"] for p in rule["ports"]} <= ports, policy["metadata"]["name"]
