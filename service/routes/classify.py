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
    response: Response,
    gateway: GatewayDep,
    query: Annotated[ClassifyQuery, Query()],
    request_timeout: deadlines.TimeoutHeader = None,
) -> ClassifyResponse | BatchClassifyResponse:
    run = Classification(gateway, request, query.model_dump(), request_timeout)
    answer = await run.answer()
    response.headers[CACHE_HEADER] = run.cache_status
    return answer
