"""The one error responder (service/errors.py): every 429 and 503 carries Retry-After,
the error's own seconds where it knows them, else the operator's setting; and nothing
else in the gateway writes that header."""

from __future__ import annotations

import ast

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.errors import (
    ApiError,
    BackendUnavailable,
    InvalidRequest,
    NotReady,
    OverCapacity,
    Overloaded,
    TemporarilyUnavailable,
    error_response,
)
from service.settings import Settings

from ...helpers import ROOT
from ..helpers import UNREACHABLE

DEFAULTS = Settings(
    triton_grpc_url=UNREACHABLE, retry_after_overloaded_s=3, retry_after_unavailable_s=7
).retry_after_s


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (Overloaded("full"), "3"),
        (BackendUnavailable("down"), "7"),
        (NotReady("not yet", triton=False, models={}), "7"),
        (OverCapacity("busy", retry_after_s=2), "2"),  # the backlog's drain time wins
        (TemporarilyUnavailable("no room", retry_after_s=1), "1"),
        (Overloaded("full", retry_after_s=0), "0"),
        (InvalidRequest("bad"), None),
    ],
    ids=["429", "503", "not-ready", "own-seconds", "buffer", "zero", "422"],
)
def test_retry_after_is_the_errors_own_else_the_setting(error: ApiError, expected: str | None) -> None:
    assert error_response(error, DEFAULTS).headers.get("Retry-After") == expected


def test_other_headers_and_details_pass_through() -> None:
    error = NotReady("not yet", headers={"Connection": "close"}, triton=False, models={"m": False})
    response = error_response(error, DEFAULTS)
    assert response.status_code == 503 and response.headers["Connection"] == "close"
    assert response.body == (
        b'{"error":{"code":"not_ready","message":"not yet","triton":false,"models":{"m":false}}}'
    )


def test_readyz_answers_through_the_responder() -> None:
    settings = Settings(triton_grpc_url=UNREACHABLE, triton_probe_timeout_s=0.5, retry_after_unavailable_s=9)
    with TestClient(create_app(settings)) as client:
        answer = client.get("/readyz")
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "9"
    error = answer.json()["error"]
    assert error["code"] == "not_ready" and error["triton"] is False
    assert set(error["models"]) == set(settings.models) and not any(error["models"].values())


def _writes_retry_after(tree: ast.AST) -> bool:
    """A "Retry-After" string as a dict key or a subscript: a header being built."""
    for node in ast.walk(tree):
        keys = (
            node.keys
            if isinstance(node, ast.Dict)
            else [node.slice]
            if isinstance(node, ast.Subscript)
            else []
        )
        if any(isinstance(k, ast.Constant) and str(k.value).lower() == "retry-after" for k in keys):
            return True
    return False


def test_only_the_responder_writes_retry_after() -> None:
    writers = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "service").rglob("*.py"))
        if _writes_retry_after(ast.parse(path.read_text(), filename=str(path)))
    ]
    assert writers == ["service/errors.py"]
