"""Decoded images to RGB within a memory budget: conversions a tile of pixels at a time in
integer or float32 arithmetic, integer reductions before converting, the EXIF orientation.
`imaging.decode` uses them."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image

#: What one request may cost in memory while its image is decoded and converted: the decoded
#: pixels (at most 4 bytes each: RGBA, CMYK, 32-bit grey or float) and the RGB result
#: (Pillow keeps it in 4 bytes a pixel), plus the interpreter's and the buffers' overhead.
#: `tests/gateway/load/test_memory_budget.py` measures it on a real worker.
BYTES_PER_PIXEL_BUDGET = 8
FIXED_BUDGET_BYTES = 96 * 1024 * 1024


def memory_budget(max_pixels: int) -> int:
    return BYTES_PER_PIXEL_BUDGET * max_pixels + FIXED_BUDGET_BYTES


#: Rows converted at a time in an image of ordinary width.
STRIP_ROWS = 256
#: Most pixels converted at a time, whatever the image's shape: the conversion's temporaries
#: stay a few MiB, and a thin image still takes few rounds. Strips of rows alone failed both
#: ways (the decode fuzzer, issue 19): 256 rows of a 3,125,000 x 16 palette PNG were the whole
#: image at once (4.0 s of CPU, hundreds of MiB of temporaries), and a 7 x 7,142,857 one took
#: 27,902 strips of 1,792 pixels (4.8 s, most of it the interpreter's rounds).
TILE_PIXELS = 1 << 20
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


def _composite_on_white(strip: Image.Image) -> Image.Image:
    """``strip`` over opaque white, as RGB: ``(c * a + 255 * (255 - a) + 127) // 255`` for each
    colour ``c`` and alpha ``a``. Pillow's alpha compositing in C gives exactly that on an
    opaque background (tests/gateway/images/test_decode_fuzz.py checks all 65,536 pairs) at a third
    of numpy's cost: that arithmetic was half the CPU of a thin image at the pixel limit."""
    rgba = strip if strip.mode == "RGBA" else strip.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _lookup_on_white(image: Image.Image) -> np.ndarray:
    """The RGB on white of each of the 256 values of a palette or grey image with
    transparency, converted as its pixels would be (the same palette and transparency): a
    pixel's conversion is then a table lookup, not arithmetic."""
    values = image.crop((0, 0, 1, 1)).resize((256, 1), Image.Resampling.NEAREST)
    values.putdata(range(256))
    return np.asarray(_composite_on_white(values))[0]


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
    table = _lookup_on_white(image) if alpha and mode in ("P", "L") else None
    for box in tiles(width, height):
        strip = image.crop(box)
        if grey:
            rows = Image.fromarray(_grey_strip(strip, float(low), float(high)), "L")  # type: ignore[arg-type]
        elif table is not None:
            rows = Image.fromarray(table[np.asarray(strip)], "RGB")
        elif alpha:
            rows = _composite_on_white(strip)
        else:
            rows = strip.convert("RGB")
        converted.paste(rows, box[:2])
    converted, more = reduce(converted, reduce_to)  # what could not be reduced before
    return (converted.convert("RGB") if grey else converted), factor * more


def tiles(width: int, height: int) -> Iterator[tuple[int, int, int, int]]:
    """Boxes (left, top, right, bottom) of at most :data:`TILE_PIXELS` that cover the image
    row by row: :data:`STRIP_ROWS` rows (fewer in a shorter image) as wide as that allows,
    then, in an image narrower than that, as many more rows as fit."""
    rows = min(height, STRIP_ROWS)
    tile_width = min(width, max(1, TILE_PIXELS // rows))
    rows = min(height, max(rows, TILE_PIXELS // tile_width))
    for top in range(0, height, rows):
        for left in range(0, width, tile_width):
            yield left, top, min(width, left + tile_width), min(height, top + rows)


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
    rows = factor * max(1, min(STRIP_ROWS, TILE_PIXELS // width) // factor)
    for top in range(0, height, rows):
        part = image.crop((0, top, width, min(height, top + rows))).reduce(factor)
        reduced.paste(part, (0, top // factor))
    return reduced, factor
