"""Reading the image and the options of a classify request, in any of its three forms
(multipart, JSON, a raw image), with query parameters winning over body fields.

Every form's body is counted while it streams (:mod:`service.bounded_body`), so a client
cannot make the gateway buffer more than the limit; the JSON form is bounded before it is
parsed (:mod:`service.json_body`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import sys
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartParser
from starlette.requests import ClientDisconnect, Request

from .bounded_body import MULTIPART_OVERHEAD, bounded_receive, check_declared_length, read_body, too_large
from .errors import EmptyBody, InvalidRequest, PayloadTooLarge, TemporarilyUnavailable, UnsupportedMediaType
from .json_body import JsonBytesCheck, parse_json_body
from .options import (
    IMAGE_FIELD,
    OPTION_FIELDS,
    ClassifyOptions,
    ClassifyQuery,
    describe,
    parse_options,
)

log = logging.getLogger(__name__)


class BodyForm(enum.Enum):
    """The three forms of a classify body, named by the media type that announces them."""

    MULTIPART = "multipart/form-data"
    JSON = "application/json"  # and any +json type
    RAW_IMAGE = "image/*"  # and application/octet-stream

    @classmethod
    def of(cls, media: str) -> BodyForm | None:
        """The form of a body of this media type (see :func:`media_type`), or None."""
        if media == "multipart/form-data":
            return cls.MULTIPART
        if media == "application/json" or media.endswith("+json"):
            return cls.JSON
        if media.startswith("image/") or media == "application/octet-stream":
            return cls.RAW_IMAGE
        return None


def media_type(headers: Headers) -> str:
    """The request's media type, lower case and without parameters ("" when none)."""
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


class InMemoryMultiPartParser(MultiPartParser):
    """Parts stay in memory, which the body limit already bounds. Starlette spools parts
    over 1 MiB to a temporary file: in Kubernetes that is a small in-memory emptyDir shared
    with the metrics files, and a full one came back as a 422 quoting the errno."""

    spool_max_size = sys.maxsize


@dataclass(frozen=True)
class Upload:
    """What a classify request carries: its images' bytes and its options. ``batch`` says
    the client sent several images (repeated multipart parts, or a JSON ``images`` array,
    even of one): it is answered per image; a single image keeps the single answer."""

    images: list[bytes]
    options: ClassifyOptions
    batch: bool


def _check_text(fields: dict[str, Any]) -> None:
    """Form fields are text, as the query is: they are checked as the query is (a weight
    such as `1e3` is refused by both, as their schema says), blank ones being absent."""
    try:
        ClassifyQuery.model_validate({k: v for k, v in fields.items() if v.strip()})
    except ValidationError as exc:
        raise InvalidRequest(describe(exc)) from None


async def read_request(request: Request, query: dict[str, Any], limit: int, max_images: int = 1) -> Upload:
    """The images' bytes and the options; query parameters win over body fields. ``limit``
    bounds the request's images together; at most ``max_images`` of them.

    Raises 413, 415, 400 (empty), 422 (bad options or JSON, too many images) or 503 (a
    multipart body that cannot be buffered) as :mod:`service.errors`.
    """
    media = media_type(request.headers)
    form = BodyForm.of(media)
    fields: dict[str, Any] = {}
    batch = False
    if form is BodyForm.MULTIPART:
        check_declared_length(request, limit + MULTIPART_OVERHEAD)
        bounded = Request(request.scope, bounded_receive(request.receive, limit + MULTIPART_OVERHEAD))
        parser = InMemoryMultiPartParser(
            bounded.headers, bounded.stream(), max_files=max_images, max_fields=len(OPTION_FIELDS)
        )
        try:
            parts = await parser.parse()
        except (PayloadTooLarge, ClientDisconnect):
            raise
        except OSError:
            log.exception("cannot buffer a multipart body")
            raise TemporarilyUnavailable(
                "the gateway cannot buffer the upload now; retry later", retry_after_s=1
            ) from None
        except Exception as exc:  # starlette's MultiPartException and friends
            raise InvalidRequest(f"bad multipart body: {exc}") from None
        try:
            uploads = parts.getlist(IMAGE_FIELD)
            if not uploads:
                raise InvalidRequest(f"multipart body has no field named {IMAGE_FIELD!r}")
            if not all(isinstance(u, UploadFile) for u in uploads):
                # A part without a filename is parsed as text: its bytes are already lost.
                raise InvalidRequest(
                    f"the multipart field {IMAGE_FIELD!r} has no filename, so it arrived as text and its "
                    "bytes were lost; send it as a file part (curl -F image=@photo.jpg)"
                )
            unknown = sorted(set(parts.keys()) - {IMAGE_FIELD, *OPTION_FIELDS})
            if unknown:  # as the JSON form forbids unknown keys: a typo must not pass unnoticed
                raise InvalidRequest(f"unknown multipart fields: {', '.join(unknown)[:200]}")
            images = [await u.read() for u in uploads if isinstance(u, UploadFile)]
            fields = {k: parts.get(k) for k in OPTION_FIELDS if isinstance(parts.get(k), str)}
        finally:
            await parts.close()
        if sum(map(len, images)) > limit:
            raise too_large(limit)
        batch = len(images) > 1
        _check_text(fields)
    elif form is BodyForm.JSON:
        body = await read_body(request, (limit + 2) // 3 * 4 + MULTIPART_OVERHEAD, JsonBytesCheck())
        # Parsed and validated in a thread: even bounded, a 21 MiB document takes tens of ms.
        fields, images, batch = await asyncio.to_thread(parse_json_body, body, limit)
    elif form is BodyForm.RAW_IMAGE:
        images = [await read_body(request, limit)]
    elif not media:
        raise UnsupportedMediaType(
            "no Content-Type: send multipart/form-data, an image/* body or application/json"
        )
    else:
        raise UnsupportedMediaType(
            f"{media} is not accepted: send multipart/form-data, an image/* body or application/json"
        )
    if len(images) > max_images:
        raise InvalidRequest(f"{len(images)} images in one request: at most {max_images}")
    if not batch and not images[0]:
        raise EmptyBody("the request carries no image data")
    if fields:
        parse_options(fields)  # a bad body field is refused even where the query overrides it
    merged = {**fields, **{k: v for k, v in query.items() if v is not None}}
    return Upload(images, parse_options(merged), batch)
