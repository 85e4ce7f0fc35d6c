"""Settings, routing, error mapping, config parsing and the app without a Triton, in process."""

from __future__ import annotations

import ast
import base64
import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from tritonclient.utils import InferenceServerException

from service.app import create_app
from service.errors import InvalidRequest, UnknownModel
from service.routing import metric_label, resolve
from service.settings import Settings
from service.triton import ConfigError, map_triton_error, parse_model_config

from .helpers import ROOT, encode, photo

UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1


def config(**parameters: str) -> dict:
    params = {"crop_pct": "0.875", "interpolation": "bicubic", "input_size": "299", "weights": "random-init"}
    params.update(parameters)
    return {
        "config": {
            "name": "inception_v4",
            "max_batch_size": 64,
            "input": [{"name": "image__0", "data_type": "TYPE_UINT8", "dims": ["299", "299", "3"]}],
            "output": [{"name": "probabilities__0", "data_type": "TYPE_FP32", "dims": ["1000"]}],
            "parameters": {k: {"string_value": v} for k, v in params.items()},
        }
    }


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_API_KEYS", "a, b")
    monkeypatch.setenv("GATEWAY_CORS_ORIGINS", "https://app.example")
    monkeypatch.setenv("GATEWAY_MAX_BODY_BYTES", "1000")
    monkeypatch.setenv("GATEWAY_DEFAULT_MODEL", "inception_resnet_v2")
    s = Settings()
    assert s.api_keys == ["a", "b"] and s.cors_origins == ["https://app.example"]
    assert s.max_body_bytes == 1000 and s.default_model == "inception_resnet_v2"
    assert s.labels_path is not None and s.labels_path.is_file()
    monkeypatch.setenv("GATEWAY_DEFAULT_MODEL", "inception_ensemble_mean")
    with pytest.raises(ValueError):
        Settings()


def test_routing() -> None:
    s = Settings(triton_grpc_url=UNREACHABLE)
    assert resolve(s, None).targets == ("inception_v4",)
    assert resolve(s, "ensemble").targets == ("inception_ensemble",)
    assert resolve(s, "inception_resnet_v1").name == "inception_resnet_v1"
    plan = resolve(s, None, ["inception_v4", "inception_resnet_v2"], [1, 3])
    assert plan.targets == ("inception_v4", "inception_resnet_v2") and plan.weights == (0.25, 0.75)
    assert plan.name == "ensemble(inception_v4,inception_resnet_v2)" and plan.label == "custom_ensemble"
    with pytest.raises(UnknownModel) as unknown:
        resolve(s, "inception_ensemble_mean")  # internal, never routable
    assert "inception_v4" in unknown.value.message
    for bad in (
        dict(model="inception_v4", models=["inception_v4", "inception_resnet_v1"]),
        dict(model=None, models=["inception_v4"]),
        dict(model=None, models=["inception_v4", "inception_v4"]),
        dict(model=None, models=["inception_v4", "inception_ensemble"]),
        dict(model=None, models=["inception_v4", "inception_resnet_v1"], weights=[1.0]),
        dict(model=None, models=["inception_v4", "inception_resnet_v1"], weights=[0.0, 0.0]),
        dict(model="inception_v4", weights=[1.0]),
    ):
        with pytest.raises(InvalidRequest):
            resolve(s, **bad)  # type: ignore[arg-type]
    assert metric_label(s, "whatever-a-client-sends") == "unknown"
    assert metric_label(s, "ensemble") == "inception_ensemble"


def test_parse_model_config() -> None:
    info = parse_model_config(config(crop_pct="0.8975", weights="pretrained:timm/x", weights_sha256="ab"))
    assert info.preprocessing.crop_pct == 0.8975 and info.weights == "pretrained:timm/x"
    assert not info.random_init and not info.is_ensemble and info.max_batch_size == 64
    ensemble = parse_model_config(config(members="a,b,c", member_weights="0.5,0.25,0.25"))
    assert ensemble.members == ("a", "b", "c") and ensemble.member_weights == (0.5, 0.25, 0.25)
    with pytest.raises(ConfigError):
        parse_model_config(config(members="a,b", member_weights="1"))
    broken = config()
    broken["config"]["input"][0]["data_type"] = "TYPE_FP32"
    with pytest.raises(ConfigError):
        parse_model_config(broken)


