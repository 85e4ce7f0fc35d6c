"""The app in process with no Triton behind it: it starts, says so per request, and
decides every client mistake alone, each as the JSON error body."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import REGISTRY
from starlette.datastructures import Headers

from service.app import create_app
from service.errors import Overloaded, error_response
from service.settings import Settings

from ..helpers import UNREACHABLE, encode, photo

PNG = encode(Image.new("RGB", (8, 8)), "PNG")
AS_PNG = {"Content-Type": "image/png"}
ROUTABLE = {"inception_v4", "inception_resnet_v1", "inception_resnet_v2", "inception_ensemble"}


@pytest.fixture(scope="module")
def offline_client() -> Iterator[TestClient]:
    app = create_app(Settings(triton_grpc_url=UNREACHABLE, triton_timeout_s=3, api_keys=[]))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_starts_without_triton_and_answers_503(offline_client: TestClient) -> None:
    assert offline_client.get("/healthz").json() == {"status": "ok"}
    ready = offline_client.get("/readyz")
    assert ready.status_code == 503 and "Retry-After" in ready.headers
    data = photo("grace_hopper.jpg").read_bytes()
    answer = offline_client.post("/v1/classify", content=data, headers={"Content-Type": "image/jpeg"})
    assert answer.status_code == 503 and "Retry-After" in answer.headers
    assert answer.json()["error"]["code"] == "backend_unavailable"
    assert "127.0.0.1" not in answer.text
    models = offline_client.get("/v1/models").json()["models"]
    assert {m["name"] for m in models} == ROUTABLE
    assert all(m["state"] == "unavailable" for m in models)


@pytest.mark.parametrize(
    ("request_kwargs", "status", "code"),
    [
        (dict(content=b"", headers={"Content-Type": "image/png"}), 400, "empty_body"),
        (dict(content=b"hello", headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type"),
        (dict(content=PNG, headers=AS_PNG, params={"top_k": 0}), 422, "invalid_request"),
        (dict(content=PNG, headers=AS_PNG, params={"model": "nope"}), 404, "unknown_model"),
        (dict(json={"image": "@@@"}), 422, "invalid_request"),
        (dict(json={"image": base64.b64encode(PNG).decode(), "top_k": 1001}), 422, "invalid_request"),
        (dict(json={"picture": "x"}), 422, "invalid_request"),
        (dict(json={"image": "aGVs\nbG8=\t!"}), 422, "invalid_request"),
        (dict(content=b"{", headers={"Content-Type": "application/json"}), 422, "invalid_request"),
        (dict(files={"file": ("a.png", PNG, "image/png")}), 422, "invalid_request"),
        (
            dict(
                content=PNG,
                headers={"Content-Type": "image/png"},
                params={"models": "inception_v4,inception_resnet_v2", "weights": "nan,1"},
            ),
            422,
            "invalid_request",
        ),
        # Deep nesting (RecursionError) and an integer past Python's digit limit (ValueError)
        # are the client's mistakes, not the gateway's 500.
        (dict(content=b"[" * 100_000, headers={"Content-Type": "application/json"}), 422, "invalid_request"),
        (
            dict(
                content=b'{"image": "aGk=", "top_k": ' + b"1" * 5000 + b"}",
                headers={"Content-Type": "application/json"},
            ),
            422,
            "invalid_request",
        ),
    ],
    ids=[
        "empty", "text", "top-k-0", "unknown-model", "bad-base64", "top-k-1001", "no-image-field",
        "junk-base64", "broken-json", "wrong-form-field", "nan-weight", "deep-json", "huge-integer",
    ],
)  # fmt: skip
def test_request_errors_before_triton(
    offline_client: TestClient, request_kwargs: dict, status: int, code: str
) -> None:
    answer = offline_client.post("/v1/classify", **request_kwargs)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code
    assert answer.headers["X-Request-ID"]


@pytest.mark.parametrize(
    ("method", "path", "code"),
    [("get", "/nowhere", "not_found"), ("get", "/v1/classify", "method_not_allowed")],
)
def test_routing_errors_are_json(offline_client: TestClient, method: str, path: str, code: str) -> None:
    assert getattr(offline_client, method)(path).json()["error"]["code"] == code


def test_multipart_image_without_a_filename_is_refused_clearly(offline_client: TestClient) -> None:
    """`curl -F 'image=<photo.jpg'` sends the image as a text field, which the parser
    decodes as text: the answer says so instead of classifying corrupted bytes."""
    jpeg = photo("grace_hopper.jpg").read_bytes()
    body = b'--xyz\r\nContent-Disposition: form-data; name="image"\r\n\r\n' + jpeg + b"\r\n--xyz--\r\n"
    answer = offline_client.post(
        "/v1/classify", content=body, headers={"Content-Type": "multipart/form-data; boundary=xyz"}
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "invalid_request"
    assert "filename" in answer.json()["error"]["message"]


def test_request_id_is_echoed(offline_client: TestClient) -> None:
    given = offline_client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert given.headers["X-Request-ID"] == "abc-123"


@pytest.mark.parametrize(
    "bad", ["bad id\twith spaces", "x" * 129, "abc-123\n"], ids=["spaces", "long", "newline"]
)
def test_unfit_request_id_is_replaced(bad: str) -> None:
    """Checked through the middleware alone: an HTTP client would refuse to send some."""
    app = create_app(Settings(triton_grpc_url=UNREACHABLE))
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/healthz", "raw_path": b"/healthz", "root_path": "",
        "query_string": b"", "headers": [(b"x-request-id", bad.encode())],
        "server": ("test", 80), "client": ("test", 1), "app": app,
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))
    headers = dict(sent[0]["headers"])
    made = headers[b"x-request-id"].decode()
    assert made != bad and len(made) == 32 and made.isalnum()


def test_openapi_documents_the_three_input_forms(offline_client: TestClient) -> None:
    spec = offline_client.get("/openapi.json").json()
    body = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*", "application/json"} <= set(body)
    parameters = {p["name"] for p in spec["paths"]["/v1/classify"]["post"]["parameters"]}
    assert {"model", "models", "weights", "top_k", "crops"} <= parameters
    assert offline_client.get("/docs").status_code == 200


def test_openapi_says_what_the_code_does(offline_client: TestClient) -> None:
    """The three mismatches schemathesis found: /metrics is text, the multipart top_k is
    bounded like the others, and the JSON image may not be empty."""
    spec = offline_client.get("/openapi.json").json()
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    assert offline_client.get("/metrics").headers["content-type"].startswith("text/plain")
    body = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    top_k = body["multipart/form-data"]["schema"]["properties"]["top_k"]
    assert (top_k["minimum"], top_k["maximum"]) == (1, 1000)
    assert body["application/json"]["schema"]["properties"]["image"]["minLength"] == 1
    empty = offline_client.post("/v1/classify", json={"image": ""})
    assert empty.status_code == 422 and empty.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize("wrap", [76, 64], ids=["mime", "pem"])
def test_line_wrapped_base64_is_accepted(offline_client: TestClient, wrap: int) -> None:
    """Wrapped base64 decodes; the request then fails only for want of a Triton (503)."""
    text = base64.b64encode(photo("grace_hopper.jpg").read_bytes()).decode()
    wrapped = "\r\n".join(text[i : i + wrap] for i in range(0, len(text), wrap))
    answer = offline_client.post("/v1/classify", json={"image": wrapped})
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "backend_unavailable"


def test_top_k_is_sorted_and_stable() -> None:
    gateway = create_app(Settings(triton_grpc_url=UNREACHABLE)).state.gateway
    p = np.zeros(1000, dtype=np.float32)
    p[[3, 7, 500]] = [0.2, 0.5, 0.2]
    top = gateway.top_k(p, 4)
    assert [t.class_id for t in top] == [7, 3, 500, 0]
    assert top[0].label == gateway.labels[7]
    assert len(gateway.top_k(p, 1000)) == 1000


@pytest.mark.parametrize("queue_timeout_s", [0.05, 0], ids=["waits-then-429", "zero-takes-a-free-slot"])
def test_concurrency_limit_answers_429(queue_timeout_s: float) -> None:
    """A full gateway refuses with 429 and Retry-After; ``queue_timeout_s=0`` means "do
    not wait", not "refuse everything"."""
    settings = Settings(triton_grpc_url=UNREACHABLE, max_concurrency=1, queue_timeout_s=queue_timeout_s)
    gateway = create_app(settings).state.gateway

    async def scenario() -> None:
        async with await gateway.policy.reserve("", requests=1):
            with pytest.raises(Overloaded) as refused:
                async with await gateway.policy.reserve("", requests=1):
                    pass
            assert refused.value.status == 429
            assert error_response(refused.value, settings.retry_after_s).headers["Retry-After"] == "1"
        async with await gateway.policy.reserve("", requests=1):  # released again
            pass

    asyncio.run(scenario())


