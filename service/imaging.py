"""Decoding untrusted image bytes and turning them into the models' uint8 input.

Security first: Pillow is only ever allowed to open JPEG, PNG, WebP, GIF, BMP and TIFF
(``Image.open(..., formats=...)``), so no other plugin's parser runs on client bytes (EPS
above all, which hands the data to Ghostscript). The pixel count is checked before any pixel
is decoded, by Pillow's own decompression-bomb guard set from our settings (and turned from
a warning into an error) and by our check of the header's size.

Everything here is synchronous and CPU-bound; the app runs it in a bounded thread pool
(Pillow releases the GIL while decoding and resampling).
"""

from __future__ import annotations

import io
import math
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from . import crops as geometry
from .errors import ApiError, EmptyBody, ImageTooLarge, InvalidImage, UnsupportedImageFormat
from .pixels import BYTES_PER_PIXEL_BUDGET, check_tiles, orientation, to_rgb

#: The Pillow plugins that may open client data.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
#: What ``Image.format`` may say after opening with those plugins (the JPEG plugin answers
#: "MPO" for multi-picture JPEGs from phones).
OPENED_FORMATS = frozenset({*ALLOWED_FORMATS, "MPO"})
JPEG_FORMATS = frozenset({"JPEG", "MPO"})

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def configure_pillow(max_pixels: int) -> None:
    """Set Pillow's decompression-bomb guard from our settings and make it an error.

    Pillow warns above ``MAX_IMAGE_PIXELS`` and raises only above twice that; we want one
    limit, so the warning becomes an error. Truncated images stay errors (never loaded
    half-grey). Process-global by nature: called once when the app is built.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    warnings.simplefilter("error", Image.DecompressionBombWarning)


@dataclass(frozen=True)
class Preprocessing:
    """How one model wants its input: Inception's centre crop, then resize."""

    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    input_size: int = 299

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if self.input_size <= 0:
            raise ValueError(f"input_size must be positive, got {self.input_size}")

    @property
    def scale_size(self) -> int:
        """The shorter side that timm resizes to before its centre crop."""
        return geometry.scale_size(self.input_size, self.crop_pct)


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


#: The most scans a JPEG may have. Every scan of a progressive JPEG is a pass over the whole
#: image's coefficients, so the decode's CPU grows with the scans times the pixels, and the
#: bytes say nothing of it: 6,000 near-empty scans in 762 KiB held a decode thread 30 s.
#: libjpeg's and Pillow's progressive mode writes 10 scans for colour (6 for grey), mozjpeg's
#: optimised scan scripts a few more, a baseline JPEG one per component at most: 32 leaves
#: every real encoder room and bounds a bomb to about three times a normal decode.
MAX_JPEG_SCANS = 32
#: A marker inside or after entropy-coded data: 0xFF followed by neither a stuffed 0x00, a
#: restart marker (0xD0-0xD7) nor a fill byte.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_SOS, _EOI = 0xDA, 0xD9


def jpeg_scans(data: bytes, stop_after: int) -> int:
    """The scans (SOS markers) of the first image of a JPEG, counted from its bytes without
    decoding anything: marker segments are skipped by their length and each scan's
    entropy-coded data by a search for the next marker, so the count costs a few ms even
    for the largest body. Stops counting past ``stop_after``."""
    scans, at, size = 0, 2, len(data)
    while at + 4 <= size and scans <= stop_after:
        if data[at] != 0xFF:
            break  # not a marker where one must be: the decoder will say what is wrong
        marker = data[at + 1]
        if marker == 0xFF:  # a fill byte before the marker
            at += 1
            continue
        if marker == _EOI:
            break
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        if marker == _SOS:
            scans += 1
            found = _JPEG_MARKER.search(data, at)
            if found is None:
                break
            at = found.start()
    return scans


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
        if fmt == "TIFF":
            check_tiles(image)
        if fmt in JPEG_FORMATS and jpeg_scans(data, max_jpeg_scans) > max_jpeg_scans:
            raise InvalidImage(
                f"the JPEG has more than {max_jpeg_scans} scans, more than any encoder writes; "
                "re-encode it (a progressive JPEG has about 10)"
            )
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


def render(
    image: Image.Image,
    regions: list[geometry.Region],
    source: tuple[int, int],
    pre: Preprocessing,
    scale: int = 1,
) -> np.ndarray:
    """The crops ``regions`` of an RGB image as a uint8 batch ``[n, size, size, 3]``.

    ``source`` is the full-resolution size the regions are laid out on and ``scale`` the
    reduction the decoded ``image`` carries (draft decoding): each crop is one Pillow
    resampling step with the region's box, in the image's own coordinates (see
    :mod:`service.crops` for why that equals resize-then-crop). Unscaled crops of one
    square are sliced from that square, resampled once; a mirrored crop is its twin's
    pixels reversed, as torchvision's ``TenCrop`` flips a crop.
    """
    resample = INTERPOLATIONS[pre.interpolation]

    def resampled(
        resized: tuple[int, int], rect: tuple[int, int, int, int], size: tuple[int, int]
    ) -> np.ndarray:
        region = geometry.Region(resized, rect, 0)
        left, top, right, bottom = (v / scale for v in region.box(*source))
        box = (left, top, min(right, image.width), min(bottom, image.height))
        return np.asarray(image.resize(size, resample, box=box), dtype=np.uint8)

    out = np.empty((len(regions), pre.input_size, pre.input_size, 3), dtype=np.uint8)
    made: dict[tuple[tuple[int, int], tuple[int, int, int, int]], np.ndarray] = {}
    squares: dict[tuple[tuple[int, int], tuple[int, int, int, int]], np.ndarray] = {}
    for k, region in enumerate(regions):
        key = (region.resized, region.rect)
        pixels = made.get(key)
        left, top, width, height = region.rect
        if pixels is None:
            if region.within is not None and width == height == region.size:
                square = squares.get((region.resized, region.within))
                if square is None:
                    size = (region.within[2], region.within[3])
                    square = resampled(region.resized, region.within, size)
                    squares[region.resized, region.within] = square
                x, y = left - region.within[0], top - region.within[1]
                pixels = square[y : y + height, x : x + width]
            else:
                pixels = resampled(region.resized, region.rect, (region.size, region.size))
            made[key] = pixels
        out[k] = pixels[:, ::-1] if region.mirror else pixels
    return out


def preprocess(image: Image.Image, pre: Preprocessing) -> np.ndarray:
    """timm's eval crop of an RGB image: ``input_size``² uint8 HWC, as the model takes it."""
    region = geometry.centre_crop(image.width, image.height, pre.input_size, pre.crop_pct)
    return render(image, [region], image.size, pre)[0]


def draft_short_side(pres: list[Preprocessing], oversample: float, crops: int = 1) -> int:
    """The shortest shorter side that draft decoding may leave for these models."""
    return math.ceil(
        max(geometry.largest_short_side(p.input_size, p.crop_pct, crops) for p in pres) * oversample
    )


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
