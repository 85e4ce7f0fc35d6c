"""Each accepted format's costs that grow per element rather than per pixel, counted from the
bytes or the header before Pillow pays them.

Pillow's decoders read some structures one by one, several in Python (JPEG marker segments,
PNG chunks, TIFF directory entries and strips, RLE BMP runs), and some formats cost more per
pixel than the pixel limit assumes (16-bit PNGs, WebPs decoded only at full size). Their
bytes bound that cost poorly, so each is counted here, cheaply, and bounded:
:func:`check_bytes` before ``Image.open``, :func:`check_header` once the header is read and
before a pixel is decoded. `bench/fuzz_decode.py` searches for what is not.
"""

from __future__ import annotations

import re
import struct

from PIL import Image, ImageFile

from .errors import ImageTooLarge, InvalidImage

#: What Pillow's JPEG plugin accepts: SOI, then the first marker.
JPEG_SIGNATURE = b"\xff\xd8\xff"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: What Pillow's TIFF plugin accepts: byte order, then 42 (classic) or 43 (BigTIFF).
TIFF_PREFIXES = (b"MM\x00\x2a", b"II\x2a\x00", b"MM\x2a\x00", b"II\x00\x2a", b"MM\x00\x2b", b"II\x2b\x00")

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


#: The most chunks a PNG may have. Pillow reads each chunk in Python, about 2.5 µs whatever
#: its size, so the bytes bound their cost poorly: the decode fuzzer's 16 MiB PNG of
#: 1,242,820 one-byte IDAT chunks took 2.7 s of CPU, 16 MiB of empty unknown chunks 3.5 s.
#: Encoders write IDAT chunks of 8 KiB (libpng) or more: 2,048 for the largest body.
MAX_PNG_CHUNKS = 20_000
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


#: The most entries a TIFF's first directory may have, and the most strips or tiles. Pillow
#: reads each entry in Python, and sets up each strip of an uncompressed image in Python
#: (about 6 µs each) when the file is opened: the decode fuzzer's 16 MB TIFF of a 64 x 64
#: image in 2,000,000 strips took 11.5 s of CPU. Real directories have a few dozen entries;
#: one strip a row of the tallest image allowed is 65,535 strips (0.4 s at most).
MAX_TIFF_ENTRIES = 1000
MAX_TIFF_STRIPS = 65_536
_STRIP_OFFSETS, _TILE_OFFSETS = 273, 324