def test_triton_errors_are_mapped_without_internals() -> None:
    s = Settings(triton_grpc_url=UNREACHABLE)
    cases = {
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses; 10.0.0.7:8001"): (
            503,
            "backend_unavailable",
        ),
        ("StatusCode.UNAVAILABLE", "Request for unknown model: 'x' has no available versions"): (
            503,
            "model_unavailable",
        ),
        ("StatusCode.UNAVAILABLE", "Exceeds maximum queue size"): (429, "overloaded"),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded"): (504, "backend_timeout"),
        ("StatusCode.INTERNAL", "Traceback ... torch ... /opt/tritonserver"): (502, "backend_error"),
    }
    for (status, message), (http, code) in cases.items():
        error = map_triton_error(InferenceServerException(msg=message, status=status), "inception_v4", s)
        assert (error.status, error.code) == (http, code)
        assert "10.0.0.7" not in error.message and "torch" not in error.message
        if http in (429, 503):
            assert "Retry-After" in error.headers


def test_no_torch_import_anywhere_in_the_gateway() -> None:
    """Static: service/ and embedded/ never import torch (nor the torch-importing inception)."""
    for path in [*(ROOT / "service").rglob("*.py"), *(ROOT / "embedded").rglob("*.py")]:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in ("torch", "inception", "timm", "torchvision"), (path, name)


@pytest.fixture(scope="module")
def offline_client() -> TestClient:
    """The app with no Triton behind it: it must start, and say so per request."""
    app = create_app(Settings(triton_grpc_url=UNREACHABLE, triton_timeout_s=3, api_keys=[]))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client  # type: ignore[misc]


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
    assert {m["name"] for m in models} == {
        "inception_v4",
        "inception_resnet_v1",
        "inception_resnet_v2",
        "inception_ensemble",
    }
    assert all(m["state"] == "unavailable" for m in models)


