"""The TLS proxy of the README (deploy/tls/Caddyfile), checked by Caddy itself: Debian's
caddy adapts and validates it (`caddy validate`), for a real domain and for the default,
and a broken copy is refused, so the check is not vacuous.

The recipe is closed by default (issue 25, item 7): a real Caddy running the file in
front of a recording upstream proxies the API and the page and nothing else (no
/metrics, no /docs, however spelt), and the recipe's compose override refuses to start
the gateway without API keys."""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from embedded.processes import free_port, running

from .helpers import require_tool
from .promql_tools import DEPLOY, ROOT

CADDYFILE = DEPLOY / "tls" / "Caddyfile"


@pytest.fixture(scope="module")
def caddy() -> str:
    return require_tool("caddy", "Debian package caddy")


def validate(caddy: str, path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [caddy, "validate", "--config", str(path), "--adapter", "caddyfile"],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env},
    )  # fmt: skip


@pytest.mark.parametrize("domain", ["api.example.org", None], ids=["domain", "default"])
def test_caddy_validates_the_tls_proxy(caddy, domain):
    env = {"DOMAIN": domain} if domain else {}
    result = validate(caddy, CADDYFILE, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid configuration" in result.stdout + result.stderr


def test_caddy_refuses_a_broken_copy(caddy, tmp_path):
    broken = tmp_path / "Caddyfile"
    broken.write_text(CADDYFILE.read_text().replace("reverse_proxy", "reverse_proxi"))
    assert validate(caddy, broken, {"DOMAIN": "api.example.org"}).returncode != 0


def test_caddyfile_is_formatted(caddy):
    result = subprocess.run([caddy, "fmt", str(CADDYFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == CADDYFILE.read_text()


def test_proxy_reaches_the_published_gateway_and_its_health():
    """The upstream default is where compose publishes the gateway, and the proxy's health
    check is the gateway's /healthz."""
    text = CADDYFILE.read_text()
    upstream = re.search(r"reverse_proxy \{\$GATEWAY_UPSTREAM:([\d.]+):(\d+)\}", text)
    assert upstream and upstream.groups() == ("127.0.0.1", "8080")
    compose = (ROOT / "docker-compose.yml").read_text()
    assert '"${GATEWAY_BIND_ADDRESS:-127.0.0.1}:${GATEWAY_PORT:-8080}:8080"' in compose
    assert "health_uri /healthz" in text
    assert "deploy/tls/Caddyfile" in (ROOT / "README.md").read_text()


# ------------------------------------------------------------- closed by default (issue 25)

TLS_OVERRIDE = DEPLOY / "tls" / "compose.tls.yml"
#: What the proxy publishes: the API, the page and its files, the health checks.
PUBLIC = ("/v1/classify", "/v1/models", "/", "/static/page.js", "/healthz", "/readyz")
#: What it must not: the service's internals and the API's documentation, spelt as an
#: attacker would try them (case, percent-encoding, dot segments, doubled slashes).
PRIVATE = (
    "/metrics",
    "/metrics/",
    "/METRICS",
    "/%6detrics",
    "//metrics",
    "/v1/../metrics",
    "/static/../metrics",
    "/docs",
    "/docs/",
    "/docs/oauth2-redirect",
    "/redoc",
    "/openapi.json",
    "/v1openapi.json",
)


def adapted(caddy: str, env: dict[str, str]) -> dict:
    """The Caddyfile as Caddy itself reads it: its JSON configuration."""
    result = subprocess.run(
        [caddy, "adapt", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def proxied_paths(node: object, paths: frozenset[str] | None = None) -> Iterator[frozenset[str] | None]:
    """For each reverse_proxy handler in Caddy's JSON, the path patterns of the nearest
    route around it that matches on paths (None: no route restricts the paths)."""
    if isinstance(node, dict):
        matchers = node.get("match")
        if matchers and all("path" in matcher for matcher in matchers):
            paths = frozenset(p for matcher in matchers for p in matcher["path"])
        if node.get("handler") == "reverse_proxy":
            yield paths
        for value in node.values():
            yield from proxied_paths(value, paths)
    elif isinstance(node, list):
        for value in node:
            yield from proxied_paths(value, paths)


def test_only_the_api_is_proxied(caddy):
    """Read from Caddy's own reading of the file: the one reverse_proxy sits in a route
    that matches the public paths, and no private path is among them."""
    proxies = list(proxied_paths(adapted(caddy, {"DOMAIN": "api.example.org"})))
    assert proxies == [frozenset({"/v1/*", "/", "/static/*", "/healthz", "/readyz"})], proxies
    for private in ("/metrics", "/docs", "/redoc", "/openapi.json"):
        assert not any(fnmatch.fnmatchcase(private, pattern) for pattern in proxies[0]), private


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, list[dict]]]:
    """A recording stand-in for the gateway: answers 200 to everything, keeps each
    request's path and forwarding header."""
    seen: list[dict] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            seen.append({"path": self.path, "forwarded_for": self.headers.get("X-Forwarded-For")})
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_HEAD = answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def proxy(caddy, upstream, tmp_path_factory) -> Iterator[str]:
    """A real Caddy running the shipped file in front of the recorder. Only what cannot
    run here changes: plain HTTP on a loopback port (DOMAIN=http://...: no certificate),
    and no admin endpoint (tests may run beside another Caddy)."""
    work = tmp_path_factory.mktemp("caddy")
    port = free_port()
    config = adapted(caddy, {"DOMAIN": f"http://127.0.0.1:{port}", "GATEWAY_UPSTREAM": upstream[0]})
    config["admin"] = {"disabled": True}
    for server in config["apps"]["http"]["servers"].values():
        server["listen"] = [f"127.0.0.1:{port}"]
    (work / "caddy.json").write_text(json.dumps(config))
    env = {**os.environ, "HOME": str(work), "XDG_DATA_HOME": str(work / "data"), "XDG_CONFIG_HOME": str(work)}
    command = [caddy, "run", "--config", str(work / "caddy.json")]
    with running(command, f"http://127.0.0.1:{port}/healthz", 60, log_path=work / "caddy.log", env=env):
        yield f"127.0.0.1:{port}"


def raw_get(address: str, path: str) -> tuple[int, bytes]:
    """GET with the path sent exactly as written (an HTTP client would clean it)."""
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_a_real_caddy_publishes_the_api_and_nothing_else(proxy, upstream):
    _, seen = upstream
    for path in PUBLIC:
        del seen[:]
        status, _ = raw_get(proxy, path)
        assert status == 200, path
        assert [s["path"] for s in seen if s["path"] != "/healthz" or path == "/healthz"] == [path], seen
        assert seen[-1]["forwarded_for"] == "127.0.0.1", seen  # the client's address, for fairness
    del seen[:]
    for path in PRIVATE:
        status, body = raw_get(proxy, path)
        assert status == 404, path
        assert json.loads(body)["error"]["code"] == "not_found", body
    reached = [s["path"] for s in seen if s["path"] != "/healthz"]  # the proxy's own health checks
    assert reached == [], f"private paths reached the gateway: {reached}"


def compose_tls_config(
    docker_compose: str, keys: str | None, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` of the recipe, with no GATEWAY_* from this environment and an
    empty env file (an operator's .env in the checkout must not decide the test)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    (tmp_path / "empty.env").write_text("")
    if keys is not None:
        env["GATEWAY_API_KEYS"] = keys
    command = [docker_compose, "-f", str(ROOT / "docker-compose.yml"), "-f", str(TLS_OVERRIDE)]
    return subprocess.run(
        [*command, "--project-directory", str(ROOT), "--env-file", str(tmp_path / "empty.env"), "config"],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )  # fmt: skip


@pytest.mark.parametrize("keys", [None, ""], ids=["unset", "empty"])
def test_the_tls_recipe_refuses_to_start_without_api_keys(docker_compose, keys, tmp_path):
    result = compose_tls_config(docker_compose, keys, tmp_path)
    assert result.returncode != 0, "the TLS recipe resolves with the API open"
    assert "set GATEWAY_API_KEYS" in result.stderr, result.stderr


def test_the_tls_recipe_passes_the_keys_to_the_gateway(docker_compose, tmp_path):
    result = compose_tls_config(docker_compose, "k1,k2", tmp_path)
    assert result.returncode == 0, result.stderr
    gateway = yaml.safe_load(result.stdout)["services"]["gateway"]
    assert gateway["environment"]["GATEWAY_API_KEYS"] == "k1,k2"


def test_the_readme_s_recipe_is_the_closed_one():
    section = (ROOT / "README.md").read_text().split("\n### TLS\n", 1)[1].split("\n## ", 1)[0]
    section = section.split("\n### ", 1)[0]
    assert "-f deploy/tls/compose.tls.yml" in section and "GATEWAY_API_KEYS" in section
    for private in ("/metrics", "/docs"):
        assert private in section, f"the TLS section does not say that {private} stays private"
    assert "-f deploy/tls/compose.tls.yml" in TLS_OVERRIDE.read_text()
