"""The decode fuzzer (bench/fuzz_decode.py, issue 19 item 3) in the suite: a short run at
the default limits finds no 500 and no accepted decode over the goal (twice the CPU of the
costliest ordinary image within them, measured on the machine running the suite); its guidance does
raise the cost of a seed; and what its long runs found, and what was found beside them,
stays bounded (service/pixels.py: conversion in tiles; service/format_checks.py: TIFF
directories, RLE BMPs, PNG chunks and inflated bytes, JPEG marker segments; service/imaging.py:
the longest side)."""

from __future__ import annotations

import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from bench.fuzz_decode import (
    CPU_GOAL_RATIO,
    Isolated,
    Limits,
    Target,
    bmp_image,
    fuzz,
    goal_here_s,
    jpeg_segments,
    png_chunks,
    png_image,
    png_join,
    tiff_write,
)
from service import pixels
from service.errors import ImageTooLarge, InvalidImage
from service.format_checks import (
    MAX_JPEG_MARKERS,
    MAX_PNG_CHUNKS,
    MAX_RLE_BMP_PIXELS,
    MAX_TIFF_ENTRIES,
    MAX_TIFF_STRIPS,
    MAX_WEBP_PIXELS,
    RLE_BMP_SLACK,
    check_png_bytes,
    png_chunk_count,
)
from service.imaging import MAX_IMAGE_SIDE, decode

from ..helpers import encode, scan_bomb


@pytest.fixture(scope="module")
def yardstick_s() -> float:
    """The CPU of the costliest ordinary image within the limits, on the machine running the
    suite: CPU times differ threefold between the machines it runs on, the ratio of two
    decodes far less, so each cost bound here is stated against it."""
    return goal_here_s(Target(Limits.defaults())) / CPU_GOAL_RATIO


@pytest.fixture(scope="module")
def goal_s(yardstick_s: float) -> float:
    return CPU_GOAL_RATIO * yardstick_s


def test_a_short_run_finds_no_500_and_no_decode_over_the_goal(goal_s: float) -> None:
    """A fixed seed and a fixed number of inputs; each decoded in a child process, so a
    crash or a hang is reported rather than taking the suite down. The search is guided by
    measured CPU, so its path may differ from run to run; the bounds must hold on any."""
    limits = Limits.defaults()
    target = Isolated(limits, timeout_s=20.0)
    try:
        report = fuzz(target.measure, limits, seconds=15.0, seed=20261130, max_inputs=100, goal_s=goal_s)
    finally:
        target.close()
    assert report.tried >= 60, report.tried  # the seeds (40) and a real search beyond them
    assert set(report.per_format) >= {"jpeg", "png", "gif", "webp", "tiff", "bmp"}
    findings = [(e.status, round(e.cpu_s, 2), e.family, e.lineage, e.detail[-300:]) for e in report.findings]
    assert findings == []
    assert [(round(e.cpu_s, 2), e.family, e.detail) for e in report.slow_refusals] == []
    assert report.by_status.get("accepted", 0) > 0 and report.by_status.get("refused", 0) > 0


def test_the_guidance_raises_a_seeds_cost_through_repeated_scans() -> None:
    """With the scan limit lifted in the call, hill-climbing with the duplicate-scan mutation
    alone finds a progressive JPEG several times costlier than its seed; at the default
    limit that input is refused before decoding, as the 6,000-scan bomb is."""
    seed = encode(Image.new("RGB", (600, 600), (120, 130, 140)), "JPEG", progressive=True)
    lifted = Limits.defaults(max_jpeg_scans=10**6)
    report = fuzz(
        Target(lifted).measure,
        lifted,
        seconds=30.0,
        seed=3,
        families=("jpeg",),
        max_inputs=25,
        start=[("jpeg", "flat-progressive", seed)],
        only=("jpeg_scans",),
    )
    best = report.top[0]
    seed_cost = Target(lifted).measure(seed).cpu_s
    assert best.status == "accepted" and "jpeg_scans" in best.lineage
    assert best.cpu_s > 4 * seed_cost, (best.cpu_s, seed_cost)

    default = Target(Limits.defaults())
    refused = default.measure(best.data)
    assert refused.status == "refused" and "scans" in refused.detail
    assert refused.cpu_s < 0.05
    bomb = default.measure(scan_bomb(1000, 6000))
    assert bomb.status == "refused" and "scans" in bomb.detail