@pytest.mark.parametrize("content_type", [b"image/jpeg", b"multipart/form-data; boundary=xyz"])
def test_client_disconnect_mid_body_is_not_a_500(content_type: bytes) -> None:
    """A client that leaves mid-upload is counted as 499, not as a server error, and no
    traceback is logged for it."""
    app = create_app(Settings(triton_grpc_url=UNREACHABLE))
    head = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
    body = (head if content_type.startswith(b"multipart") else b"") + b"\xff\xd8\xff"
    messages = [{"type": "http.request", "body": body, "more_body": True}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/classify", "raw_path": b"/v1/classify", "root_path": "",
        "query_string": b"", "headers": [(b"content-type", content_type)],
        "server": ("test", 80), "client": ("test", 1), "app": app,
    }  # fmt: skip
    errors: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append  # type: ignore[method-assign]
    logging.getLogger("service").addHandler(handler)
    labels = {"model": "inception_v4", "code": "client_disconnected"}
    before = REGISTRY.get_sample_value("inception_gateway_errors_total", labels)
    try:
        asyncio.run(app(scope, receive, send))
    finally:
        logging.getLogger("service").removeHandler(handler)
    assert sent == [] and errors == []
    after = REGISTRY.get_sample_value("inception_gateway_errors_total", labels)
    assert (after or 0) - (before or 0) == 1


