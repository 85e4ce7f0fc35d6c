"""The API's request options and answers, as pydantic models (they also make /docs)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from .crops import PROTOCOLS, SUPPORTED_CROPS

MAX_TOP_K = 1000


def _supported(crops: int) -> int:
    if crops not in SUPPORTED_CROPS:
        raise ValueError(f"crops must be one of {', '.join(map(str, SUPPORTED_CROPS))}")
    return crops


#: The multi-crop protocols (service/crops.py): 1, 10 (Krizhevsky et al. 2012), 144 (Szegedy
#: et al. 2015). An int checked against them, so that "10" from a query or form is accepted.
Crops = Annotated[int, AfterValidator(_supported), Field(json_schema_extra={"enum": list(SUPPORTED_CROPS)})]
CROPS_DESCRIPTION = (
    "crops averaged: 1 (timm's centre crop), 10 (4 corners + centre and their mirrors, Krizhevsky et al. "
    "2012) or 144 (GoogLeNet's 4 scales x 3 squares x 6 crops x 2 mirrors, Szegedy et al. 2015)"
)


#: Comma-separated non-negative decimal numbers, as `weights` travels in a query or a form.
#: Blank is allowed: an empty option is an absent one (service/inputs.py).
WEIGHTS_PATTERN = r"^\s*((\d+(\.\d*)?|\.\d+)(\s*,\s*(\d+(\.\d*)?|\.\d+))*)?\s*$"


class ClassifyOptions(BaseModel):
    """Options of ``POST /v1/classify``, from the query string, form fields or JSON body."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(None, description="a model name, `ensemble`, or omitted for the default")
    models: list[str] | None = Field(
        None, description="a per-request ensemble: models the gateway runs concurrently and averages"
    )
    weights: list[Annotated[float, Field(ge=0)]] | None = Field(
        None, description="non-negative weights of `models`, not all zero (default: equal)"
    )
    top_k: int = Field(5, ge=1, le=MAX_TOP_K, description="how many classes to answer")
    crops: Crops = Field(1, description=CROPS_DESCRIPTION)


class ClassifyQuery(BaseModel):
    """The query string of ``POST /v1/classify``: raw text, parsed and checked together
    with the body's fields by ``service.inputs`` (query parameters win)."""

    model_config = ConfigDict(protected_namespaces=())

    model: str | None = Field(None, description="model name, `ensemble`, or omitted for the default")
    models: str | None = Field(
        None, description="per-request ensemble, e.g. `inception_v4,inception_resnet_v2`"
    )
    weights: str | None = Field(
        None,
        pattern=WEIGHTS_PATTERN,
        description="non-negative weights of `models`, comma-separated, e.g. `0.5,0.5`",
    )
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K, description="how many classes (default 5)")
    crops: Crops | None = Field(None, description=CROPS_DESCRIPTION + " (default 1)")


JsonWeights = (
    list[Annotated[float, Field(ge=0, strict=True)]] | Annotated[str, Field(pattern=WEIGHTS_PATTERN)] | None
)


class ClassifyJson(ClassifyOptions):
    """The JSON form of a classify request. `models` and `weights` may be arrays or, as in
    the query string, comma-separated strings."""

    models: list[str] | str | None = Field(  # type: ignore[assignment]
        None, description="a per-request ensemble: an array of models, or one comma-separated string"
    )
    weights: JsonWeights = Field(  # type: ignore[assignment]
        None, description="non-negative weights of `models`: an array, or one comma-separated string"
    )

    image: str = Field(
        ...,
        min_length=1,
        description="the image file's bytes, base64 (a `data:` URL prefix is accepted)",
        json_schema_extra={"format": "byte", "contentEncoding": "base64"},
    )


class Prediction(BaseModel):
    label: str
    class_id: int
    score: float


class Member(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str
    weight: float
    weights: str = Field(description="weight provenance: `pretrained:<source>` or `random-init`")


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str = Field(
        description="what served the request: a model, the Triton ensemble, or `ensemble(a,b)`"
    )
    predictions: list[Prediction]
    weights: str = Field(
        description="weight provenance; `random-init` when any model involved is randomly initialised"
    )
    members: list[Member] | None = Field(None, description="the members of an ensemble and their weights")
    random_init: bool = Field(description="true when any model involved has random weights")
    warning: str | None = None
    crops: int = Field(1, description="how many crops were averaged (the `crops` option)")
    timing_ms: dict[str, float]
    request_id: str


class Preprocess(BaseModel):
    crop_pct: float
    interpolation: str
    input_size: int


class ModelEntry(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    kind: str = Field(description="`model` or `ensemble`")
    state: str = Field(description="`ready` or `unavailable`")
    default: bool
    aliases: list[str] = []
    preprocessing: Preprocess | None = None
    inputs: dict[str, Preprocess] | None = Field(
        None, description="an ensemble whose members crop differently: each image input's preprocessing"
    )
    weights: str | None = None
    weights_sha256: str | None = None
    max_batch_size: int | None = None
    members: list[Member] | None = None


class ModelsResponse(BaseModel):
    models: list[ModelEntry]
    default: str
    per_request_ensembles: str = Field(
        "POST /v1/classify?models=a,b[&weights=wa,wb] runs the members concurrently and averages"
    )
    crops: dict[int, str] = Field(
        default_factory=lambda: dict(PROTOCOLS),
        description="the multi-crop protocols POST /v1/classify?crops=N supports, with their source",
    )


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
