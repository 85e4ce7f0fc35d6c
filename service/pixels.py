"""Decoded images to RGB within a memory budget: conversions a strip of rows at a time in
integer or float32 arithmetic, integer reductions before converting, the EXIF orientation,
and the TIFF tiles libtiff would inflate whole. `imaging.decode` uses them."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .errors import InvalidImage

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


def to_rgb(image: Image.Image, reduce_to: int | None = None) -> tuple[Image.Image, int]:
    """Any mode to RGB; transparency composited on white, 16-bit scaled (not clipped);
    reduced first (see `reduce`) when `reduce_to` is given. Returns the image and the
    reduction factor.

    Converted a strip of rows at a time into the result, so that a large image costs its
    decoded pixels plus the result's (Pillow keeps RGB in 4 bytes a pixel): never a float64
    copy, nor a second RGBA image of the whole."""
    mode = image.mode
    if mode in REDUCIBLE_MODES:
        image, factor = reduce(image, reduce_to)  # then everything below works on less
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
    converted, more = reduce(converted, reduce_to)  # what could not be reduced before
    return (converted.convert("RGB") if grey else converted), factor * more


#: libtiff inflates a whole tile whatever the image's size: one 16384² tile on a 64×64
#: image took 800 MB. Tiles may not outgrow the image (rounded up to the 16 pixels the
#: format asks tiles to be multiples of), nor this many bytes.
MAX_TILE_BYTES = 64 * 1024 * 1024
_TILE_WIDTH, _TILE_LENGTH = 322, 323


def check_tiles(image: Image.Image) -> None:
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


def orientation(image: Image.Image) -> Image.Transpose | None:
    """The EXIF orientation as a transposition, read before any conversion (TIFF keeps it
    in its own tags). Malformed EXIF means the stored orientation, not a refused image."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG)
    except Exception:
        return None
    return _TRANSPOSITIONS.get(value) if isinstance(value, int) else None


def reduce(image: Image.Image, short_side: int | None) -> tuple[Image.Image, int]:
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
