"""The TLS proxy of the README (deploy/tls/Caddyfile), checked by Caddy itself: Debian's
caddy adapts and validates it (`caddy validate`), for a real domain and for the default,
and a broken copy is refused, so the check is not vacuous."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

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
