"""The JSON form of a classify body, bounded before it is parsed: at most
:data:`MAX_JSON_VALUES` values and, past the size of the options alone, ASCII, checked on the
bytes as they arrive and again on the whole; then parsed, validated, and its base64 images
decoded within the request's limit.

Apart from the other forms (:mod:`service.inputs`) because its bounds are what make parsing
an untrusted document cost no more than the memory account charged for it
(``tests/gateway/http/test_json_bounds.py`` measures the worst it lets through).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from pydantic import ValidationError

from .bounded_body import MULTIPART_OVERHEAD, too_large
from .errors import EmptyBody, InvalidRequest
from .options import IMAGE_FIELD, IMAGES_FIELD, ClassifyJson, describe


def _decode_base64(text: str, limit: int) -> bytes:
    """Standard base64, optionally as a `data:` URL; line breaks and spaces (MIME wraps at
    76 characters, `base64` at 76 too) are ignored, anything else outside the alphabet is
    refused."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    if any(c in text for c in " \t\r\n"):
        text = "".join(text.split())
    if len(text) > (limit + 2) // 3 * 4 + 4:
        raise too_large(limit)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("image: not valid base64") from None
    if len(data) > limit:
        raise too_large(limit)
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
