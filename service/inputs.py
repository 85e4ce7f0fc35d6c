"""Reading the image and the options of a classify request, in any of its three forms.

The body is counted while it streams: a declared ``Content-Length`` over the limit is
refused before a byte is read, and a chunked body is refused as soon as it passes the
limit, so a client cannot make the gateway buffer more than the limit.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import json
import logging
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartParser
from starlette.requests import ClientDisconnect, Request

from .errors import EmptyBody, InvalidRequest, PayloadTooLarge, TemporarilyUnavailable, UnsupportedMediaType
from .options import (
    IMAGE_FIELD,
    IMAGES_FIELD,
    OPTION_FIELDS,
    ClassifyJson,
    ClassifyOptions,
    ClassifyQuery,
    describe,
    parse_options,
)

log = logging.getLogger(__name__)

#: Room for the multipart boundaries and option fields beside the image.
MULTIPART_OVERHEAD = 64 * 1024

Message = MutableMapping[str, Any]


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


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body is larger than {limit} bytes", limit=limit)


def bounded_receive(
    receive: Callable[[], Awaitable[Message]], limit: int
) -> Callable[[], Awaitable[Message]]:
    """An ASGI ``receive`` that raises 413 once more than ``limit`` body bytes came in."""
    received = 0

    async def wrapped() -> Message:
        nonlocal received
        message = await receive()
        if message.get("type") == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _too_large(limit)
        return message

    return wrapped


def _check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise InvalidRequest("bad Content-Length") from None
        if length > limit:
            raise _too_large(limit)


async def read_body(request: Request, limit: int, check: Callable[[bytes], None] | None = None) -> bytes:
    """The whole body, refused (413) as soon as it is over ``limit``, or as soon as ``check``
    raises on a chunk as it arrives."""
    _check_declared_length(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        if check is not None:
            check(chunk)
        chunks.append(chunk)
    return b"".join(chunks)


def _decode_base64(text: str, limit: int) -> bytes:
    """Standard base64, optionally as a `data:` URL; line breaks and spaces (MIME wraps at
    76 characters, `base64` at 76 too) are ignored, anything else outside the alphabet is
    refused."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    if any(c in text for c in " \t\r\n"):
        text = "".join(text.split())
    if len(text) > (limit + 2) // 3 * 4 + 4:
        raise _too_large(limit)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("image: not valid base64") from None
    if len(data) > limit:
        raise _too_large(limit)
    return data


#: The most values (separators: ``,`` and ``:``) a JSON body may hold. The options and the
#: image are a dozen; the bound is checked on the bytes before parsing, so a document of
#: millions of tiny values (11.2 M `weights` items cost 3 s and 751 MiB to parse) is refused
#: at the cost of one byte count.
MAX_JSON_VALUES = 256


def _not_ascii() -> InvalidRequest:
    return InvalidRequest(
        f"a JSON body over {MULTIPART_OVERHEAD} bytes must be ASCII, without \\u escapes: "
        "an image in base64 is, and so is every other value of this API"
    )


def _too_many_values() -> InvalidRequest:
    return InvalidRequest(f"the JSON body holds more than {MAX_JSON_VALUES} values")


class JsonBytesCheck:
    """The byte checks of :func:`parse_json_body`, made on each chunk as it arrives: a body
    of 21 MiB refused for its ten million values is refused after its first chunk, not read
    whole first (reading it took more CPU than refusing it; issue 19, finding 3). A ``\\u``
    cut between two chunks is left to the check on the whole body."""

    def __init__(self) -> None:
        self.size = 0
        self.separators = 0
        self.ascii = True

    def __call__(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.separators += chunk.count(b",") + chunk.count(b":")
        if self.separators > MAX_JSON_VALUES:
            raise _too_many_values()
        self.ascii = self.ascii and chunk.isascii()
        if self.size > MULTIPART_OVERHEAD and not self.ascii:
            raise _not_ascii()


@dataclass(frozen=True)
class Upload:
    """What a classify request carries: its images' bytes and its options. ``batch`` says
    the client sent several images (repeated multipart parts, or a JSON ``images`` array,
    even of one): it is answered per image; a single image keeps the single answer."""

    images: list[bytes]
    options: ClassifyOptions
    batch: bool


def _decode_images(texts: list[str], limit: int) -> list[bytes]:
    """Each base64 image, their bytes together at most ``limit`` (the body limit is the
    request's, whatever it carries)."""
    images, total = [], 0
    for text in texts:
        data = _decode_base64(text, limit - total)
        total += len(data)
        images.append(data)
    return images


def parse_json_body(body: bytes, limit: int) -> tuple[dict[str, Any], list[bytes], bool]:
    """The options and the image bytes of a JSON body (422 on anything wrong).

    Before parsing, the bytes must hold at most :data:`MAX_JSON_VALUES` values and, past the
    size of the options alone, be ASCII (base64 and every other value of this API are), so
    that parsing costs at most what the worker's memory account charged for the body: the
    text once more as a str (ASCII keeps it at one byte a character, where one non-ASCII
    character makes Python store all of a string at four) and the decoded image, whatever
    the document. A small body may carry non-ASCII, a model name a client mistyped: it is
    answered as such (404), at a cost of a few hundred KiB at most."""
    if not body:
        raise EmptyBody("the request body is empty")
    if len(body) > MULTIPART_OVERHEAD and (not body.isascii() or b"\\u" in body):
        raise _not_ascii()
    if body.count(b",") + body.count(b":") > MAX_JSON_VALUES:
        raise _too_many_values()
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        # ValueError: bad JSON, or an integer past Python's digit limit; RecursionError:
        # arrays or objects nested deeper than the parser's stack.
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(document, dict):
        raise InvalidRequest(
            'the JSON body must be an object {"image": "<base64>", ...} or {"images": [...], ...}'
        )
    try:
        # As its schema says: `weights` numbers in an array (not "1"), or one string.
        fields = ClassifyJson.model_validate(document).model_dump(exclude_unset=True)
    except ValidationError as exc:
        raise InvalidRequest(describe(exc)) from None
    if IMAGES_FIELD in fields:
        return fields, _decode_images(fields.pop(IMAGES_FIELD), limit), True
    return fields, [_decode_base64(fields.pop(IMAGE_FIELD), limit)], False


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
        _check_declared_length(request, limit + MULTIPART_OVERHEAD)
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
            raise _too_large(limit)
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
