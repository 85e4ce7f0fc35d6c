"""The review's smaller findings (issue 19): CORS preflights that name X-Request-Timeout,
`*` patterns in allowed origins, library warnings in the JSON log, /metrics off the loop."""

from __future__ import annotations

import io
import json
import logging
import threading
import warnings
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from starlette.datastructures import Headers

from service import metrics
from service.app import create_app
from service.classification import body_deadline_s
from service.settings import Settings

from .helpers import UNREACHABLE


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


def test_library_warnings_come_out_as_json() -> None:
    """python-multipart warns about malformed bodies through `logging`; those lines, and
    Python's warnings, are JSON like every other line."""
    stream = io.StringIO()
    create_app(Settings(triton_grpc_url=UNREACHABLE))
    root = logging.getLogger()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    previous = handler.setStream(stream)
    try:
        logging.getLogger("python_multipart.multipart").warning("Skipping data after last boundary")
        with warnings.catch_warnings():  # pytest records warnings itself: route them as the app does
            warnings.simplefilter("always")
            logging.captureWarnings(False)  # an earlier app in this process captured pytest's hook
            logging.captureWarnings(True)
            warnings.warn("a library's warning", UserWarning, stacklevel=1)
    finally:
        handler.setStream(previous)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["logger"] for line in lines] == ["python_multipart.multipart", "py.warnings"]


def test_metrics_render_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    render = metrics.render

    def recording() -> tuple[bytes, str]:
        threads.append(threading.current_thread().name)
        return render()

    monkeypatch.setattr(metrics, "render", recording)
    with TestClient(create_app(Settings(triton_grpc_url=UNREACHABLE))) as client:
        loop_thread = client.portal.call(lambda: threading.current_thread().name)
        assert client.get("/metrics").status_code == 200
    assert threads and threads[0] != loop_thread


def test_a_steady_slow_upload_has_time_to_arrive() -> None:
    """12 MiB at 1 MiB/s takes 12 s, more than the 10 s body deadline alone allowed (408);
    the deadline grows with the declared size at the slowest rate served."""
    settings = Settings(triton_grpc_url=UNREACHABLE)
    twelve = Headers({"content-length": str(12 * 1024 * 1024)})
    assert body_deadline_s(twelve, settings) > 12 * 1.5
    small = body_deadline_s(Headers({"content-length": "1000"}), settings)
    assert small == pytest.approx(settings.body_timeout_s, abs=0.01)  # a stalled small body: 408 as before
    chunked = body_deadline_s(Headers({}), settings)
    assert chunked == settings.body_timeout_s + settings.max_body_bytes / settings.min_body_rate_bytes_s
