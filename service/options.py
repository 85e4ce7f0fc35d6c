"""The options of ``POST /v1/classify``, declared once, and the forms they travel in.

:class:`ClassifyOptions` is the one declaration of each option: its type, bounds, default
and description. A request carries the options in one of three forms, each derived from
that declaration, so that adding an option is one edit and no form can forget it:

- as text: the query string (:data:`ClassifyQuery`, which FastAPI validates and documents)
  and the multipart fields (:data:`OPTION_FIELDS`, documented by :data:`MULTIPART_SCHEMA`),
  where a list travels as one comma-separated string;
- as JSON (:data:`ClassifyJson`): the options as JSON values beside the base64 image,
  a list as an array or, as in the query, one comma-separated string.

:func:`parse_options` reads any of them into a :class:`ClassifyOptions` (422 on anything
wrong).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, get_args, get_origin

from annotated_types import MaxLen
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic.fields import FieldInfo

from inception.contract import NETWORKS

from .crops import CROPS_DESCRIPTION, Crops
from .errors import InvalidRequest
from .option_marks import COMPUTED, PRESENTED, ROUTED, Bearing, CommaSeparated, bearing

MAX_TOP_K = 1000
#: The most members a per-request ensemble may name (and weights it may give): more than any
#: deployment routes, few enough that a list costs nothing to parse. An 11.2 M-item
#: `weights` array held the event loop 3 s and 751 MiB before lists had a length.
MAX_MEMBERS = 16
#: The longest model name the text forms make room for (Triton's names are far shorter): the
#: text of `models` is at most 16 of them. A longer name is an unknown one (404).
MAX_NAME_CHARS = 128
#: The image's field, in a multipart body (repeated for several) and in a JSON one.
IMAGE_FIELD = "image"
#: The JSON body's field for several images, an array of base64 strings.
IMAGES_FIELD = "images"
#: The most images one request may carry: Triton's ``max_batch_size`` in every model's
#: config, so that the images of a request go to a model as one batch. The schema's bound;
#: ``GATEWAY_MAX_IMAGES`` may set a lower one.
MAX_IMAGES = 64


#: Comma-separated non-negative decimal numbers, as `weights` travels in a query or a form.
#: Blank is allowed: an empty option is an absent one (:func:`parse_options`).
WEIGHTS_PATTERN = r"^\s*((\d+(\.\d*)?|\.\d+)(\s*,\s*(\d+(\.\d*)?|\.\d+))*)?\s*$"


class ClassifyOptions(BaseModel):
    """Options of ``POST /v1/classify``, from the query string, form fields or JSON body."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Annotated[str | None, ROUTED] = Field(
        None, description="a model name, `ensemble`, or omitted for the default"
    )
    models: Annotated[
        list[str] | None, CommaSeparated(f"{NETWORKS[0]},{NETWORKS[-1]}", item_chars=MAX_NAME_CHARS), ROUTED
    ] = Field(
        None,
        max_length=MAX_MEMBERS,
        description="a per-request ensemble: models the gateway runs concurrently and averages",
    )
    weights: Annotated[
        list[Annotated[float, Field(ge=0)]] | None, CommaSeparated("0.5,0.5", WEIGHTS_PATTERN), ROUTED
    ] = Field(
        None,
        max_length=MAX_MEMBERS,
        description="non-negative weights of `models`, not all zero (default: equal)",
    )
    top_k: Annotated[int, PRESENTED] = Field(5, ge=1, le=MAX_TOP_K, description="how many classes to answer")
    crops: Annotated[Crops, COMPUTED] = Field(1, description=CROPS_DESCRIPTION)


#: The options that change how probabilities are computed, beside the route: the cache's key.
COMPUTED_OPTIONS = tuple(
    name for name, field in ClassifyOptions.model_fields.items() if bearing(name, field) is COMPUTED
)


def computed_options(options: ClassifyOptions) -> dict[str, Any]:
    """What of ``options`` the answer cache keys on beside the resolved route."""
    return {name: getattr(options, name) for name in COMPUTED_OPTIONS}


def _without_none(annotation: Any) -> Any:
    """``T`` of an optional ``T | None``, else the annotation itself."""
    members = [a for a in get_args(annotation) if a is not type(None)]
    return members[0] if type(None) in get_args(annotation) and len(members) == 1 else annotation


def _is_list(field: FieldInfo) -> bool:
    return get_origin(_without_none(field.annotation)) is list


def _max_items(field: FieldInfo) -> int:
    """The most items a list option may hold (its ``max_length``): every list has one."""
    bound = next((m.max_length for m in field.metadata if isinstance(m, MaxLen)), None)
    if bound is None:
        raise TypeError("a list option needs a max_length, so that no form of it is unbounded")
    return int(bound)


def as_text(name: str, field: FieldInfo) -> tuple[Any, str]:
    """An option's type and description as text (a query parameter, a form field): a list
    becomes one comma-separated string, anything else keeps its type and bounds."""
    description = field.description or ""
    if _is_list(field):
        comma = next((m for m in field.metadata if isinstance(m, CommaSeparated)), None)
        if comma is None:
            raise TypeError(f"the list option {name!r} needs CommaSeparated(...) for its text form")
        chars = _max_items(field) * (comma.item_chars + 1)
        text = Annotated[str, Field(pattern=comma.pattern, max_length=chars)]
        return text, f"{description}; comma-separated, e.g. `{comma.example}`"
    inner = _without_none(field.annotation)
    extras = [Field(json_schema_extra=field.json_schema_extra)] if field.json_schema_extra else []
    metadata = [m for m in field.metadata if not isinstance(m, CommaSeparated | Bearing)] + extras
    return (Annotated[(inner, *metadata)] if metadata else inner), description


