"""The API's request options and answers, as pydantic models (they also make /docs)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_TOP_K = 1000


class ClassifyOptions(BaseModel):
    """Options of ``POST /v1/classify``, from the query string, form fields or JSON body."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(None, description="a model name, `ensemble`, or omitted for the default")
    models: list[str] | None = Field(
        None, description="a per-request ensemble: models the gateway runs concurrently and averages"
    )
    weights: list[float] | None = Field(None, description="weights of `models` (default: equal)")
    top_k: int = Field(5, ge=1, le=MAX_TOP_K, description="how many classes to answer")


class ClassifyQuery(BaseModel):
    """The query string of ``POST /v1/classify``: raw text, parsed and checked together
    with the body's fields by ``service.inputs`` (query parameters win)."""

    model_config = ConfigDict(protected_namespaces=())

    model: str | None = Field(None, description="model name, `ensemble`, or omitted for the default")
    models: str | None = Field(
        None, description="per-request ensemble, e.g. `inception_v4,inception_resnet_v2`"
    )
    weights: str | None = Field(None, description="weights of `models`, e.g. `0.5,0.5`")
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K, description="how many classes (default 5)")


class ClassifyJson(ClassifyOptions):
    """The JSON form of a classify request."""

    image: str = Field(
        ..., min_length=1, description="the image file's bytes, base64 (a `data:` URL prefix is accepted)"
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


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