def check_tiff_directory(data: bytes) -> None:
    """Refuse a TIFF whose first directory has more entries, or more strips or tiles, than
    those bounds, from the directory's counts alone and before Pillow reads it."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"\x00\x2b", b"\x2b\x00")
    # Classic: a 4-byte directory offset at 4, 2-byte entry count, 12-byte entries with a
    # 4-byte count at 4; BigTIFF: 8 bytes at 8, 8 bytes, 20-byte entries, 8 bytes at 4.
    word, number, entry_size, offset_at = ("Q", "Q", 20, 8) if big else ("I", "H", 12, 4)
    word_size, number_size = struct.calcsize(word), struct.calcsize(number)
    if len(data) < offset_at + word_size:
        return
    at = struct.unpack(order + word, data[offset_at : offset_at + word_size])[0]
    if at + number_size > len(data):
        return  # the parser will say what is wrong
    entries = struct.unpack(order + number, data[at : at + number_size])[0]
    if entries > MAX_TIFF_ENTRIES:
        raise InvalidImage(f"the TIFF's directory has {entries} entries, more than {MAX_TIFF_ENTRIES}")
    for start in range(at + number_size, at + number_size + entries * entry_size, entry_size):
        if start + 4 + word_size > len(data):
            break
        if struct.unpack(order + "H", data[start : start + 2])[0] in (_STRIP_OFFSETS, _TILE_OFFSETS):
            count = struct.unpack(order + word, data[start + 4 : start + 4 + word_size])[0]
            if count > MAX_TIFF_STRIPS:
                raise InvalidImage(
                    f"the TIFF is stored in {count} strips or tiles, more than {MAX_TIFF_STRIPS}; "
                    "re-encode it"
                )


#: libtiff inflates a whole tile whatever the image's size: one 16384² tile on a 64×64
#: image took 800 MB. Tiles may not outgrow the image (rounded up to the 16 pixels the
#: format asks tiles to be multiples of), nor this many bytes.
MAX_TILE_BYTES = 64 * 1024 * 1024
_TILE_WIDTH, _TILE_LENGTH = 322, 323


def check_tiles(image: Image.Image) -> None:
    """Refuse a tiled TIFF whose tiles outgrow its image or :data:`MAX_TILE_BYTES`, from its
    tags, before libtiff inflates one."""
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


#: The most pixels of a run-length-encoded BMP. Pillow decodes RLE BMPs in Python, per run
#: and per padding byte: the decode fuzzer's 1 KiB RLE8 BMP of 43,256,739 x 1 pixels (one
#: pixel a row, the rest padded by the end-of-line escape) took 3.1 s of CPU. RLE bitmaps
#: are icons and old screenshots; a 1920 x 1080 screen is the bound. Its data is bounded
#: too (:data:`RLE_BMP_SLACK`): each two bytes are a round of that Python even when they draw
#: nothing (the fuzzer's 5 MiB of escapes before a 146 x 130 image took 2.3 s).
MAX_RLE_BMP_PIXELS = 1920 * 1080
#: An RLE BMP's data may be at most its uncompressed bitmap and this fraction of it again,
#: plus an end of line a row. An encoder writes absolute runs where runs do not pay, so
#: what this refuses is runs of one pixel: a 1920 x 1080 RLE4 of them is 4 MiB, four times
#: its bitmap, and cost 3.2 s of CPU here (4.1 s in CI). At the bound the costliest layout
#: costs about half the costliest ordinary image within the pixel limit, an RGBA PNG
#: (tests/gateway/images/test_decode_fuzz.py measures both).
RLE_BMP_SLACK = 1 / 8


def check_bmp_rle(image: ImageFile.ImageFile, size: int) -> None:
    """Refuse an RLE-compressed BMP past :data:`MAX_RLE_BMP_PIXELS`, or with more data than
    its bitmap would take uncompressed (and :data:`RLE_BMP_SLACK`), from its header and the
    body's ``size``."""
    rle = [tile for tile in image.tile if tile[0] == "bmp_rle"]
    if not rle:
        return
    width, height = image.size
    if width * height > MAX_RLE_BMP_PIXELS:
        raise ImageTooLarge(
            f"the BMP is run-length encoded with {width}x{height} pixels, more than the "
            f"{MAX_RLE_BMP_PIXELS} such a BMP may have; send it uncompressed or as PNG"
        )
    offset = rle[0][2]
    bits = 4 if image.info.get("compression") == 2 else 8  # RLE4, else RLE8
    uncompressed = -(-width * bits // 32) * 4 * height
    allowed = uncompressed + int(uncompressed * RLE_BMP_SLACK) + 2 * height + 64
    if size - offset > allowed:
        raise InvalidImage(
            f"the BMP's run-length encoded data has {size - offset} bytes, more than the "
            f"{allowed} its {width}x{height} pixels may take (their uncompressed bitmap and "
            f"an eighth); send it uncompressed or as PNG"
        )


#: The most pixels a WebP may have. Pillow decodes a WebP only at full size (libwebp's
#: scaled decoding is out of its reach) and copies the frame once more through its raw
#: decoder, so a lossy WebP of noise costs about 45 ns a pixel: the decode fuzzer's at the
#: pixel limit (7745 x 6454, in CI) took 2.25 s of CPU, over the 2 s goal. At this bound the
#: costliest measured (noise, lossy at quality 50, 12.3 MiB) takes 0.85 s, and a 6000 x 4000
#: photo still passes.
MAX_WEBP_PIXELS = 25_000_000


def check_bytes(data: bytes, max_jpeg_scans: int) -> None:
    """The checks made on the bytes alone, before ``Image.open``: it reads a JPEG's markers up
    to the first scan, a TIFF's directory and strips and a PNG's chunks up to the first IDAT."""
    if data.startswith(JPEG_SIGNATURE):
        check_jpeg_structure(data, max_jpeg_scans)
    if data.startswith(TIFF_PREFIXES):
        check_tiff_directory(data)
    if data.startswith(PNG_SIGNATURE) and png_chunk_count(data, MAX_PNG_CHUNKS) > MAX_PNG_CHUNKS:
        raise InvalidImage(
            f"the PNG has more than {MAX_PNG_CHUNKS} chunks, more than any encoder writes; re-encode it"
        )


def check_header(image: ImageFile.ImageFile, fmt: str, data: bytes, max_pixels: int) -> None:
    """The checks made once Pillow has read the header (``fmt`` is ``image.format``) and
    before a pixel is decoded, the image's size already within the pixel limit."""
    width, height = image.size
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