@pytest.mark.parametrize("size", [(MAX_IMAGE_SIDE, 762), (762, MAX_IMAGE_SIDE)], ids=["wide", "tall"])
def test_a_thin_palette_png_at_the_pixel_limit_costs_under_the_goal(
    size: tuple[int, int], goal_s: float
) -> None:
    """Found by the decode fuzzer: thin palette PNGs with transparency at the pixel limit
    cost 4.0 s (3,125,000 x 16: 256 rows were the whole image) and 4.8 s (7 x 7,142,857:
    27,902 strips) of CPU when converted in strips of rows. Such sides are now refused (see
    below); the thinnest allowed, converted in tiles of pixels, cost what a square one does."""
    data = png_image(*size, colour=3, trns=True)
    outcome = Target(Limits.defaults()).measure(data)
    assert outcome.status == "accepted", outcome.detail
    assert outcome.cpu_s < goal_s, outcome.cpu_s


def test_tiles_cover_the_image_once_within_the_pixel_bound() -> None:
    for width, height in [(1, 1), (7, 7_142_857), (3_125_000, 16), (50_000_000, 1), (7071, 7071), (300, 549)]:
        boxes = list(pixels.tiles(width, height))
        assert sum((r - x) * (b - y) for x, y, r, b in boxes) == width * height
        assert all((r - x) * (b - y) <= pixels.TILE_PIXELS for x, y, r, b in boxes)
        assert len(boxes) <= -(-width * height // pixels.TILE_PIXELS) * 2 + 1


def _on_white(image: Image.Image) -> np.ndarray:
    """The conversion's definition: each pixel over white, rounded as before the tiles."""
    rgba = np.asarray(image.convert("RGBA")).astype(np.int64)
    alpha = rgba[..., 3:4]
    return ((rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _noise(mode: str) -> Image.Image:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        return Image.frombytes("I;16", (97, 301), rng.integers(0, 65535, (301, 97)).astype("<u2").tobytes())
    image = Image.fromarray(rng.integers(0, 255, (301, 97, 4), dtype=np.uint8), "RGBA")
    base, _, transparency = mode.partition("+")
    image = image.convert(base)
    if transparency == "bytes":
        image.info["transparency"] = bytes(range(0, 256))
    elif transparency:
        image.info["transparency"] = (7, 8, 9) if base == "RGB" else 7
    return image


@pytest.mark.parametrize(
    "mode", ["P+bytes", "P+index", "L+key", "RGB+key", "PA", "LA", "RGBA", "I;16", "CMYK", "1", "RGB"]
)
def test_tiled_conversion_equals_whole_image_conversion(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles split both ways (a tiny tile size) give what one tile gives, and, with
    transparency, each pixel over white as the numpy arithmetic that the palette lookup and
    Pillow's compositing replaced."""
    image = _noise(mode)
    monkeypatch.setattr(pixels, "TILE_PIXELS", 1000)
    tiled, factor = pixels.to_rgb(image.copy())
    monkeypatch.setattr(pixels, "TILE_PIXELS", 1 << 30)
    whole, _ = pixels.to_rgb(image.copy())
    assert factor == 1 and tiled.mode == "RGB"
    assert np.array_equal(np.asarray(tiled), np.asarray(whole))
    if "+" in mode or mode in pixels.ALPHA_MODES:
        assert np.array_equal(np.asarray(tiled), _on_white(image))


def test_compositing_on_white_is_exact_for_every_colour_and_alpha() -> None:
    colour, alpha = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    image = Image.fromarray(np.stack([colour, 255 - colour, colour // 2, alpha], axis=-1), "RGBA")
    assert np.array_equal(np.asarray(pixels._composite_on_white(image)), _on_white(image))


def test_a_large_rle_bmp_is_refused_from_its_header(goal_s: float) -> None:
    """Found by the decode fuzzer: Pillow decodes RLE BMPs in Python; a 1 KiB RLE8 BMP of
    43,256,739 x 1 pixels (one pixel a row, the rest padded by the end-of-line escape) took
    3.1 s of CPU. Past a screen's pixels an RLE BMP is refused before decoding (here 4 KiB
    of 65,535 x 762 pixels, within the longest side)."""
    bomb = bmp_image(MAX_IMAGE_SIDE, 762, bits=8, rle=True, runs="eol")
    assert len(bomb) < 5000
    started = time.thread_time()
    with pytest.raises(ImageTooLarge, match="run-length encoded"):
        decode(bomb, max_pixels=50_000_000)
    assert time.thread_time() - started < 0.1
    with pytest.raises(ImageTooLarge, match="run-length encoded"):
        decode(bmp_image(1921, 1080, bits=4, rle=True, runs="single"), max_pixels=50_000_000)
    # At the bound the costliest layout, runs of one 4-bit pixel as far as the data bound
    # lets them go (the rest of the image blank), costs about half the yardstick.
    assert MAX_RLE_BMP_PIXELS == 1920 * 1080
    outcome = Target(Limits.defaults()).measure(_rle_at_data_bound(1920, 1080, bits=4))
    assert outcome.status == "accepted" and outcome.cpu_s < goal_s, outcome


def _rle_at_data_bound(width: int, height: int, bits: int) -> bytes:
    """Rows of runs of one pixel, as many as the data bound of an RLE BMP of this size lets
    through, the rows left skipped by delta escapes (cheap: one round a 255 rows)."""
    index = 0x11 if bits == 4 else 7
    row = bytes((1, index)) * width + bytes((0, 0))
    uncompressed = -(-width * bits // 32) * 4 * height
    allowed = uncompressed + int(uncompressed * RLE_BMP_SLACK) + 2 * height + 64
    rows = min(height, (allowed - 2 * (height // 255 + 2)) // len(row))
    data = row * rows
    for skipped in range(rows, height, 255):
        data += bytes((0, 2, 0, min(255, height - skipped)))
    data += bytes((0, 1))
    whole = bmp_image(width, height, bits=bits, rle=True)
    offset = struct.unpack("<I", whole[10:14])[0]
    return whole[:2] + struct.pack("<I", offset + len(data)) + whole[6:offset] + data


def test_a_webp_is_bounded_by_its_own_pixel_limit(goal_s: float) -> None:
    """Found by the decode fuzzer in CI: Pillow decodes a WebP only at full size, and a lossy
    WebP of noise at the pixel limit (7745 x 6454) took 2.25 s of CPU. Past 25,000,000 pixels
    a WebP is refused from its header; at the bound the costliest content (noise, lossy)
    stays well under the goal."""
    over = encode(Image.new("RGB", (5001, 5000), (120, 130, 140)), "WEBP", lossless=True)
    started = time.thread_time()
    with pytest.raises(ImageTooLarge, match="5001x5000 pixels, more than the 25000000 a WebP"):
        decode(over, max_pixels=50_000_000)
    assert time.thread_time() - started < 0.05
    noise = np.random.default_rng(7).integers(0, 256, (5000, 5000, 3), dtype=np.uint8)
    at_bound = encode(Image.fromarray(noise), "WEBP", quality=50, method=0)  # 12.3 MiB, 0.85 s here
    outcome = Target(Limits.defaults()).measure(at_bound)
    assert outcome.status == "accepted" and outcome.cpu_s < goal_s, outcome
    assert MAX_WEBP_PIXELS == 25_000_000


def test_an_rle_bmp_with_more_data_than_its_pixels_need_is_refused() -> None:
    """Found by the decode fuzzer: each two bytes of RLE data are a round of Pillow's Python
    decoder even when they draw nothing (end-of-line escapes at the start of a row), so
    5 MiB of them before a 146 x 130 image took 2.3 s of CPU; the data may be what the
    bitmap takes uncompressed, an eighth more and an end of line a row, and no more. Runs
    of one pixel over a whole 1920 x 1080 image pass that no longer (4 MiB and 3-4 s of CPU
    for 4-bit pixels); runs that pay, absolute runs, and the data bound itself still decode."""
    image = bmp_image(146, 130, bits=4, rle=True)
    offset = struct.unpack("<I", image[10:14])[0]
    bomb = image[:offset] + b"\x00\x00" * 2_700_000 + image[offset:]
    started = time.thread_time()
    with pytest.raises(InvalidImage, match="its 146x130 pixels may take"):
        decode(bomb, max_pixels=50_000_000)
    assert time.thread_time() - started < 0.05
    for bits in (4, 8):
        with pytest.raises(InvalidImage, match="its 1920x1080 pixels may take"):
            decode(bmp_image(1920, 1080, bits=bits, rle=True, runs="single"), max_pixels=50_000_000)
        absolute = bmp_image(1920, 1080, bits=bits, rle=True, runs="absolute")
        for fine in (
            bmp_image(1920, 1080, bits=bits, rle=True),
            absolute,
            _rle_at_data_bound(1920, 1080, bits),
        ):
            decoded, *_ = decode(fine, max_pixels=50_000_000)
            assert decoded.size == (1920, 1080)


def test_a_png_of_many_chunks_is_refused_from_its_bytes(yardstick_s: float) -> None:
    """Found by the decode fuzzer: Pillow reads each PNG chunk in Python, so 16 MiB of one-byte
    IDAT chunks took 2.7 s of CPU (and, tried beside it, empty unknown chunks before the
    IDAT, read by Image.open itself, 3.5 s). The chunks are counted from their lengths
    before Pillow reads any."""
    header, *rest = _split_png(png_image(64, 64, colour=2))
    empty = struct.pack(">I", 0) + b"abCD" + struct.pack(">I", zlib.crc32(b"abCD"))
    bomb = header + empty * 1_290_000 + b"".join(rest)
    assert len(bomb) > 14 * 2**20
    started = time.thread_time()
    with pytest.raises(InvalidImage, match="chunks"):
        decode(bomb, max_pixels=50_000_000)
    assert time.thread_time() - started < 0.05
    # Under the bound it decodes, cheaply; encoders stay far under it.
    fine = header + empty * (MAX_PNG_CHUNKS - 10) + b"".join(rest)
    outcome = Target(Limits.defaults()).measure(fine)
    assert outcome.status == "accepted" and outcome.cpu_s < yardstick_s / 2, outcome
    noise = np.random.default_rng(0).integers(0, 255, (2000, 2000, 3), dtype=np.uint8)
    assert png_chunk_count(encode(Image.fromarray(noise), "PNG"), MAX_PNG_CHUNKS) < 1000


def _split_png(data: bytes) -> list[bytes]:
    """The signature with IHDR, then each further chunk, as bytes."""
    parts, at = [], 8
    while at < len(data):
        end = at + 12 + struct.unpack(">I", data[at : at + 4])[0]
        parts.append(data[at:end])
        at = end
    return [data[:8] + parts[0], *parts[1:]]


def test_a_16_bit_png_is_bounded_by_its_inflated_bytes(goal_s: float) -> None:
    """Found measuring variants of the fuzzer's thin PNGs: a 16-bit RGBA PNG at the pixel
    limit inflates to 400 MB and took 1.8 s of CPU (2.4 s 7 pixels wide); it is refused from
    its IHDR, while 8-bit RGBA at the limit, and a 16-bit photo of 12 M pixels, still
    decode under the goal."""
    header = png_image(7071, 7071, colour=6, depth=16, pattern=b"\x00")
    started = time.thread_time()
    with pytest.raises(ImageTooLarge, match="inflate"):
        decode(header, max_pixels=50_000_000)
    assert time.thread_time() - started < 0.05
    # 8-bit RGBA at the limit is what the bound is made of (decoding it costs about 1 s).
    check_png_bytes(png_image(7071, 7071, colour=6, depth=8, pattern=b"\x00")[:33], (7071, 7071), 50_000_000)
    photo16 = png_image(4000, 3000, colour=6, depth=16, filters=b"\x04", pattern=b"\x5a\x11\x07")
    outcome = Target(Limits.defaults()).measure(photo16)
    assert outcome.status == "accepted" and outcome.cpu_s < goal_s, outcome


@pytest.mark.parametrize("where", ["before the frame", "after the first scan"])
def test_a_jpeg_of_many_marker_segments_is_refused_from_its_bytes(where: str) -> None:
    """Found beside the fuzzer's PNG chunks (and since searched by its segment mutation):
    Pillow reads a JPEG's markers before its first scan in Python, one by one: 16 MiB of
    empty comment segments before a 64 x 64 image took 5.3 s of CPU (APP segments 8 s),
    after its first scan 1.7 s (counting the scans walked them all). The segments are
    counted, up to a bound, before Pillow reads any."""
    data = encode(Image.new("RGB", (64, 64)), "JPEG", progressive=True)
    segments = jpeg_segments(data)
    assert segments is not None
    first_scan = next(k for k, segment in enumerate(segments) if segment[1] == 0xDA)
    at = 2 if where == "before the frame" else len(b"".join(segments[: first_scan + 1]))
    comment = b"\xff\xfe\x00\x02"
    bomb = data[:at] + comment * 4_000_000 + data[at:]
    started = time.thread_time()
    with pytest.raises(InvalidImage, match="marker segments"):
        decode(bomb, max_pixels=50_000_000)
    assert time.thread_time() - started < 0.05
    image, *_ = decode(data[:at] + comment * (MAX_JPEG_MARKERS - 40) + data[at:], max_pixels=50_000_000)
    assert image.size == (64, 64)
    # Scan bombs are still told apart (their message names the scans).
    with pytest.raises(InvalidImage, match="scans"):
        decode(scan_bomb(64, 6000), max_pixels=50_000_000)


def test_a_thin_image_is_bounded_by_its_longest_side(goal_s: float) -> None:
    """Found by the decode fuzzer: a 97 KiB grey PNG of 1 x 50,000,000 pixels took 3.1 s of
    CPU, paid per row; a side past 65,535 is refused from the header, and the thinnest image
    at the pixel limit within it costs what a square one does."""
    chunks = png_chunks(png_image(1, 1, colour=0))
    assert chunks is not None
    for size in [(1, 50_000_000), (50_000_000, 1), (MAX_IMAGE_SIDE + 1, 7)]:
        header = (b"IHDR", struct.pack(">IIBBBBB", *size, 8, 0, 0, 0, 0))
        started = time.thread_time()
        with pytest.raises(ImageTooLarge, match="neither side"):
            decode(png_join([header, *chunks[1:]]), max_pixels=50_000_000)
        assert time.thread_time() - started < 0.05
    thin = png_image(50_000_000 // MAX_IMAGE_SIDE, MAX_IMAGE_SIDE, colour=3, trns=True)
    outcome = Target(Limits.defaults()).measure(thin)
    assert outcome.status == "accepted" and outcome.cpu_s < goal_s, outcome


def _tiff(strips: int, extra_entries: int = 0, compression: int = 1) -> bytes:
    """A 64 x 64 grey TIFF whose directory lists ``strips`` strips, all one stored strip."""
    stored = bytes(64) if compression == 1 else zlib.compress(bytes(64))
    tags = [
        (256, 4, [64]), (257, 4, [64]), (258, 3, [8]), (259, 3, [compression]), (262, 3, [1]),
        (273, 4, [0] * strips), (277, 3, [1]), (278, 4, [1]), (279, 4, [len(stored)] * strips),
        (284, 3, [1]), *((40_000 + k, 3, [k]) for k in range(extra_entries)),
    ]  # fmt: skip
    return tiff_write(tags, [stored])


def test_a_tiff_of_many_strips_or_entries_is_refused_from_its_directory(yardstick_s: float) -> None:
    """Found following the fuzzer's refused 1 x 50,000,000 TIFFs, which spent 0.6 s in
    Image.open (and since searched by its directory mutation): Pillow sets up each strip of
    an uncompressed TIFF in Python when it opens the file:
    a 16 MB TIFF of a 64 x 64 image in 2,000,000 strips took 11.5 s of CPU. The directory's
    counts are read, and bounded, before Pillow reads it."""
    for bomb, match in [(_tiff(2_000_000), "strips"), (_tiff(64, extra_entries=5000), "entries")]:
        started = time.thread_time()
        with pytest.raises(InvalidImage, match=match):
            decode(bomb, max_pixels=50_000_000)
        assert time.thread_time() - started < 0.05
    outcome = Target(Limits.defaults()).measure(_tiff(MAX_TIFF_STRIPS))
    assert outcome.status == "accepted" and outcome.cpu_s < yardstick_s, outcome
    image, *_ = decode(_tiff(64, extra_entries=MAX_TIFF_ENTRIES - 20, compression=8), max_pixels=50_000_000)
    assert image.size == (64, 64)
    rgb = Image.new("RGB", (640, 480), (1, 2, 3))
    for options in [{"compression": "tiff_lzw"}, {"compression": "jpeg"}, {"big_tiff": True}]:
        image, *_ = decode(encode(rgb, "TIFF", **options), max_pixels=50_000_000)  # real encoders pass
        assert image.size == (640, 480)
