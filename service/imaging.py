"""Decoding untrusted image bytes and turning them into the models' uint8 input.

Security first: Pillow is only ever allowed to open JPEG, PNG, WebP, GIF, BMP and TIFF
(``Image.open(..., formats=...)``), so no other plugin's parser runs on client bytes (EPS
above all, which hands the data to Ghostscript). The pixel count is checked before any pixel
is decoded, by Pillow's own decompression-bomb guard set from our settings (and turned from
a warning into an error) and by our check of the header's size. What else costs CPU per
element rather than per pixel (JPEG marker segments and scans, PNG chunks, TIFF strips, the
rows of a thin image, RLE BMPs decoded in Python) is counted from the bytes or the header
first and bounded (:mod:`service.format_checks`); `bench/fuzz_decode.py` searches for what is
not. The decoded image's crops are resampled into model inputs by :mod:`service.model_inputs`.

Everything here is synchronous and CPU-bound; the app runs it in a bounded thread pool
(Pillow releases the GIL while decoding and resampling).
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from . import crops as geometry
from .errors import ApiError, EmptyBody, ImageTooLarge, InvalidImage, UnsupportedImageFormat
from .format_checks import MAX_JPEG_SCANS, check_bytes, check_header
from .model_inputs import Preprocessing, draft_short_side, render
from .pixels import BYTES_PER_PIXEL_BUDGET, orientation, to_rgb

#: The Pillow plugins that may open client data.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
#: What ``Image.format`` may say after opening with those plugins (the JPEG plugin answers
#: "MPO" for multi-picture JPEGs from phones).
OPENED_FORMATS = frozenset({*ALLOWED_FORMATS, "MPO"})
JPEG_FORMATS = frozenset({"JPEG", "MPO"})


def configure_pillow(max_pixels: int) -> None:
    """Set Pillow's decompression-bomb guard from our settings and make it an error.

    Pillow warns above ``MAX_IMAGE_PIXELS`` and raises only above twice that; we want one
    limit, so the warning becomes an error. Truncated images stay errors (never loaded
    half-grey). Process-global by nature: called once when the app is built.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    warnings.simplefilter("error", Image.DecompressionBombWarning)


@dataclass
class Prepared:
    """The decoded image's model inputs, one batch of crops ``[n, size, size, 3]`` per
    distinct preprocessing, and what it cost."""

    batches: dict[Preprocessing, np.ndarray]
    size: tuple[int, int]  # of the image as seen (EXIF orientation applied), before any draft reduction
    draft_scale: int = 1
    crops: int = 1
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def inputs(self) -> dict[Preprocessing, np.ndarray]:
        """The single-crop inputs ``[size, size, 3]``; only for ``crops=1``."""
        if self.crops != 1:
            raise ValueError(f"{self.crops} crops per preprocessing: use batches")
        return {pre: batch[0] for pre, batch in self.batches.items()}


#: The EXIF transpositions that swap width and height.
_SWAPPING = frozenset(
    {
        Image.Transpose.ROTATE_90,
        Image.Transpose.ROTATE_270,
        Image.Transpose.TRANSPOSE,
        Image.Transpose.TRANSVERSE,
    }
)


def _unsupported_format(prefix: bytes) -> str | None:
    """The name of a format Pillow knows but we refuse, judged from the first bytes only.

    Uses each plugin's ``accept`` check (a comparison of magic bytes) and never its parser,
    so it is safe on hostile data; it only decides between 415 and 400.
    """
    Image.init()
    for name, (_factory, accept) in list(Image.OPEN.items()):
        if name in OPENED_FORMATS or accept is None:
            continue
        try:
            if accept(prefix):
                return name
        except Exception:
            continue
    return None


#: The longest side an image may have. Part of a decode's cost is per row (Pillow's decoders
#: and its images hold rows), and a thin image has many: the decode fuzzer's 97 KiB grey PNG
#: of 1 x 50,000,000 pixels took 3.1 s of CPU, twice a square one; turned by its EXIF
#: orientation a wide image becomes as tall. No JPEG or GIF can be longer than this.
MAX_IMAGE_SIDE = 65_535