def test_request_errors_before_triton(offline_client: TestClient) -> None:
    """Errors decided by the gateway alone, each as the JSON error body."""
    png = encode(Image.new("RGB", (8, 8)), "PNG")
    cases = [
        (dict(content=b"", headers={"Content-Type": "image/png"}), 400, "empty_body"),
        (dict(content=b"hello", headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type"),
        (
            dict(content=png, headers={"Content-Type": "image/png"}, params={"top_k": 0}),
            422,
            "invalid_request",
        ),
        (
            dict(content=png, headers={"Content-Type": "image/png"}, params={"model": "nope"}),
            404,
            "unknown_model",
        ),
        (dict(json={"image": "@@@"}), 422, "invalid_request"),
        (dict(json={"image": base64.b64encode(png).decode(), "top_k": 1001}), 422, "invalid_request"),
        (dict(json={"picture": "x"}), 422, "invalid_request"),
        (dict(content=b"{", headers={"Content-Type": "application/json"}), 422, "invalid_request"),
        (dict(files={"file": ("a.png", png, "image/png")}), 422, "invalid_request"),
    ]
    for kwargs, status, code in cases:
        answer = offline_client.post("/v1/classify", **kwargs)  # type: ignore[arg-type]
        assert answer.status_code == status, (kwargs.keys(), answer.text)
        assert answer.json()["error"]["code"] == code
        assert answer.headers["X-Request-ID"]
    assert offline_client.get("/nowhere").json()["error"]["code"] == "not_found"
    assert offline_client.get("/v1/classify").json()["error"]["code"] == "method_not_allowed"


def test_request_id_is_echoed_or_made(offline_client: TestClient) -> None:
    given = offline_client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert given.headers["X-Request-ID"] == "abc-123"
    made = offline_client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert made.headers["X-Request-ID"] != "bad id\twith spaces" and len(made.headers["X-Request-ID"]) == 32


def test_top_k_is_sorted_and_stable() -> None:
    app = create_app(Settings(triton_grpc_url=UNREACHABLE))
    gateway = app.state.gateway
    p = np.zeros(1000, dtype=np.float32)
    p[[3, 7, 500]] = [0.2, 0.5, 0.2]
    top = gateway.top_k(p, 4)
    assert [t.class_id for t in top] == [7, 3, 500, 0]
    assert top[0].label == gateway.labels[7]
    assert len(gateway.top_k(p, 1000)) == 1000


def test_openapi_documents_the_three_input_forms(offline_client: TestClient) -> None:
    spec = offline_client.get("/openapi.json").json()
    body = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*", "application/json"} <= set(body)
    assert offline_client.get("/docs").status_code == 200


def test_labels_file_is_the_exporters(tmp_path: Path) -> None:
    labels = (ROOT / "inception" / "data" / "imagenet_labels.txt").read_text().splitlines()
    assert len(labels) == 1000 and labels[0].startswith("tench")
    short = tmp_path / "labels.txt"
    short.write_text("a\nb\n")
    with pytest.raises(RuntimeError):
        create_app(Settings(triton_grpc_url=UNREACHABLE, labels_path=short))


def test_cmyk_upload_shape() -> None:
    """The CMYK JPEG of the integration tests really is CMYK."""
    data = encode(Image.open(photo("chelsea.png")).convert("CMYK"), "JPEG")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"


def test_concurrency_limit_answers_429() -> None:
    import asyncio

    from service.errors import Overloaded

    app = create_app(Settings(triton_grpc_url=UNREACHABLE, max_concurrency=1, queue_timeout_s=0.05))
    gateway = app.state.gateway

    async def scenario() -> None:
        async with gateway.slot():
            with pytest.raises(Overloaded) as refused:
                async with gateway.slot():
                    pass
            assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "1"
        async with gateway.slot():  # released again
            pass

    asyncio.run(scenario())


def test_json_bodies_that_break_the_parser_are_422(offline_client: TestClient) -> None:
    """Deep nesting (RecursionError) and an integer past Python's digit limit (ValueError)
    are the client's mistakes, not the gateway's 500."""
    for body in (b"[" * 100_000, b'{"image": "aGk=", "top_k": ' + b"1" * 5000 + b"}"):
        headers = {"Content-Type": "application/json"}
        answer = offline_client.post("/v1/classify", content=body, headers=headers)
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["code"] == "invalid_request"


def test_per_request_ensemble_weights_must_be_finite() -> None:
    """NaN passes every comparison and infinities sum to NaN or to all-zero weights."""
    s = Settings(triton_grpc_url=UNREACHABLE)
    models = ["inception_v4", "inception_resnet_v2"]
    for weights in ([float("nan"), 1.0], [float("inf"), 1.0], [1e308, 1e308], [-1.0, 2.0]):
        with pytest.raises(InvalidRequest):
            resolve(s, None, models, weights)


def test_nan_weights_from_the_query_are_422(offline_client: TestClient) -> None:
    png = encode(Image.new("RGB", (8, 8)), "PNG")
    answer = offline_client.post(
        "/v1/classify",
        content=png,
        headers={"Content-Type": "image/png"},
        params={"models": "inception_v4,inception_resnet_v2", "weights": "nan,1"},
    )
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_request"


def test_queue_timeout_zero_takes_a_free_slot() -> None:
    """``queue_timeout_s=0`` means "do not wait", not "refuse everything"."""
    import asyncio

    from service.errors import Overloaded

    app = create_app(Settings(triton_grpc_url=UNREACHABLE, max_concurrency=1, queue_timeout_s=0))
    gateway = app.state.gateway

    async def scenario() -> None:
        async with gateway.slot():
            with pytest.raises(Overloaded):
                async with gateway.slot():
                    pass
        async with gateway.slot():
            pass

    asyncio.run(scenario())


@pytest.mark.parametrize("content_type", [b"image/jpeg", b"multipart/form-data; boundary=xyz"])
def test_client_disconnect_mid_body_is_not_a_500(content_type: bytes) -> None:
    """A client that leaves mid-upload is counted as 499, not as a server error, and no
    traceback is logged for it."""
    import asyncio
    import logging

    from prometheus_client import REGISTRY

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
    before = REGISTRY.get_sample_value(
        "inception_gateway_errors_total", {"model": "inception_v4", "code": "client_disconnected"}
    )
    try:
        asyncio.run(app(scope, receive, send))
    finally:
        logging.getLogger("service").removeHandler(handler)
    assert sent == [] and errors == []
    after = REGISTRY.get_sample_value(
        "inception_gateway_errors_total", {"model": "inception_v4", "code": "client_disconnected"}
    )
    assert (after or 0) - (before or 0) == 1