def query_model(options: type[BaseModel]) -> type[BaseModel]:
    """The options as a query string: each one text, and absent unless given (so that the
    query wins over the body only where it says something)."""
    fields: dict[str, Any] = {}
    for name, field in options.model_fields.items():
        text, description = as_text(name, field)
        if field.default is not None:
            description += f" (default {field.default})"
        fields[name] = (text | None, Field(None, description=description))
    return create_model(
        options.__name__.removesuffix("Options") + "Query",
        __config__=ConfigDict(protected_namespaces=()),
        __doc__=f"The query string of {options.__name__}: raw text, parsed and checked together "
        "with the body's fields by `parse_options` (query parameters win).",
        **fields,
    )


def multipart_schema(options: type[BaseModel]) -> dict[str, Any]:
    """The multipart body as OpenAPI describes it: the image file (one part, or several
    for a batch: OpenAPI's array of a multipart field is the part repeated) and each option as text.
    FastAPI cannot infer it, because the route reads the body itself to bound it."""
    properties: dict[str, Any] = {
        IMAGE_FIELD: {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "minItems": 1,
            "maxItems": MAX_IMAGES,
            "description": f"the image file; repeat the part for a batch of at most {MAX_IMAGES}, "
            "answered with one result per image, in order",
        }
    }
    for name, field in options.model_fields.items():
        text, description = as_text(name, field)
        schema = TypeAdapter(text).json_schema()
        schema["description"] = description
        if field.default is not None:
            schema["default"] = field.default
        properties[name] = schema
    return {
        "type": "object",
        "required": [IMAGE_FIELD],
        "additionalProperties": False,
        "properties": properties,
    }


#: One image of a JSON body: the file's bytes in base64.
Base64Image = Annotated[
    str, Field(min_length=1, json_schema_extra={"format": "byte", "contentEncoding": "base64"})
]


def _one_image_field(values: Any) -> Any:
    """A JSON body carries `image` (one) or `images` (several), never both nor neither."""
    if isinstance(values, dict) and (values.get(IMAGE_FIELD) is None) == (values.get(IMAGES_FIELD) is None):
        raise ValueError(f"give either {IMAGE_FIELD!r} (one image) or {IMAGES_FIELD!r} (an array), not both")
    return values


def json_body_schema() -> dict[str, Any]:
    """The JSON body's schema, saying what :func:`_one_image_field` checks."""
    schema = ClassifyJson.model_json_schema()
    schema["oneOf"] = [{"required": [IMAGE_FIELD]}, {"required": [IMAGES_FIELD]}]
    return schema


def json_model(options: type[BaseModel]) -> type[BaseModel]:
    """The JSON body: the options as JSON values, each list as an array of strict JSON
    values (a weight is a number, not ``"1"``) or, as in the query, one comma-separated
    string; and the image, base64, or several images, an array of them (a batch)."""
    fields: dict[str, Any] = {
        # Absent, not null, when not given (the schema says so): exactly one of the two.
        IMAGE_FIELD: (
            Base64Image,
            Field(None, description="the image file's bytes, base64 (a `data:` URL prefix is accepted)"),
        ),
        IMAGES_FIELD: (
            Annotated[list[Base64Image], Field(min_length=1, max_length=MAX_IMAGES)],
            Field(
                None,
                description=f"several images (at most {MAX_IMAGES}), each as `image`: a batch, answered "
                "with one result per image, in order",
            ),
        ),
    }
    for name, field in options.model_fields.items():
        if _is_list(field):
            (item,) = get_args(_without_none(field.annotation))
            values = list.__class_getitem__(Annotated[(item, Strict())])  # of JSON values as they are
            array: Any = Annotated[(values, Field(max_length=_max_items(field)))]
            text, _ = as_text(name, field)
            description = f"{field.description}; an array, or one comma-separated string"
            fields[name] = (array | text | None, Field(None, description=description))
    return create_model(
        options.__name__.removesuffix("Options") + "Json",
        __base__=options,
        __validators__={"_one_image_field": model_validator(mode="before")(_one_image_field)},  # type: ignore[dict-item]
        __doc__=f"The JSON form of {options.__name__}: the options as JSON values, a list as an "
        "array or, as in the query string, one comma-separated string; and the image, base64.",
        **fields,
    )


#: The forms of :class:`ClassifyOptions` (see the module's docstring).
if TYPE_CHECKING:
    ClassifyQuery = BaseModel  # a class built at run time is no type to mypy: it sees the base
else:
    ClassifyQuery = query_model(ClassifyOptions)
ClassifyJson = json_model(ClassifyOptions)
OPTION_FIELDS = tuple(ClassifyOptions.model_fields)
MULTIPART_SCHEMA = multipart_schema(ClassifyOptions)


def _csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def describe(exc: ValidationError) -> str:
    """A validation error as one line a client can act on: where, and what is wrong."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)


def parse_options(raw: dict[str, Any]) -> ClassifyOptions:
    """Options from strings or JSON values, validated (422 on anything wrong).

    An empty value is an absent one: an HTML form sends its unset fields as `name=`, and
    `?weights=` asks for no weights rather than for an empty list of them."""
    values = {k: v for k, v in raw.items() if v is not None and not (isinstance(v, str) and not v.strip())}
    for key, field in ClassifyOptions.model_fields.items():
        if key in values and _is_list(field):
            values[key] = _csv(values[key])
            if values[key] == []:
                del values[key]
    try:
        return ClassifyOptions.model_validate(values)
    except ValidationError as exc:
        raise InvalidRequest(describe(exc)) from None
