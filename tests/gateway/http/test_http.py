"""End to end over HTTP: a real uvicorn serving the gateway, a real tritonserver behind it."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image, features

from service.imaging import configure_pillow, prepare
from service.model_inputs import Preprocessing

from ...helpers import ROOT, TritonEndpoint
from ..helpers import (
    GatewayProcess,
    classify,
    encode,
    photo,
    png_bomb,
    probabilities,
    raw_http,
    vector,
)

pytestmark = pytest.mark.integration

FAST = "inception_resnet_v1"  # the cheapest model on 2 CPU cores


def chelsea() -> Image.Image:
    return Image.open(photo("chelsea.png")).convert("RGB")


GRACE = photo("grace_hopper.jpg").read_bytes()
GRACE_B64 = base64.b64encode(GRACE).decode()
INPUT_FORMS: dict[str, Callable[[httpx.Client], httpx.Response]] = {
    "octet-stream": lambda c: classify(c, GRACE, "application/octet-stream", top_k=10),
    "multipart": lambda c: c.post(
        "/v1/classify", files={"image": ("g.jpg", GRACE, "image/jpeg")}, params={"top_k": 10}
    ),
    "multipart-fields": lambda c: c.post(
        "/v1/classify", files={"image": ("g.jpg", GRACE, "image/jpeg")}, data={"top_k": "10"}
    ),
    "json": lambda c: c.post("/v1/classify", json={"image": GRACE_B64, "top_k": 10}),
    "json-data-url": lambda c: c.post(
        "/v1/classify", json={"image": f"data:image/jpeg;base64,{GRACE_B64}", "top_k": 10}
    ),
}


@pytest.fixture(scope="module")
def raw_body_answer(client: httpx.Client) -> dict[int, float]:
    reference = probabilities(classify(client, GRACE, top_k=10))
    assert len(reference) == 10
    return reference


@pytest.mark.parametrize("form", list(INPUT_FORMS))
def test_every_input_form_gives_the_same_predictions(
    client: httpx.Client, raw_body_answer: dict[int, float], form: str
) -> None:
    answer = INPUT_FORMS[form](client)
    scores = probabilities(answer)
    assert list(scores) == list(raw_body_answer)
    assert np.allclose(list(scores.values()), list(raw_body_answer.values()), atol=1e-6)
    assert answer.json()["model"] == "inception_v4"


def test_answer_shape_and_labels(client: httpx.Client, gateway_triton: TritonEndpoint) -> None:
    data = photo("grace_hopper.jpg").read_bytes()
    answer = client.post(
        "/v1/classify", content=data, headers={"Content-Type": "image/jpeg", "X-Request-ID": "req-42"}
    )
    body = answer.json()
    assert answer.headers["X-Request-ID"] == "req-42" and body["request_id"] == "req-42"
    assert body["model"] == "inception_v4" and len(body["predictions"]) == 5
    scores = [p["score"] for p in body["predictions"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert set(body["timing_ms"]) == {"read", "decode", "preprocess", "triton", "postprocess", "total"}
    labels = (ROOT / "inception" / "data" / "imagenet_labels.txt").read_text().splitlines()
    assert all(labels[p["class_id"]] == p["label"] for p in body["predictions"])
    weights = client.get("/v1/models").json()["models"][0]["weights"]
    assert body["weights"] == weights
    if weights == "random-init":
        assert body["random_init"] is True and "random" in body["warning"]
    # Triton's own classification extension (label_filename) names the same top class.
    configure_pillow(50_000_000)
    tensor = prepare(data, [Preprocessing(0.875)], max_pixels=50_000_000).inputs[Preprocessing(0.875)]
    triton = grpcclient.InferenceServerClient(gateway_triton.grpc_url)
    inputs = grpcclient.InferInput("image__0", [1, 299, 299, 3], "UINT8")
    inputs.set_data_from_numpy(tensor[None])
    result = triton.infer(
        "inception_v4", [inputs], outputs=[grpcclient.InferRequestedOutput("probabilities__0", class_count=1)]
    )
    score, index, label = result.as_numpy("probabilities__0")[0][0].decode().split(":", 2)
    assert int(index) == body["predictions"][0]["class_id"] and label == body["predictions"][0]["label"]
    assert abs(float(score) - body["predictions"][0]["score"]) < 1e-5


def test_exif_rotated_jpeg_is_classified_as_the_rotated_image(client: httpx.Client) -> None:
    upright = chelsea().crop((0, 0, 448, 288))  # multiples of 16: rotating keeps JPEG blocks aligned
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    tagged = encode(stored, "JPEG", quality=100, subsampling=0, exif=exif.tobytes())
    untagged = encode(stored, "JPEG", quality=100, subsampling=0)
    reference = np.array(
        vector(classify(client, encode(upright, "JPEG", quality=100, subsampling=0), model=FAST, top_k=1000))
    )
    as_tagged = np.array(vector(classify(client, tagged, model=FAST, top_k=1000)))
    as_stored = np.array(vector(classify(client, untagged, model=FAST, top_k=1000)))
    near, far = np.abs(as_tagged - reference).sum(), np.abs(as_stored - reference).sum()
    print(f"exif: L1 to upright {near:.3e}, untagged {far:.3e}")
    assert near < far / 5, (near, far)


def _variants() -> dict[str, tuple[bytes, str]]:
    base = chelsea()
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.info["transparency"] = 0
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    grey16 = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    variants = {
        "cmyk-jpeg": (encode(base.convert("CMYK"), "JPEG", quality=90), "image/jpeg"),
        "rgba-png": (encode(rgba, "PNG"), "image/png"),
        "16bit-png": (encode(grey16, "PNG"), "image/png"),
        "palette-gif": (encode(palette, "GIF"), "image/gif"),
        "bmp": (encode(base, "BMP"), "image/bmp"),
        "tiff": (encode(base, "TIFF"), "image/tiff"),
        "grey-png": (encode(base.convert("L"), "PNG"), "image/png"),
    }
    if features.check("webp"):
        variants["webp"] = (encode(base, "WEBP", quality=90), "image/webp")
    return variants


@pytest.mark.parametrize("variant", list(_variants()))
def test_formats_and_modes_answer_200(client: httpx.Client, variant: str) -> None:
    data, content_type = _variants()[variant]
    answer = classify(client, data, content_type, model=FAST)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["predictions"]) == 5


def _serves(client: httpx.Client) -> None:
    assert client.get("/healthz").status_code == 200


def _oversized_chunks(total: int, chunked: bool, size: int = 256 * 1024) -> Iterator[bytes]:
    payload = b"\xff" * size
    for _ in range(total // size):
        yield (f"{size:x}\r\n".encode() + payload + b"\r\n") if chunked else payload


ROCKET = photo("rocket.jpg").read_bytes()
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto showpage\n"
BAD_REQUESTS: dict[str, tuple[Callable[[httpx.Client], httpx.Response], int, str]] = {
    "truncated jpeg": (lambda c: classify(c, ROCKET[: len(ROCKET) // 2]), 400, "invalid_image"),
    "random bytes": (lambda c: classify(c, np.random.default_rng(1).bytes(50_000)), 400, "invalid_image"),
    "empty body": (lambda c: classify(c, b""), 400, "empty_body"),
    "decompression bomb": (
        lambda c: classify(c, png_bomb(30_000, 30_000), "image/png"),
        413,
        "image_too_large",
    ),
    "wrong media type": (lambda c: classify(c, ROCKET, "text/plain"), 415, "unsupported_media_type"),
    "eps": (lambda c: classify(c, EPS, "image/x-eps"), 415, "unsupported_image_format"),
    "unknown model": (lambda c: classify(c, ROCKET, model="resnet50"), 404, "unknown_model"),
    "top_k 0": (lambda c: classify(c, ROCKET, top_k=0), 422, "invalid_request"),
    "top_k 1001": (lambda c: classify(c, ROCKET, top_k=1001), 422, "invalid_request"),
    "json top_k": (
        lambda c: c.post("/v1/classify", json={"image": "", "top_k": 5000}),
        422,
        "invalid_request",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_errors_answer_json_and_the_gateway_keeps_serving(client: httpx.Client, case: str) -> None:
    send, status, code = BAD_REQUESTS[case]
    answer = send(client)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == code and error["message"]
    assert "Traceback" not in answer.text and "File " not in answer.text
    if code == "unknown_model":
        assert "inception_v4" in error["message"]
    _serves(client)


@pytest.mark.parametrize("chunked", [False, True], ids=["declared-length", "chunked"])
def test_oversized_bodies_are_refused_while_they_stream(
    client: httpx.Client, gateway: GatewayProcess, chunked: bool
) -> None:
    limit = 16 * 1024 * 1024
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {4 * limit}\r\n".encode()
    head = b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\n" + framing + b"\r\n"
    answer, sent = raw_http(gateway.port, head, _oversized_chunks(4 * limit, chunked))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"payload_too_large"' in answer
    assert sent < 2 * limit, sent  # refused long before the 64 MiB were sent
    if not chunked:
        assert sent < limit // 4  # a declared length is refused before reading
    _serves(client)
    assert classify(client, ROCKET, model=FAST).status_code == 200


def test_api_keys(gateway_triton: TritonEndpoint, tmp_path_factory: pytest.TempPathFactory) -> None:
    from ..helpers import running_gateway

    log = tmp_path_factory.mktemp("keyed") / "gateway.log"
    env = {"GATEWAY_API_KEYS": "k1,secret-2"}
    with running_gateway(gateway_triton.grpc_url, log, env=env) as keyed, keyed.client() as http:
        data = photo("chelsea.png").read_bytes()
        missing = classify(http, data, "image/png", model=FAST)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        wrong = http.post(
            "/v1/classify",
            content=data,
            headers={"Content-Type": "image/png", "Authorization": "Bearer nope"},
        )
        assert wrong.status_code == 401
        assert http.get("/v1/models").status_code == 401
        assert http.get("/healthz").status_code == 200 and http.get("/readyz").status_code == 200
        bearer = http.post(
            "/v1/classify",
            content=data,
            params={"model": FAST},
            headers={"Content-Type": "image/png", "Authorization": "Bearer secret-2"},
        )
        assert bearer.status_code == 200, bearer.text
        header = http.post(
            "/v1/classify",
            content=data,
            params={"model": FAST},
            headers={"Content-Type": "image/png", "X-API-Key": "k1"},
        )
        assert header.status_code == 200


def test_models_listing(client: httpx.Client) -> None:
    body = client.get("/v1/models").json()
    names = [m["name"] for m in body["models"]]
    assert names == ["inception_v4", "inception_resnet_v1", "inception_resnet_v2", "inception_ensemble"]
    assert "inception_ensemble_mean" not in names and body["default"] == "inception_v4"
    by_name = {m["name"]: m for m in body["models"]}
    assert all(m["state"] == "ready" for m in body["models"])
    assert by_name["inception_resnet_v2"]["preprocessing"]["crop_pct"] == pytest.approx(0.8975)
    assert by_name["inception_ensemble"]["aliases"] == ["ensemble"]
    assert {m["model"] for m in by_name["inception_ensemble"]["members"]} == {
        "inception_v4",
        "inception_resnet_v1",
        "inception_resnet_v2",
    }


def test_cors_preflight(gateway_triton: TritonEndpoint, tmp_path_factory: pytest.TempPathFactory) -> None:
    from ..helpers import GatewayProcess as Process

    process = Process(
        gateway_triton.grpc_url,
        tmp_path_factory.mktemp("cors") / "gateway.log",
        env={"GATEWAY_CORS_ORIGINS": "https://app.example"},
    )
    try:
        process.start().wait("/healthz")
        preflight = httpx.options(
            process.url + "/v1/classify",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(
            process.url + "/v1/classify",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in other.headers
    finally:
        process.stop()


def test_structured_logs_carry_the_request_id(client: httpx.Client, gateway: GatewayProcess) -> None:
    import json

    answer = client.post(
        "/v1/classify",
        content=b"garbage",
        params={"model": FAST},
        headers={"Content-Type": "image/png", "X-Request-ID": "log-check-7"},
    )
    assert answer.status_code == 400
    deadline = time.monotonic() + 10
    lines: list[dict] = []
    while time.monotonic() < deadline and not lines:
        text = gateway.log_path.read_text(errors="replace")
        lines = [json.loads(x) for x in text.splitlines() if x.startswith("{") and "log-check-7" in x]
        time.sleep(0.1)
    access = [x for x in lines if x["logger"] == "service.access"]
    assert access and access[0]["request_id"] == "log-check-7"
    assert access[0]["status"] == 400 and access[0]["error_code"] == "invalid_image"
    assert access[0]["model"] == FAST and access[0]["duration_ms"] > 0


def test_deadline_passed_is_504(
    gateway_triton: TritonEndpoint, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A live Triton slower than the deadline (50 ms for a 150 ms forward pass): 504. With
    admission control off: on, it knows Triton's rate from its statistics and refuses the
    request at once (503, tests/gateway/load/test_rate_seed.py), never reaching the timeout."""
    from ..helpers import running_gateway

    log = tmp_path_factory.mktemp("deadline") / "gateway.log"
    env = {"GATEWAY_TRITON_TIMEOUT_S": "0.05", "GATEWAY_ADMISSION": "false"}
    with running_gateway(gateway_triton.grpc_url, log, env=env) as slow, slow.client() as http:
        answer = classify(http, photo("grace_hopper.jpg").read_bytes(), model="inception_resnet_v2")
        assert answer.status_code == 504, answer.text
        assert answer.json()["error"]["code"] == "backend_timeout"
        assert http.get("/healthz").status_code == 200
