"""CORS (service/app.py), from the review's smaller findings (issue 19): preflights that
name X-Request-Timeout or Cache-Control, and `*` patterns in allowed origins."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

from ..helpers import UNREACHABLE


@pytest.fixture
def cors_client() -> Iterator[TestClient]:
    settings = Settings(
        triton_grpc_url=UNREACHABLE, cors_origins=["https://app.example", "https://*.tenant.example"]
    )
    with TestClient(create_app(settings)) as client:
        yield client


def preflight(client: TestClient, origin: str, headers: str = "content-type") -> dict[str, str]:
    answer = client.options(
        "/v1/classify",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": headers,
        },
    )
    return {k.lower(): v for k, v in answer.headers.items()} | {"status": str(answer.status_code)}


def test_a_preflight_may_name_the_deadline_header(cors_client: TestClient) -> None:
    allowed = preflight(cors_client, "https://app.example", "content-type,x-request-timeout")
    assert allowed["status"] == "200", allowed
    assert "x-request-timeout" in allowed["access-control-allow-headers"].lower()


def test_a_web_app_may_refuse_cached_answers_and_see_which_it_got(cors_client: TestClient) -> None:
    """A page on another origin sends `Cache-Control: no-store` (a preflighted header) and
    reads `X-Cache` (exposed), or it could neither bypass the cache nor tell a hit."""
    allowed = preflight(cors_client, "https://app.example", "content-type,cache-control")
    assert allowed["status"] == "200", allowed
    assert "cache-control" in allowed["access-control-allow-headers"].lower()
    answer = cors_client.get("/healthz", headers={"Origin": "https://app.example"})
    assert "x-cache" in answer.headers["access-control-expose-headers"].lower()


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://app.example", True),
        ("https://one.tenant.example", True),
        ("https://a.b.tenant.example", True),
        ("https://tenant.example", False),
        ("https://eviltenant.example", False),
        ("http://one.tenant.example", False),
        ("https://evil.example", False),
    ],
)
def test_a_star_in_an_origin_matches_subdomains(cors_client: TestClient, origin: str, allowed: bool) -> None:
    answer = preflight(cors_client, origin)
    assert (answer.get("access-control-allow-origin") == origin) is allowed, answer