def test_multipart_parts_stay_in_memory() -> None:
    """No part is spooled to a temporary file, whatever its size within the body limit."""
    from service.inputs import InMemoryMultiPartParser

    big = bytes(range(256)) * (12 * 1024)  # 3 MiB, three times starlette's spool threshold
    body = (
        b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.bin"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + big + b"\r\n--xyz--\r\n"
    )

    async def stream():  # type: ignore[no-untyped-def]
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    async def parse() -> tuple[bool, bytes]:
        headers = Headers({"content-type": "multipart/form-data; boundary=xyz"})
        form = await InMemoryMultiPartParser(headers, stream(), max_files=1, max_fields=4).parse()
        upload = form["image"]
        rolled = bool(upload.file._rolled)  # type: ignore[union-attr]
        data = await upload.read()  # type: ignore[union-attr]
        await form.close()
        return rolled, data

    rolled, data = asyncio.run(parse())
    assert not rolled and data == big


def test_a_failure_to_buffer_is_a_503_that_names_no_internals(
    offline_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.inputs import InMemoryMultiPartParser

    async def full_disk(self: object) -> None:
        raise OSError(28, "No space left on device", "/tmp/tmpab12cd")

    monkeypatch.setattr(InMemoryMultiPartParser, "parse", full_disk)
    answer = offline_client.post("/v1/classify", files={"image": ("a.png", PNG, "image/png")})
    assert answer.status_code == 503 and answer.headers["Retry-After"]
    assert answer.json()["error"]["code"] == "temporarily_unavailable"
    assert "/tmp" not in answer.text and "space" not in answer.text and "28" not in answer.text


def test_buffer_budget_admits_one_request_whatever_it_costs() -> None:
    settings = Settings(triton_grpc_url=UNREACHABLE, buffer_budget_bytes=100)
    gateway = create_app(settings).state.gateway

    async def scenario() -> None:
        policy = gateway.policy
        async with await policy.reserve("", body_bytes=500):  # alone: admitted though over the budget
            assert policy.body_bytes == 500
        async with await policy.reserve("", body_bytes=80):
            with pytest.raises(Overloaded) as shed:
                async with await policy.reserve("", body_bytes=30):
                    pass
            assert shed.value.status == 429
            assert error_response(shed.value, settings.retry_after_s).headers["Retry-After"] == "1"
            async with await policy.reserve("", body_bytes=20):
                assert policy.body_bytes == 100
        assert policy.body_bytes == 0

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("headers", "cost"),
    [
        ({"content-length": "1000", "content-type": "image/jpeg"}, 2000),
        ({"content-length": "1000", "content-type": "application/json"}, 5000),
        ({"content-type": "image/jpeg"}, 2 * 16 * 1024 * 1024),  # chunked: the limit
    ],
    ids=["raw", "json", "chunked"],
)
def test_buffer_cost(headers: dict[str, str], cost: int) -> None:
    from service.classification import buffer_cost

    assert buffer_cost(Headers(headers), 16 * 1024 * 1024) == cost
