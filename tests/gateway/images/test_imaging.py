"""Decoding and preprocessing, in process (no Triton): formats, modes, limits, draft."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, features

from service.errors import EmptyBody, ImageTooLarge, InvalidImage, UnsupportedImageFormat
from service.imaging import configure_pillow, decode, prepare
from service.model_inputs import Preprocessing, preprocess

from ..helpers import DRAFT_MEAN_TOLERANCE, DRAFT_P99_TOLERANCE, big_real_jpegs, encode, photo, png_bomb

LIMIT = 50_000_000
V4 = Preprocessing(0.875, "bicubic", 299)
IRV2 = Preprocessing(0.8975, "bicubic", 299)


@pytest.fixture(autouse=True, scope="module")
def _pillow() -> None:
    configure_pillow(LIMIT)


def chelsea() -> Image.Image:
    return Image.open(photo("chelsea.png")).convert("RGB")


def test_every_accepted_format_decodes_to_rgb() -> None:
    image = chelsea()
    formats = ["JPEG", "PNG", "GIF", "BMP", "TIFF"] + (["WEBP"] if features.check("webp") else [])
    for fmt in formats:
        decoded, name, _, _ = decode(encode(image, fmt), max_pixels=LIMIT)
        assert decoded.mode == "RGB" and decoded.size == image.size and name == fmt


@pytest.mark.parametrize(
    "mode",
    ["L", "LA", "P", "PA-transparency", "RGBA", "CMYK", "I;16", "I", "1", "YCbCr", "F"],
)
def test_every_mode_becomes_rgb(mode: str) -> None:
    base = chelsea()
    if mode == "PA-transparency":
        image = base.convert("P")
        image.info["transparency"] = 0
    elif mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
        assert image.mode == "I;16"
    elif mode == "I":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.int32) * 257)
    elif mode == "F":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.float32) / 255.0)
    else:
        image = base.convert(mode)
    fmt = "TIFF" if mode in ("YCbCr", "F", "I", "CMYK", "LA") else "PNG"
    if mode == "YCbCr":
        fmt = "JPEG"
    decoded, *_ = decode(encode(image, fmt), max_pixels=LIMIT)
    assert decoded.mode == "RGB" and decoded.size == base.size
    if mode in ("I;16", "I", "F"):  # 16-bit and float are scaled to 8 bits, not clipped to white
        grey = np.asarray(base.convert("L"), dtype=np.int16)
        assert np.abs(np.asarray(decoded)[..., 0].astype(np.int16) - grey).max() <= 1


def test_alpha_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 20, 30))
    decoded, *_ = decode(encode(rgba, "PNG"), max_pixels=LIMIT)
    pixels = np.asarray(decoded)
    assert tuple(pixels[5, 5]) == (0, 0, 255) and tuple(pixels[5, 30]) == (255, 255, 255)


def test_gif_first_frame() -> None:
    frames = [Image.new("P", (20, 20), i) for i in (10, 200)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    first = np.asarray(decode(data, max_pixels=LIMIT)[0])
    assert np.array_equal(first, np.asarray(frames[0].convert("RGB")))


def test_exif_orientation_is_applied() -> None:
    upright = chelsea()
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view" undoes the counter-clockwise ROTATE_90
    data = encode(stored, "PNG", exif=exif.tobytes())
    decoded, *_ = decode(data, max_pixels=LIMIT)
    assert np.array_equal(np.asarray(decoded), np.asarray(upright))


def test_cmyk_jpeg_decodes() -> None:
    decoded, name, *_ = decode(encode(chelsea().convert("CMYK"), "JPEG", quality=95), max_pixels=LIMIT)
    assert name == "JPEG" and decoded.mode == "RGB"
    assert np.abs(np.asarray(decoded).astype(int) - np.asarray(chelsea()).astype(int)).mean() < 8


def test_errors() -> None:
    jpeg = encode(chelsea(), "JPEG")
    with pytest.raises(EmptyBody):
        decode(b"", max_pixels=LIMIT)
    with pytest.raises(InvalidImage):
        decode(jpeg[: len(jpeg) // 2], max_pixels=LIMIT)
    with pytest.raises(InvalidImage):
        decode(np.random.default_rng(0).bytes(4096), max_pixels=LIMIT)
    with pytest.raises(InvalidImage):  # a PNG whose pixel data is garbage
        png = encode(chelsea(), "PNG")
        decode(png[:100] + bytes(len(png) - 100), max_pixels=LIMIT)


def test_other_pillow_formats_are_never_opened() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    for data in (eps, encode(chelsea(), "PPM"), encode(chelsea(), "ICO"), encode(chelsea(), "TGA")):
        with pytest.raises((UnsupportedImageFormat, InvalidImage)):
            decode(data, max_pixels=LIMIT)
    with pytest.raises(UnsupportedImageFormat, match="EPS"):
        decode(eps, max_pixels=LIMIT)


def test_pixel_limit_refuses_before_decoding() -> None:
    bomb = png_bomb(30_000, 30_000)  # 900 Mpx in ~100 KB
    assert len(bomb) < 2_000_000
    with pytest.raises(ImageTooLarge):
        decode(bomb, max_pixels=LIMIT)
    # Our limit, not Pillow's default: just over a small limit is refused too.
    small = encode(Image.new("RGB", (101, 100)), "PNG")
    with pytest.raises(ImageTooLarge):
        decode(small, max_pixels=10_000)
    configure_pillow(LIMIT)
    decode(small, max_pixels=LIMIT)


def test_preprocess_shape_and_type() -> None:
    out = preprocess(chelsea(), V4)
    assert out.shape == (299, 299, 3) and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]


def test_exif_rotation_turns_the_crop_geometry_too() -> None:
    """The size the crops are laid out on is the image as seen, after its EXIF turn."""
    upright = chelsea()  # 451 x 300
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(upright.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif.tobytes())
    prepared = prepare(data, [V4], max_pixels=LIMIT, draft=False)
    assert prepared.size == upright.size
    assert np.array_equal(prepared.inputs[V4], preprocess(upright, V4))


@pytest.mark.parametrize("pre", [V4, IRV2], ids=["crop0.875", "crop0.8975"])
def test_draft_decoding_within_tolerance_on_real_photos(pre: Preprocessing) -> None:
    used = 0
    for name, data in big_real_jpegs().items():
        fast = prepare(data, [pre], max_pixels=LIMIT, draft=True, oversample=2.0)
        full = prepare(data, [pre], max_pixels=LIMIT, draft=False)
        diff = np.abs(fast.inputs[pre].astype(np.int16) - full.inputs[pre].astype(np.int16))
        assert diff.mean() <= DRAFT_MEAN_TOLERANCE, name
        assert np.percentile(diff, 99) <= DRAFT_P99_TOLERANCE, name
        used += fast.draft_scale > 1
        if min(full.size) < 2 * pre.scale_size * 2:
            assert fast.draft_scale == 1, name  # small photos are never drafted
    assert used >= 2  # retina and the mosaic really took the reduced path


def test_draft_keeps_enough_pixels() -> None:
    data = big_real_jpegs()["mosaic_3000x2000"]
    prepared = prepare(data, [V4], max_pixels=LIMIT, draft=True, oversample=2.0)
    assert prepared.draft_scale == 2  # 2000 / 2 = 1000 >= 2 * 341, 2000 / 4 = 500 is not


def test_prepare_decodes_once_per_distinct_preprocessing() -> None:
    data = photo("grace_hopper.jpg").read_bytes()
    prepared = prepare(data, [V4, IRV2, V4], max_pixels=LIMIT)
    assert set(prepared.inputs) == {V4, IRV2}
    assert set(prepared.timings) == {"decode", "preprocess"}


def test_webp_and_tiff_real_photo() -> None:
    if not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    image = Image.open(photo("astronaut.png"))
    for fmt in ("WEBP", "TIFF"):
        decoded, name, *_ = decode(encode(image, fmt), max_pixels=LIMIT)
        assert name == fmt and decoded.size == (512, 512)


def test_truncated_real_jpeg_is_400() -> None:
    data = io.BytesIO(photo("rocket.jpg").read_bytes()).getvalue()
    with pytest.raises(InvalidImage):
        decode(data[: len(data) - 2000], max_pixels=LIMIT)


def test_malformed_exif_keeps_the_stored_orientation() -> None:
    """Pillow raises on some corrupt EXIF blocks; the image is still decodable, so the
    stored orientation is used rather than refusing it."""
    from service.pixels import orientation

    class CorruptExif:
        def getexif(self) -> None:
            raise SyntaxError("not a TIFF file")

    assert orientation(CorruptExif()) is None  # type: ignore[arg-type]


def test_strip_conversion_equals_whole_image_conversion() -> None:
    """Converting in strips (for memory) gives what Pillow's whole-image conversion gives."""
    from service.pixels import STRIP_ROWS, to_rgb

    base = chelsea().resize((300, 2 * STRIP_ROWS + 37))
    for mode in ("P", "CMYK", "L", "YCbCr"):
        image = base.convert(mode)
        converted, factor = to_rgb(image)
        assert factor == 1
        assert np.array_equal(np.asarray(converted), np.asarray(image.convert("RGB"))), mode


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "F"])
def test_reduction_in_strips_equals_one_reduction(mode: str) -> None:
    from service.pixels import STRIP_ROWS, reduce

    image = chelsea().resize((301, 3 * STRIP_ROWS + 11)).convert(mode)
    reduced, factor = reduce(image, 100)
    assert factor == 3
    assert np.array_equal(np.asarray(reduced), np.asarray(image.reduce(3)))


