"""The request options are declared once (service/options.py): the query model, the
multipart fields and their schema, and the JSON body follow ClassifyOptions, and a new
option shows up in every form without another edit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import Field, ValidationError
from starlette.datastructures import Headers

from service.app import create_app
from service.errors import InvalidRequest
from service.inputs import BodyForm, media_type
from service.options import (
    IMAGE_FIELD,
    IMAGES_FIELD,
    MULTIPART_SCHEMA,
    OPTION_FIELDS,
    ClassifyJson,
    ClassifyOptions,
    ClassifyQuery,
    CommaSeparated,
    json_model,
    multipart_schema,
    parse_options,
    query_model,
)
from service.settings import Settings

from ..helpers import UNREACHABLE, encode

PAIR = {"models": "inception_v4,inception_resnet_v2"}
AS_PNG = {"Content-Type": "image/png"}
IMAGE = {"image": ("a.png", encode(Image.new("RGB", (8, 8)), "PNG"), "image/png")}


@pytest.fixture(scope="module")
def offline() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(triton_grpc_url=UNREACHABLE, triton_probe_timeout_s=0.5))) as client:
        yield client


class ExtendedOptions(ClassifyOptions):
    """ClassifyOptions with one option more of each kind: what adding an option looks like."""

    temperature: float = Field(1.0, gt=0, description="softmax temperature")
    labels: Annotated[list[str] | None, CommaSeparated("cat,dog")] = Field(
        None, max_length=8, description="labels kept"
    )


def test_every_form_has_exactly_the_declared_options() -> None:
    declared = set(ClassifyOptions.model_fields)
    assert set(OPTION_FIELDS) == declared
    assert set(ClassifyQuery.model_fields) == declared
    assert set(MULTIPART_SCHEMA["properties"]) == declared | {IMAGE_FIELD}
    assert set(ClassifyJson.model_fields) == declared | {IMAGE_FIELD, IMAGES_FIELD}


def test_a_new_option_shows_up_in_every_form() -> None:
    query = query_model(ExtendedOptions)
    assert {"temperature", "labels"} <= set(query.model_fields)
    given = query.model_validate({"temperature": "0.5", "labels": "cat,dog"}).model_dump(exclude_unset=True)
    assert given == {"temperature": 0.5, "labels": "cat,dog"}  # text, split by parse_options
    with pytest.raises(ValidationError):
        query.model_validate({"temperature": "0"})  # the declared bound holds in the query
    properties = multipart_schema(ExtendedOptions)["properties"]
    assert properties["temperature"]["type"] == "number" and properties["temperature"]["default"] == 1.0
    assert properties["labels"]["type"] == "string" and "cat,dog" in properties["labels"]["description"]
    body = json_model(ExtendedOptions)
    assert {"temperature", "labels", IMAGE_FIELD} <= set(body.model_fields)
    parsed = body.model_validate({"image": "aGk=", "labels": ["cat"], "temperature": 2})
    assert parsed.model_dump()["labels"] == ["cat"]


def test_a_list_option_must_say_how_it_travels_as_text() -> None:
    class Unsaid(ClassifyOptions):
        tags: list[str] | None = None

    with pytest.raises(TypeError, match="tags"):
        query_model(Unsaid)


def test_a_list_option_must_have_a_length() -> None:
    """An unbounded list would let one request parse millions of items (issue 19)."""

    class Unbounded(ClassifyOptions):
        tags: Annotated[list[str] | None, CommaSeparated("a,b")] = None

    with pytest.raises(TypeError, match="max_length"):
        query_model(Unbounded)


def test_the_text_forms_keep_each_options_bounds() -> None:
    properties = MULTIPART_SCHEMA["properties"]
    assert (properties["top_k"]["minimum"], properties["top_k"]["maximum"]) == (1, 1000)
    assert properties["crops"]["enum"] == [1, 10, 144] and properties["crops"]["default"] == 1
    assert properties["weights"]["type"] == "string" and properties["weights"]["pattern"]
    for bad in ({"top_k": "0"}, {"crops": "7"}, {"weights": "1,-1"}):
        with pytest.raises(ValidationError):
            ClassifyQuery.model_validate(bad)


def test_json_lists_are_arrays_of_json_values_or_one_string() -> None:
    parse = ClassifyJson.model_validate
    assert parse({"image": "aGk=", "weights": [1, 0.5]}).model_dump()["weights"] == [1.0, 0.5]
    assert parse({"image": "aGk=", "weights": "1,0.5"}).model_dump()["weights"] == "1,0.5"
    with pytest.raises(ValidationError):
        parse({"image": "aGk=", "weights": ["1"]})  # a weight is a number, not a string
    with pytest.raises(ValidationError):
        parse({"image": "aGk=", "colour": "red"})  # unknown keys are refused, as declared


def test_the_served_document_is_the_derived_one(offline: TestClient) -> None:
    operation = offline.get("/openapi.json").json()["paths"]["/v1/classify"]["post"]
    queried = {p["name"] for p in operation["parameters"] if p["in"] == "query"}
    assert queried == set(OPTION_FIELDS)
    assert operation["requestBody"]["content"]["multipart/form-data"]["schema"] == MULTIPART_SCHEMA


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"models": "inception_v4, inception_resnet_v2", "weights": "1,3"}, ([1.0, 3.0], 5)),
        ({"models": "inception_v4,inception_resnet_v2", "weights": "", "top_k": "7"}, (None, 7)),
        (
            {"models": ["inception_v4", "inception_resnet_v2"], "weights": [2, 1], "top_k": None},
            ([2.0, 1.0], 5),
        ),
    ],
    ids=["text", "empty-is-absent", "json-values"],
)
def test_parse_options_reads_text_and_json_values(
    raw: dict, expected: tuple[list[float] | None, int]
) -> None:
    options = parse_options(raw)
    assert options.models == ["inception_v4", "inception_resnet_v2"]
    assert (options.weights, options.top_k) == expected


def test_parse_options_refuses_what_the_declaration_refuses() -> None:
    with pytest.raises(InvalidRequest, match="top_k"):
        parse_options({"top_k": "1001"})
    with pytest.raises(InvalidRequest, match="colour"):
        parse_options({"colour": "red"})


@pytest.mark.parametrize(
    ("content_type", "media", "form"),
    [
        ("multipart/form-data; boundary=xyz", "multipart/form-data", BodyForm.MULTIPART),
        ("Application/JSON; charset=utf-8", "application/json", BodyForm.JSON),
        ("application/vnd.api+json", "application/vnd.api+json", BodyForm.JSON),
        ("image/JPEG", "image/jpeg", BodyForm.RAW_IMAGE),
        ("application/octet-stream", "application/octet-stream", BodyForm.RAW_IMAGE),
        ("text/plain", "text/plain", None),
        (None, "", None),
    ],
)
def test_media_type_and_body_form(content_type: str | None, media: str, form: BodyForm | None) -> None:
    headers = Headers({"content-type": content_type} if content_type else {})
    assert media_type(headers) == media
    assert BodyForm.of(media) is form


@pytest.mark.parametrize(
    "send",
    [
        lambda c: c.post("/v1/classify", content=b"x", headers=AS_PNG, params={"weights": "1e3,1", **PAIR}),
        lambda c: c.post("/v1/classify", files=IMAGE, data={"weights": "1e3,1", **PAIR}),
        lambda c: c.post("/v1/classify", json={"image": "aGk=", "weights": "1e3,1", **PAIR}),
    ],
    ids=["query", "multipart", "json"],
)
def test_every_text_form_is_checked_as_its_schema_says(
    offline: TestClient, send: Callable[[TestClient], httpx.Response]
) -> None:
    """`1e3` is a float but not a weight as the schema writes one: each form refuses it
    (multipart fields were once parsed without their schema's pattern)."""
    answer = send(offline)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "invalid_request" and "weights" in answer.text


def test_blank_form_fields_are_absent(offline: TestClient) -> None:
    """An HTML form sends its unset fields as `name=`: no 422, the request goes on (to a
    503, for want of a Triton)."""
    answer = offline.post("/v1/classify", files=IMAGE, data={"top_k": "", "weights": " ", "crops": ""})
    assert answer.status_code == 503, answer.text
