"""/metrics in process (service/routes/health.py), from the review's smaller findings
(issue 19): the exposition is rendered off the event loop. /metrics after real traffic:
test_metrics.py."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from service import metrics
from service.app import create_app
from service.settings import Settings

from ..helpers import UNREACHABLE


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
