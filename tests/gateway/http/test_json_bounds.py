"""JSON within its charge (service/json_body.py, service/options.py): list options have a
length in every form, a JSON body of many values is refused from its bytes before parsing,
and the worst body the bounds let through costs no more than the memory account charges."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from service.bounded_body import MULTIPART_OVERHEAD
from service.classification import JSON_EXPANSION
from service.errors import InvalidRequest
from service.json_body import MAX_JSON_VALUES, JsonBytesCheck, parse_json_body
from service.options import MAX_IMAGES, MAX_MEMBERS, ClassifyQuery, parse_options

from ..helpers import UNREACHABLE, GatewayProcess

LIMIT = 16 * 1024 * 1024


def many_weights(count: int) -> bytes:
    return b'{"image": "AAAA", "weights": [' + b"1," * count + b"1]}"


@pytest.mark.parametrize(
    "options",
    [
        {"weights": [1.0] * (MAX_MEMBERS + 1)},
        {"weights": ",".join(["1"] * (MAX_MEMBERS + 1))},
        {"models": ["inception_v4"] * (MAX_MEMBERS + 1)},
    ],
)
def test_list_options_have_a_length(options: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest):
        parse_options(options)


def test_the_text_forms_are_bounded_too() -> None:
    with pytest.raises(ValidationError):
        ClassifyQuery.model_validate({"models": "x" * 3000})
    schema = ClassifyQuery.model_json_schema()["properties"]
    for name in ("models", "weights"):
        (text, _null) = schema[name]["anyOf"]
        assert 0 < text["maxLength"] <= 4096


def test_a_body_of_millions_of_values_is_refused_before_parsing() -> None:
    body = many_weights(5_000_000)
    started = time.perf_counter()
    with pytest.raises(InvalidRequest, match="values"):
        parse_json_body(body, LIMIT)
    assert time.perf_counter() - started < 0.1  # parsing it took seconds


def test_non_ascii_in_a_large_body_is_refused_before_parsing() -> None:
    """One non-ASCII character makes Python store a whole string at four bytes a character:
    a large body (an image) must be ASCII; a small one may carry a mistyped model name."""
    padding = "A" * (1 << 20)
    for body in (
        f'{{"image": "{padding}", "model": "\u00e9"}}'.encode(),
        f'{{"image": "{padding}\\u00e9"}}'.encode(),
    ):
        with pytest.raises(InvalidRequest, match="ASCII"):
            parse_json_body(body, LIMIT)
    fields, _, _ = parse_json_body('{"image": "AAAA", "model": "caf\u00e9"}'.encode(), LIMIT)
    assert fields["model"] == "caf\u00e9"


@pytest.mark.parametrize("images", [1, MAX_IMAGES])
def test_the_worst_json_body_costs_within_its_charge(images: int) -> None:
    """The largest image as wrapped base64 (whitespace costs a copy) with every option, or
    a batch of the most images that together are as large: parsing it allocates less than
    the account charges beyond the body itself."""
    wrapped = [base64.encodebytes(os.urandom(LIMIT // images)).decode() for _ in range(images)]
    document: dict[str, object] = {"models": "inception_v4,inception_resnet_v1", "weights": [1, 2]}
    document.update({"image": wrapped[0]} if images == 1 else {"images": wrapped})
    body = json.dumps(document).encode()
    tracemalloc.start()
    try:
        fields, data, batch = parse_json_body(body, LIMIT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(data) == images and batch is (images > 1)
    assert sum(map(len, data)) == LIMIT // images * images and fields["weights"] == [1, 2]
    # The body itself is one of the charged copies (service/classification.py's JSON_EXPANSION).
    assert peak <= (JSON_EXPANSION - 1) * len(body), peak / len(body)


@pytest.mark.integration
def test_a_json_bomb_gets_422_and_holds_no_one(client: httpx.Client) -> None:
    """A 10 MiB body of 5 M values, refused at once, while /healthz keeps answering within
    milliseconds (the review measured the loop held 2.4-3.3 s)."""
    body = many_weights(5_000_000)
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=30) as http:
            while not stop.is_set():
                started = time.perf_counter()
                http.get("/healthz")
                latencies.append(time.perf_counter() - started)
                time.sleep(0.005)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        time.sleep(0.2)
        for _ in range(3):
            answer = client.post("/v1/classify", content=body, headers={"Content-Type": "application/json"})
            assert answer.status_code == 422, answer.text
            assert str(MAX_JSON_VALUES) in answer.json()["error"]["message"]
    finally:
        stop.set()
        prober.join()
    assert max(latencies) < 0.25, max(latencies)


def test_the_byte_checks_refuse_at_the_chunk_that_breaks_them() -> None:
    """The body's checks made as it arrives: refused at the chunk where the values pass the
    bound, whatever follows; ASCII enforced once past the options' size."""
    check = JsonBytesCheck()
    check(b'{"image": "AAAA", ')
    with pytest.raises(InvalidRequest, match="values"):
        for _ in range(1000):
            check(b"1," * 16)
    assert check.size < 2 * 16 * MAX_JSON_VALUES  # stopped within a chunk of the bound
    wide = JsonBytesCheck()
    wide("é".encode())  # a small body may carry a mistyped name
    with pytest.raises(InvalidRequest, match="ASCII"):
        wide(b"A" * (MULTIPART_OVERHEAD + 1))


def test_a_huge_json_body_is_refused_before_it_is_all_sent(tmp_path: Path) -> None:
    """A real worker answers 422 for a 21 MiB body of ten million values once its first
    chunks arrive: the client has sent 1 MiB and is still connected, waiting."""
    gateway = GatewayProcess(UNREACHABLE, tmp_path / "gateway.log")
    try:
        gateway.start().wait("/healthz")
        declared = 21 * 1024 * 1024
        head = (
            f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
            sock.sendall(head + b'{"image": "AAAA", "weights": [' + b"1," * (512 * 1024))
            answer = b""
            while b"}}" not in answer:  # the end of the error body
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        assert answer.startswith(b"HTTP/1.1 422"), answer[:200]
        assert b"values" in answer
    finally:
        gateway.stop()
