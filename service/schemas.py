"""The API's answers, as pydantic models (they also make /docs); the request's options are
in :mod:`service.options`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .crops import PROTOCOLS


class Prediction(BaseModel):
    label: str
    class_id: int
    score: float


class Member(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str
    weight: float
    weights: str = Field(description="weight provenance: `pretrained:<source>` or `random-init`")
    weights_sha256: str | None = Field(
        None, description="sha256 of the member's weights (null when its config records none)"
    )


#: What ``weights_sha256`` says, in the answer and in /docs.
WEIGHTS_SHA256 = Field(
    None,
    description="sha256 of the weights that computed the answer: the network's checkpoint, or for "
    "an ensemble the sha256 of its members' `name:sha256` lines; it changes with every rollout of "
    "new weights, whatever the file is named (null when a network's config records none)",
)


class ErrorDetail(BaseModel):
    code: str
    message: str


class Answer(BaseModel):
    """What every classify answer says, of one image or of a batch: what served it."""

    model_config = ConfigDict(protected_namespaces=())

    model: str = Field(
        description="what served the request: a model, the Triton ensemble, or `ensemble(a,b)`"
    )
    weights: str = Field(
        description="weight provenance; `random-init` when any model involved is randomly initialised"
    )
    weights_sha256: str | None = WEIGHTS_SHA256
    members: list[Member] | None = Field(None, description="the members of an ensemble and their weights")
    random_init: bool = Field(description="true when any model involved has random weights")
    warning: str | None = None
    crops: int = Field(1, description="how many crops were averaged (the `crops` option)")
    timing_ms: dict[str, float]
    request_id: str


CACHED = Field(
    False,
    description="the answer came from the gateway's cache: the same image bytes, models, coefficients, "
    "crops and weights (sha256) were answered before",
)


class ClassifyResponse(Answer):
    """The answer to one image (a request that carries one, as every client sent before
    batches existed)."""

    predictions: list[Prediction]
    cached: bool = CACHED


class ImageResult(BaseModel):
    """One image of a batch: its predictions, or its own error (the others are unaffected)."""

    predictions: list[Prediction] | None = Field(None, description="null when the image has an error")
    cached: bool = CACHED
    error: ErrorDetail | None = Field(None, description="why this image has no answer; null when it has one")


class BatchClassifyResponse(Answer):
    """The answer to a batch (repeated multipart `image` parts, or a JSON `images` array):
    one result per image, in the order sent."""

    results: list[ImageResult]


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


class ErrorResponse(BaseModel):
    error: ErrorDetail
