"""The page's files and the CORS answers, in process (no browser, no Triton): what the
browser tests rely on, checked in `make check` too."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.routes.page import FILES, STATIC
from service.settings import Settings

from ..gateway.helpers import UNREACHABLE
from ..helpers import ROOT

APP_ORIGIN = "https://app.example"


def client_for(**settings: object) -> Iterator[TestClient]:
    app = create_app(Settings(triton_grpc_url=UNREACHABLE, triton_timeout_s=2, **settings))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    yield from client_for(cors_origins=[APP_ORIGIN + "/"])


def test_the_page_and_its_files(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "http" not in policy
    linked = re.findall(r'(?:href|src)="(/static/[^"]+)"', page.text)
    assert sorted(linked) == ["/static/page.css", "/static/page.js"]
    for path in linked:
        answer = client.get(path)
        assert answer.status_code == 200 and answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["content-type"] == FILES[path.rsplit("/", 1)[1]]


@pytest.mark.parametrize("path", ["/static/index.html", "/static/nothing.js", "/static/..%2Fapp.py"])
def test_nothing_else_is_served(client: TestClient, path: str) -> None:
    answer = client.get(path)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"


def test_the_page_can_be_turned_off() -> None:
    for client in client_for(page=False):
        assert client.get("/").status_code == 404
        assert client.get("/static/page.js").status_code == 404


def test_the_files_travel_with_the_package() -> None:
    """A non-editable install (the gateway image) carries static/ only as package data."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    on_disk = {p.relative_to(STATIC.parent).as_posix() for p in STATIC.iterdir()}
    assert set(FILES) <= {p.name for p in STATIC.iterdir()}
    assert all(any(fnmatch.fnmatch(f, p) for p in patterns["service"]) for f in on_disk)


def test_a_listed_origin_is_preflighted_for_json_and_keys(client: TestClient) -> None:
    preflight = client.options(
        "/v1/classify",
        headers={
            "Origin": APP_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization, x-api-key, x-request-id",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    answer = client.get("/v1/models", headers={"Origin": APP_ORIGIN})
    assert answer.headers["access-control-allow-origin"] == APP_ORIGIN
    exposed = {h.strip().lower() for h in answer.headers["access-control-expose-headers"].split(",")}
    assert {"x-request-id", "retry-after"} <= exposed


def test_other_origins_get_no_cors_header(client: TestClient) -> None:
    preflight = client.options(
        "/v1/classify",
        headers={"Origin": "https://other.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 400 and "access-control-allow-origin" not in preflight.headers
    answer = client.get("/v1/models", headers={"Origin": "https://other.example"})
    assert "access-control-allow-origin" not in answer.headers
    odd_header = client.options(
        "/v1/classify",
        headers={
            "Origin": APP_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-something-else",
        },
    )
    assert odd_header.status_code == 400


def test_origins_are_normalised_or_refused() -> None:
    assert Settings(cors_origins="https://App.example/, http://127.0.0.1:3000").cors_origins == [
        "https://app.example",
        "http://127.0.0.1:3000",
    ]
    with pytest.raises(ValidationError, match="not an origin"):
        Settings(cors_origins="https://app.example/page")


def test_the_readme_shows_the_screenshot() -> None:
    """docs/page.png is a copy of build/browser/page-readme.png, which the browser test writes."""
    shot = ROOT / "docs" / "page.png"
    assert shot.is_file() and 10_000 < shot.stat().st_size <= 200_000
    assert "](docs/page.png)" in (ROOT / "README.md").read_text()
