"""``POST /v1/classify``: HTTP to a call of the classify pipeline (service/classification.py)
and its answer back to HTTP."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from .. import deadlines
from ..classification import CACHE_HEADER, Classification
from ..deps import GatewayDep, require_api_key
from ..openapi import CLASSIFY_BODY, ERROR_RESPONSES
from ..options import ClassifyQuery
from ..schemas import BatchClassifyResponse, ClassifyResponse

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.post(
    "/classify",
    response_model=ClassifyResponse | BatchClassifyResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=CLASSIFY_BODY,
    summary="Classify an image, or a batch of up to 64 (multipart field `image`, raw image/* body, "
    "or JSON base64 `image` / `images`)",
    description="One image is answered with its predictions; several (repeated multipart `image` "
    "parts, or a JSON `images` array) with `results`, one per image in the order sent, each its "
    "predictions or its own error. Answers are cached by content unless the request says "
    "`Cache-Control: no-store`; the `X-Cache` header says `hit`, `miss`, `partial` (a batch) or "
    "`bypass`.",
)
async def classify(
    request: Request,
    gateway: GatewayDep,
    query: Annotated[ClassifyQuery, Query()],
    request_timeout: deadlines.TimeoutHeader = None,
) -> Response:
    run = Classification(gateway, request, query.model_dump(), request_timeout)
    answer = await run.answer()
    # Written by its own model, which the pipeline built and validated: FastAPI's response
    # model (kept above for the OpenAPI document) would validate it a second time and
    # serialise it through a dict, for the same bytes.
    return Response(
        answer.model_dump_json(by_alias=True),
        media_type="application/json",
        headers={CACHE_HEADER: run.cache_status},
    )