def tiled_tiff(width: int, height: int, tile: int, rgb: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    """A deflate-compressed, tiled RGB TIFF written by hand (Pillow writes no tiles)."""

    n = (-(-width // tile)) * (-(-height // tile))
    blob = zlib.compress(bytes(rgb) * (tile * tile), 9)
    ifd_at, count = 8, 11
    bps_at = ifd_at + 2 + count * 12 + 4
    offsets_at = bps_at + 6
    counts_at = offsets_at + 4 * n
    offsets = [counts_at + 4 * n + i * len(blob) for i in range(n)]

    def entry(tag: int, kind: int, cnt: int, value: bytes) -> bytes:
        return struct.pack("<HHI", tag, kind, cnt) + value

    def short(v: int) -> bytes:
        return struct.pack("<HH", v, 0)

    def long(v: int) -> bytes:
        return struct.pack("<I", v)

    entries = [
        entry(256, 4, 1, long(width)), entry(257, 4, 1, long(height)), entry(258, 3, 3, long(bps_at)),
        entry(259, 3, 1, short(8)), entry(262, 3, 1, short(2)), entry(277, 3, 1, short(3)),
        entry(284, 3, 1, short(1)), entry(322, 4, 1, long(tile)), entry(323, 4, 1, long(tile)),
        entry(324, 4, n, long(offsets_at) if n > 1 else long(offsets[0])),
        entry(325, 4, n, long(counts_at) if n > 1 else long(len(blob))),
    ]  # fmt: skip
    head = b"II*\x00" + long(ifd_at) + struct.pack("<H", count) + b"".join(entries) + long(0)
    arrays = struct.pack("<HHH", 8, 8, 8) + struct.pack(f"<{n}I", *offsets)
    return head + arrays + struct.pack(f"<{n}I", *([len(blob)] * n)) + blob * n


def test_tiled_tiff_decodes() -> None:
    decoded, *_ = decode(tiled_tiff(512, 512, 256), max_pixels=LIMIT)
    assert decoded.size == (512, 512) and decoded.getpixel((300, 300)) == (10, 20, 30)


def test_tiff_tile_larger_than_its_image_is_refused() -> None:
    """libtiff inflates whole tiles: one 16384² tile on a 64×64 image took 800 MB."""
    with pytest.raises(InvalidImage, match="tiles are larger"):
        decode(tiled_tiff(64, 64, 4096), max_pixels=LIMIT)
