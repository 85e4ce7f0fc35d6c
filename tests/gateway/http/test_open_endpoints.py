"""Which endpoints need a key when keys are set, as the README states: the API (`/v1/*`)
always; `/metrics` when GATEWAY_METRICS_REQUIRE_KEY is set; probes never; docs served
unless GATEWAY_DOCS is false."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

from ..helpers import UNREACHABLE

KEY = "k3y-for-the-open-endpoints-test"


def client_for(**settings: object) -> Iterator[TestClient]:
    app = create_app(Settings(triton_grpc_url=UNREACHABLE, triton_timeout_s=2, api_keys=[KEY], **settings))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def keyed() -> Iterator[TestClient]:
    yield from client_for()


@pytest.fixture(scope="module")
def locked_down() -> Iterator[TestClient]:
    yield from client_for(metrics_require_key=True, docs=False)


@pytest.mark.parametrize(
    ("path", "status"),
    [("/v1/models", 401), ("/healthz", 200), ("/readyz", 503), ("/metrics", 200), ("/docs", 200),
     ("/openapi.json", 200)],
)  # fmt: skip
def test_defaults_with_keys(keyed: TestClient, path: str, status: int) -> None:
    assert keyed.get(path).status_code == status


def test_the_api_answers_with_the_key(keyed: TestClient) -> None:
    assert keyed.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert keyed.get("/v1/models", headers={"X-API-Key": KEY}).status_code == 200
    assert keyed.get("/v1/models", headers={"X-API-Key": KEY + "x"}).status_code == 401


@pytest.mark.parametrize(
    ("path", "status"),
    [("/metrics", 401), ("/docs", 404), ("/openapi.json", 404), ("/redoc", 404), ("/healthz", 200)],
)
def test_locked_down(locked_down: TestClient, path: str, status: int) -> None:
    answer = locked_down.get(path)
    assert answer.status_code == status
    if status == 401:
        assert answer.json()["error"]["code"] == "unauthorized"


def test_locked_down_metrics_answer_with_the_key(locked_down: TestClient) -> None:
    answer = locked_down.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
