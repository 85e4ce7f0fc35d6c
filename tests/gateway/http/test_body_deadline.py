"""The body deadline (service/classification.py), from the review's smaller findings
(issue 19): a steady slow upload has time to arrive, a stalled one does not. The same
deadline on a real gateway: test_slow_clients.py."""

from __future__ import annotations

import pytest
from starlette.datastructures import Headers

from service.classification import body_deadline_s
from service.settings import Settings

from ..helpers import UNREACHABLE


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
