"""Decoding untrusted image bytes and turning them into the models' uint8 input.

Security first: Pillow is only ever allowed to open JPEG, PNG, WebP, GIF, BMP and TIFF
(``Image.open(..., formats=...)``), so no other plugin's parser runs on client bytes (EPS
above all, which hands the data to Ghostscript). The pixel count is checked before any pixel
is decoded, by Pillow's own decompression-bomb guard set from our settings (and turned from
a warning into an error) and by our check of the header's size. What else costs CPU per
element rather than per pixel (JPEG marker segments and scans, PNG chunks, TIFF strips, the
rows of a thin image, RLE BMPs decoded in Python) is counted from the bytes or the header
first and bounded; `bench/fuzz_decode.py` searches for what is not.

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
from .pixels import (
    BYTES_PER_PIXEL_BUDGET,
    TIFF_PREFIXES,
    check_tiff_directory,
    check_tiles,
    orientation,
    to_rgb,
)

#: The Pillow plugins that may open client data.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
#: What ``Image.format`` may say after opening with those plugins (the JPEG plugin answers
#: "MPO" for multi-picture JPEGs from phones).
OPENED_FORMATS = frozenset({*ALLOWED_FORMATS, "MPO"})
JPEG_FORMATS = frozenset({"JPEG", "MPO"})
#: What Pillow's JPEG plugin accepts: SOI, then the first marker.
JPEG_SIGNATURE = b"\xff\xd8\xff"

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


#: The longest side an image may have. Part of a decode's cost is per row (Pillow's decoders
#: and its images hold rows), and a thin image has many: the decode fuzzer's 97 KiB grey PNG
#: of 1 x 50,000,000 pixels took 3.1 s of CPU, twice a square one; turned by its EXIF
#: orientation a wide image becomes as tall. No JPEG or GIF can be longer than this.
MAX_IMAGE_SIDE = 65_535
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
#: The most marker segments other than scans a JPEG may have, fill bytes included. Pillow
#: reads those before the first scan in Python, about 1.5 µs each: 16 MiB of empty COM and
#: APP segments before a 64 x 64 image took 5 to 8 s of CPU (1.6 s after its first scan, to
#: count them; tried beside the decode fuzzer's PNG chunks, issue 19). Encoders write a few
#: dozen: APP, DQT, DHT (one a scan in progressive files), SOF, an ICC profile in at most 255
#: APP2 pieces.
MAX_JPEG_MARKERS = 1000


#: The most pixels of a run-length-encoded BMP. Pillow decodes RLE BMPs in Python, up to
#: 460 ns a pixel (runs of one 4-bit pixel; 120 ns for a row of one pixel that the
#: end-of-line escape pads, byte by byte): the decode fuzzer's 1 KiB RLE8 BMP of
#: 43,256,739 x 1 pixels took 3.1 s of CPU. A 1920 x 1080 screen bounds one to about 1 s;
#: RLE bitmaps are icons and old screenshots. Its data is bounded too, by what its pixels
#: can need (two bytes a pixel, runs of one, and an end of line a row): each two bytes are
#: a round of that Python, and the fuzzer's 5 MiB of escapes that draw nothing before a
#: 146 x 130 image took 2.3 s (16 MiB, 3 s).
MAX_RLE_BMP_PIXELS = 1920 * 1080
#: The most pixels a WebP may have. Pillow decodes a WebP only at full size (libwebp's
#: scaled decoding is out of its reach) and copies the frame once more through its raw
#: decoder, so a lossy WebP of noise costs about 45 ns a pixel: the decode fuzzer's at the
#: pixel limit (7745 x 6454, in CI) took 2.25 s of CPU, over the 2 s goal. At this bound the
#: costliest measured (noise, lossy at quality 50, 12.3 MiB) takes 0.85 s, and a 6000 x 4000
#: photo still passes.
MAX_WEBP_PIXELS = 25_000_000


def check_bmp_rle(image: ImageFile.ImageFile, size: int) -> None:
    """Refuse an RLE-compressed BMP past :data:`MAX_RLE_BMP_PIXELS`, or with more data than
    its pixels need, from its header and the body's ``size``."""
    rle = [tile for tile in image.tile if tile[0] == "bmp_rle"]
    if not rle:
        return
    width, height = image.size
    if width * height > MAX_RLE_BMP_PIXELS:
        raise ImageTooLarge(
            f"the BMP is run-length encoded with {width}x{height} pixels, more than the "
            f"{MAX_RLE_BMP_PIXELS} such a BMP may have; send it uncompressed or as PNG"
        )
    needed = 2 * width * height + 2 * height + 64
    if size - rle[0][2] > needed:
        raise InvalidImage(
            f"the BMP's run-length encoded data has {size - rle[0][2]} bytes, more than its "
            f"{width}x{height} pixels can need ({needed})"
        )