def decode(
    data: bytes,
    *,
    max_pixels: int,
    draft_short_side: int | None = None,
    max_jpeg_scans: int = MAX_JPEG_SCANS,
    reserve: Callable[[int], None] | None = None,
) -> tuple[Image.Image, str, tuple[int, int], int]:
    """Decode ``data`` into an RGB image, EXIF orientation applied.

    ``reserve`` is called with the bytes the decode will hold (:data:`BYTES_PER_PIXEL_BUDGET`
    a decoded pixel, after any draft reduction) once the header is read and before a pixel
    is decoded: it takes them from the worker's memory account or raises.

    ``draft_short_side``: for JPEGs, let libjpeg decode at 1/2, 1/4 or 1/8 scale as long as
    the shorter side stays at least this long. Returns the image, the format, the full
    size as seen (the file's, swapped when the EXIF orientation turns the image), and the
    reduction used (1 when none): a source pixel ``x`` is at ``x / scale`` in the image.

    Raises EmptyBody, InvalidImage (400), UnsupportedImageFormat (415) or ImageTooLarge (413).
    """
    if not data:
        raise EmptyBody("the request carries no image data")
    check_bytes(data, max_jpeg_scans)
    try:
        image = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"the image has more than {max_pixels} pixels") from exc
    except UnidentifiedImageError as exc:
        other = _unsupported_format(data[:64])
        if other is not None:
            raise UnsupportedImageFormat(
                f"{other} images are not accepted; send JPEG, PNG, WebP, GIF, BMP or TIFF"
            ) from exc
        raise InvalidImage("the data is not a decodable image (JPEG, PNG, WebP, GIF, BMP or TIFF)") from exc
    except Exception as exc:  # any parser failure on hostile bytes is the client's 400
        raise InvalidImage("the image header is corrupt") from exc
    # No close() on the way out: the image reads from memory, and closing the source would
    # invalidate the result when no conversion made a copy.
    fmt = str(image.format)
    try:
        if fmt not in OPENED_FORMATS:  # defence in depth: never load another plugin
            raise UnsupportedImageFormat(f"{fmt} images are not accepted")
        width, height = image.size
        if width <= 0 or height <= 0:
            raise InvalidImage("the image has no pixels")
        if width * height > max_pixels:
            raise ImageTooLarge(f"the image has {width}x{height} pixels, more than the limit of {max_pixels}")
        if max(width, height) > MAX_IMAGE_SIDE:
            raise ImageTooLarge(
                f"the image is {width}x{height} pixels; neither side may be longer than {MAX_IMAGE_SIDE}"
            )
        check_header(image, fmt, data, max_pixels)
        scale = 1
        if draft_short_side and fmt in JPEG_FORMATS:
            image.draft(None, (draft_short_side, draft_short_side))
            scale = max(1, round(width / image.size[0]))
        if reserve is not None:
            reserve(BYTES_PER_PIXEL_BUDGET * image.size[0] * image.size[1])
        image.load()
        transposition = orientation(image)
        rgb, factor = to_rgb(image, draft_short_side if draft_short_side and scale == 1 else None)
        scale *= factor
        if transposition is not None:
            rgb = rgb.transpose(transposition)
            if transposition in _SWAPPING:
                width, height = height, width
        return rgb, fmt, (width, height), scale
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"the image has more than {max_pixels} pixels") from exc
    except MemoryError as exc:
        raise ImageTooLarge("the image is too large to decode") from exc
    except Exception as exc:
        raise InvalidImage("the image data is truncated or corrupt") from exc


def prepare(
    data: bytes,
    pres: list[Preprocessing],
    *,
    max_pixels: int,
    draft: bool = True,
    oversample: float = 2.0,
    crops: int = 1,
    max_jpeg_scans: int = MAX_JPEG_SCANS,
    reserve: Callable[[int], None] | None = None,
) -> Prepared:
    """Decode once, then crop once per distinct crop geometry (144 crops ignore
    ``crop_pct``, so models differing only there share one batch); timed per stage."""
    started = time.perf_counter()
    unique = list(dict.fromkeys(pres))
    short = draft_short_side(unique, oversample, crops) if draft else None
    image, _format, size, scale = decode(
        data, max_pixels=max_pixels, draft_short_side=short, max_jpeg_scans=max_jpeg_scans, reserve=reserve
    )
    decoded = time.perf_counter()
    batches: dict[Preprocessing, np.ndarray] = {}
    shared: dict[tuple[object, ...], np.ndarray] = {}
    for pre in unique:
        key = (pre.interpolation, pre.input_size, pre.crop_pct if geometry.uses_crop_pct(crops) else None)
        if key not in shared:
            regions = geometry.regions(*size, pre.input_size, pre.crop_pct, crops)
            shared[key] = render(image, regions, size, pre, scale)
        batches[pre] = shared[key]
    done = time.perf_counter()
    return Prepared(
        batches=batches,
        size=size,
        draft_scale=scale,
        crops=crops,
        timings={"decode": decoded - started, "preprocess": done - decoded},
    )
