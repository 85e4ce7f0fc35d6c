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
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import ApiError, EmptyBody, ImageTooLarge, InvalidImage, UnsupportedImageFormat

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
        return math.floor(self.input_size / self.crop_pct)


@dataclass
class Prepared:
    """The decoded image's model inputs, one per distinct preprocessing, and what it cost."""

    inputs: dict[Preprocessing, np.ndarray]
    size: tuple[int, int]  # of the stored image, before any draft reduction
    draft_scale: int = 1
    timings: dict[str, float] = field(default_factory=dict)


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


#: What one request may cost in memory while its image is decoded and converted: the decoded
#: pixels (at most 4 bytes each: RGBA, CMYK, 32-bit grey or float) and the RGB result
#: (Pillow keeps it in 4 bytes a pixel), plus the interpreter's and the buffers' overhead.
#: `tests/gateway/test_memory_budget.py` measures it on a real worker.
BYTES_PER_PIXEL_BUDGET = 8
FIXED_BUDGET_BYTES = 96 * 1024 * 1024


def memory_budget(max_pixels: int) -> int:
    return BYTES_PER_PIXEL_BUDGET * max_pixels + FIXED_BUDGET_BYTES


#: Rows converted at a time: the conversion's temporaries stay a few MiB whatever the size.
STRIP_ROWS = 256
#: Modes whose `reduce` averages meaningful values (not palette indices, not 16-bit).
REDUCIBLE_MODES = {"L", "LA", "La", "RGB", "RGBA", "RGBa", "I", "F", "CMYK", "YCbCr"}
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def _grey_strip(strip: Image.Image, low: float, high: float) -> np.ndarray:
    """16-bit, 32-bit and float greys to 8 bits: 16-bit ranges scaled (not clipped),
    anything outside it stretched from its extrema, floats in [0, 1] taken as fractions.
    Integer or float32 arithmetic, on one strip at a time."""
    if strip.mode == "F":
        values = np.asarray(strip, dtype=np.float32)
        if low >= 0.0 and high <= 1.0:
            values = values * np.float32(255.0)
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)
    if low < 0 or high > 65535:
        values = np.asarray(strip, dtype=np.float32) - np.float32(low)
        values *= np.float32(255.0 / max(high - low, 1.0))
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)
    values = np.asarray(strip).astype(np.uint32)
    return ((values + 128) // 257).astype(np.uint8)  # rint(v / 257) for 0 <= v <= 65535


def _composite_on_white(strip: Image.Image) -> np.ndarray:
    rgba = np.asarray(strip if strip.mode == "RGBA" else strip.convert("RGBA")).astype(np.uint16)
    alpha = rgba[..., 3:4]
    return ((rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _to_rgb(image: Image.Image, reduce_to: int | None = None) -> tuple[Image.Image, int]:
    """Any mode to RGB; transparency composited on white, 16-bit scaled (not clipped);
    reduced first (see `_reduce`) when `reduce_to` is given. Returns the image and the
    reduction factor.

    Converted a strip of rows at a time into the result, so that a large image costs its
    decoded pixels plus the result's (Pillow keeps RGB in 4 bytes a pixel): never a float64
    copy, nor a second RGBA image of the whole."""
    mode = image.mode
    if mode in REDUCIBLE_MODES:
        image, factor = _reduce(image, reduce_to)  # then everything below works on less
        reduce_to = None
    else:
        factor = 1
    if mode == "RGB" and "transparency" not in image.info:
        return image, factor
    width, height = image.size
    grey = mode.startswith("I") or mode == "F"
    converted = Image.new("L" if grey else "RGB", (width, height))
    low, high = image.getextrema() if grey else (0, 0)
    alpha = mode in ALPHA_MODES or "transparency" in image.info
    for top in range(0, height, STRIP_ROWS):
        strip = image.crop((0, top, width, min(height, top + STRIP_ROWS)))
        if grey:
            rows = Image.fromarray(_grey_strip(strip, float(low), float(high)), "L")  # type: ignore[arg-type]
        elif alpha:
            rows = Image.fromarray(_composite_on_white(strip), "RGB")
        else:
            rows = strip.convert("RGB")
        converted.paste(rows, (0, top))
    converted, more = _reduce(converted, reduce_to)  # what could not be reduced before
    return (converted.convert("RGB") if grey else converted), factor * more


#: libtiff inflates a whole tile whatever the image's size: one 16384² tile on a 64×64
#: image took 800 MB. Tiles may not outgrow the image (rounded up to the 16 pixels the
#: format asks tiles to be multiples of), nor this many bytes.
MAX_TILE_BYTES = 64 * 1024 * 1024
_TILE_WIDTH, _TILE_LENGTH = 322, 323


def _check_tiles(image: Image.Image) -> None:
    tags = getattr(image, "tag_v2", {})
    tile_w, tile_h = tags.get(_TILE_WIDTH), tags.get(_TILE_LENGTH)
    if not tile_w or not tile_h:
        return
    width, height = image.size
    bands = max(1, len(image.getbands()))
    if (
        tile_w > -(-width // 16) * 16
        or tile_h > -(-height // 16) * 16
        or tile_w * tile_h * bands * 4 > MAX_TILE_BYTES
    ):
        raise InvalidImage(
            f"the TIFF's {tile_w}x{tile_h} tiles are larger than its {width}x{height} image allows"
        )


_ORIENTATION_TAG = 0x0112
_TRANSPOSITIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(image: Image.Image) -> Image.Transpose | None:
    """The EXIF orientation as a transposition, read before any conversion (TIFF keeps it
    in its own tags). Malformed EXIF means the stored orientation, not a refused image."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG)
    except Exception:
        return None
    return _TRANSPOSITIONS.get(value) if isinstance(value, int) else None


def _reduce(image: Image.Image, short_side: int | None) -> tuple[Image.Image, int]:
    """What JPEG's draft mode does for the other formats: an integer box reduction that
    keeps at least `short_side` pixels on the shorter side, before any conversion, so that
    the conversion and the resize work on the reduced image. Done in strips of whole boxes
    (the same result as one call), because Pillow reduces RGBA through a premultiplied
    copy of the whole image."""
    factor = min(image.size) // short_side if short_side else 1
    if factor < 2 or image.mode not in REDUCIBLE_MODES:
        return image, 1
    width, height = image.size
    reduced = Image.new(image.mode, (-(-width // factor), -(-height // factor)))
    rows = factor * max(1, STRIP_ROWS // factor)
    for top in range(0, height, rows):
        part = image.crop((0, top, width, min(height, top + rows))).reduce(factor)
        reduced.paste(part, (0, top // factor))
    return reduced, factor


def decode(
    data: bytes,
    *,
    max_pixels: int,
    draft_short_side: int | None = None,
) -> tuple[Image.Image, str, tuple[int, int], int]:
    """Decode ``data`` into an RGB image, EXIF orientation applied.

    ``draft_short_side``: for JPEGs, let libjpeg decode at 1/2, 1/4 or 1/8 scale as long as
    the shorter side stays at least this long. Returns the image, the format, the size in
    the file, and the draft scale used (1 when none).

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
            _check_tiles(image)
        scale = 1
        if draft_short_side and fmt in JPEG_FORMATS:
            image.draft(None, (draft_short_side, draft_short_side))
            scale = max(1, round(width / image.size[0]))
        image.load()
        orientation = _orientation(image)
        rgb, factor = _to_rgb(image, draft_short_side if draft_short_side and scale == 1 else None)
        scale *= factor
        if orientation is not None:
            rgb = rgb.transpose(orientation)
        return rgb, fmt, (width, height), scale
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"the image has more than {max_pixels} pixels") from exc
    except MemoryError as exc:
        raise ImageTooLarge("the image is too large to decode") from exc
    except Exception as exc:
        raise InvalidImage("the image data is truncated or corrupt") from exc


def crop_box(width: int, height: int, pre: Preprocessing) -> tuple[float, float, float, float]:
    """The centre square that timm's resize-shorter-side-then-centre-crop keeps, in source
    pixel coordinates: cropping and resizing in one resampling step is faster and blurs
    less than two."""
    side = min(width, height) * pre.input_size / pre.scale_size
    left = (width - side) / 2.0
    top = (height - side) / 2.0
    return (left, top, left + side, top + side)


def preprocess(image: Image.Image, pre: Preprocessing) -> np.ndarray:
    """Centre crop and resize an RGB image to ``input_size``² uint8 HWC, as the model takes it."""
    box = crop_box(image.width, image.height, pre)
    size = (pre.input_size, pre.input_size)
    resized = image.resize(size, INTERPOLATIONS[pre.interpolation], box=box)
    return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8))


def draft_short_side(pres: list[Preprocessing], oversample: float) -> int:
    """The shortest shorter side that draft decoding may leave for these models."""
    return math.ceil(max(p.scale_size for p in pres) * oversample)


def prepare(
    data: bytes,
    pres: list[Preprocessing],
    *,
    max_pixels: int,
    draft: bool = True,
    oversample: float = 2.0,
) -> Prepared:
    """Decode once, then preprocess once per distinct preprocessing; timed per stage."""
    started = time.perf_counter()
    unique = list(dict.fromkeys(pres))
    short = draft_short_side(unique, oversample) if draft else None
    image, _format, size, scale = decode(data, max_pixels=max_pixels, draft_short_side=short)
    decoded = time.perf_counter()
    inputs = {pre: preprocess(image, pre) for pre in unique}
    done = time.perf_counter()
    return Prepared(
        inputs=inputs,
        size=size,
        draft_scale=scale,
        timings={"decode": decoded - started, "preprocess": done - decoded},
    )