#: The most chunks a PNG may have. Pillow reads each chunk in Python, about 2.5 µs whatever
#: its size, so the bytes bound their cost poorly: the decode fuzzer's 16 MiB PNG of
#: 1,242,820 one-byte IDAT chunks took 2.7 s of CPU, 16 MiB of empty unknown chunks 3.5 s.
#: Encoders write IDAT chunks of 8 KiB (libpng) or more: 2,048 for the largest body.
MAX_PNG_CHUNKS = 20_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: The most bytes a PNG's image data may inflate to, per pixel of the pixel limit: 8-bit
#: RGBA's 4. A PNG's decode is paid per inflated byte (inflate, unfilter, unpack), and 16-bit
#: colour has twice 8-bit's: measured beside the decode fuzzer's thin PNGs, a 16-bit RGBA
#: PNG at 50,000,000 pixels took 1.8 s of CPU, 7 pixels wide 2.4 s; at this bound it has 25,000,000 pixels
#: (a 6000 x 4000 16-bit photo still passes).
PNG_BYTES_PER_PIXEL = 4
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def png_chunk_count(data: bytes, stop_after: int) -> int:
    """The chunks of a PNG, counted from their length fields without reading them (a few
    ms at most); stops counting past ``stop_after``."""
    count, at, size = 0, len(PNG_SIGNATURE), len(data)
    while at + 8 <= size and count <= stop_after:
        at += 12 + int.from_bytes(data[at : at + 4], "big")
        count += 1
    return count


def check_png_bytes(data: bytes, size: tuple[int, int], max_pixels: int) -> None:
    """Refuse a PNG whose rows inflate past :data:`PNG_BYTES_PER_PIXEL` bytes a pixel of the
    limit, from its header: the depth and colour type of its IHDR chunk, the size Pillow read."""
    at = len(PNG_SIGNATURE)
    while at + 26 <= len(data) and data[at + 4 : at + 8] != b"IHDR":
        at += 12 + int.from_bytes(data[at : at + 4], "big")
    if at + 26 > len(data):
        return  # no IHDR where Pillow found a size: nothing to add to the pixel limit
    depth, colour = data[at + 16], data[at + 17]
    width, height = size
    inflated = height * -(-width * _PNG_CHANNELS.get(colour, 4) * depth // 8)
    if inflated > PNG_BYTES_PER_PIXEL * max_pixels:
        raise ImageTooLarge(
            f"the PNG's {width}x{height} {depth}-bit pixels inflate to {inflated} bytes, more than "
            f"{PNG_BYTES_PER_PIXEL} bytes a pixel of the limit of {max_pixels} pixels; send it with "
            "8 bits a channel or fewer pixels"
        )


def jpeg_structure(data: bytes, max_scans: int, max_markers: int | None = None) -> tuple[int, int]:
    """The scans (SOS markers) and the other marker segments (fill bytes included) of the
    first image of a JPEG, counted from its bytes without decoding anything: marker segments
    are skipped by their length and each scan's entropy-coded data by a search for the next
    marker. Stops counting past either bound, so it costs a few ms even for the largest body."""
    max_markers = MAX_JPEG_MARKERS if max_markers is None else max_markers
    scans, markers, at, size = 0, 0, 2, len(data)
    while at + 4 <= size and scans <= max_scans and markers <= max_markers:
        if data[at] != 0xFF:
            break  # not a marker where one must be: the decoder will say what is wrong
        marker = data[at + 1]
        if marker == _EOI:
            break
        markers += 1
        if marker == 0xFF:  # a fill byte before the marker
            at += 1
            continue
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        if marker == _SOS:
            markers -= 1
            scans += 1
            found = _JPEG_MARKER.search(data, at)
            if found is None:
                break
            at = found.start()
    return scans, markers


def jpeg_scans(data: bytes, stop_after: int) -> int:
    """The scans of the first image of a JPEG (see :func:`jpeg_structure`), counted up to
    ``stop_after`` and one more."""
    return jpeg_structure(data, stop_after)[0]


def check_jpeg_structure(data: bytes, max_scans: int) -> None:
    """Refuse a JPEG of more scans or marker segments than any encoder writes, from its bytes
    and before Pillow reads its markers (in Python, one by one, up to the first scan)."""
    scans, markers = jpeg_structure(data, max_scans)
    if scans > max_scans:
        raise InvalidImage(
            f"the JPEG has more than {max_scans} scans, more than any encoder writes; "
            "re-encode it (a progressive JPEG has about 10)"
        )
    if markers > MAX_JPEG_MARKERS:
        raise InvalidImage(
            f"the JPEG has more than {MAX_JPEG_MARKERS} marker segments (tables, comments, "
            "application data), more than any encoder writes; re-encode it"
        )


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
    if data.startswith(JPEG_SIGNATURE):
        check_jpeg_structure(data, max_jpeg_scans)
    if data.startswith(TIFF_PREFIXES):
        check_tiff_directory(data)  # before Image.open, which reads the directory and strips
    if data.startswith(PNG_SIGNATURE) and png_chunk_count(data, MAX_PNG_CHUNKS) > MAX_PNG_CHUNKS:
        raise InvalidImage(  # before Image.open, which reads the chunks up to the first IDAT
            f"the PNG has more than {MAX_PNG_CHUNKS} chunks, more than any encoder writes; re-encode it"
        )
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
        if fmt == "TIFF":
            check_tiles(image)
        if fmt == "BMP":
            check_bmp_rle(image, len(data))
        if fmt == "PNG":
            check_png_bytes(data, (width, height), max_pixels)
        if fmt == "WEBP" and width * height > MAX_WEBP_PIXELS:
            raise ImageTooLarge(
                f"the WebP has {width}x{height} pixels, more than the {MAX_WEBP_PIXELS} a WebP "
                "may have (it is decoded at full size); send it as JPEG or scale it down"
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
