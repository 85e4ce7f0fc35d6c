"""The gateway's crop against timm's own eval transform, pixel for pixel.

The reference is ``create_transform(**resolve_data_config(model=...))`` for each network's
timm counterpart, taken up to its last PIL stage (uint8 pixels before normalisation). The
test may import timm and torch; the gateway never does (``tests/gateway/test_imports.py``).

Measured (Pillow 13, timm 1.0.31) without draft decoding: on the packaged photos p99 0 and
max 1 grey level; on 120 random sizes 200-2500 px p99 ≤ 1, mean ≤ 0.13, max 2. The only
residual difference is the uint8 rounding between Pillow's two resampling passes: Pillow
chooses the order of its horizontal and vertical passes itself, and for the crop's box it
may choose the other order than for the whole image.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.imaging import configure_pillow, prepare
from service.model_inputs import Preprocessing, preprocess

from ..helpers import DRAFT_MEAN_TOLERANCE, DRAFT_P99_TOLERANCE, big_real_jpegs, encode, photo

timm = pytest.importorskip("timm")
pytest.importorskip("torchvision")

LIMIT = 50_000_000
#: The acceptance of docs/architecture.md's exact preprocessing: within one grey level at
#: the 99th percentile; and never more than a couple of levels anywhere.
P99_TOLERANCE = 1
MAX_TOLERANCE = 3
PHOTOS = [
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "camera.png",
    "page.png",
    "horse.png",
    "grace_hopper.jpg",
]
#: 1×N, N×1, tiny, odd, exactly the crop, exactly the resize, huge aspect both ways.
ODD_SIZES = [
    (1, 1),
    (2, 3),
    (7, 5),
    (1, 97),
    (97, 1),
    (1, 300),
    (300, 1),
    (299, 299),
    (301, 299),
    (333, 333),
    (341, 500),
    (500, 341),
    (1001, 999),
    (3, 2000),
    (2000, 3),
    (4097, 13),
]


@pytest.fixture(autouse=True, scope="module")
def _pillow() -> None:
    configure_pillow(LIMIT)


@pytest.fixture(scope="module", params=["inception_v4", "inception_resnet_v2"])
def reference(request: pytest.FixtureRequest) -> tuple[Preprocessing, object]:
    """(our preprocessing, timm's PIL stages) for one network, from timm's own config."""
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(request.param, pretrained=False, num_classes=0)
    config = resolve_data_config(model=model)
    transform = create_transform(**config)
    stages = [
        t for t in transform.transforms if type(t).__name__ not in ("ToTensor", "MaybeToTensor", "Normalize")
    ]
    assert [type(t).__name__ for t in stages] == ["Resize", "CenterCrop"]
    pre = Preprocessing(config["crop_pct"], config["interpolation"], config["input_size"][-1])
    return pre, stages


def timm_pixels(image: Image.Image, stages: object) -> np.ndarray:
    for stage in stages:  # type: ignore[attr-defined]
        image = stage(image)
    return np.asarray(image, dtype=np.int16)


def check(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    assert ours.shape == theirs.shape == (299, 299, 3), what
    diff = np.abs(ours.astype(np.int16) - theirs)
    assert np.percentile(diff, 99) <= P99_TOLERANCE, (what, float(np.percentile(diff, 99)))
    assert diff.max() <= MAX_TOLERANCE, (what, int(diff.max()))


def test_crop_pct_of_each_network(reference: tuple[Preprocessing, object]) -> None:
    pre, _ = reference
    assert pre.crop_pct in (0.875, 0.8975) and pre.interpolation == "bicubic" and pre.input_size == 299


@pytest.mark.parametrize("name", PHOTOS)
def test_real_photos_equal_timm_without_draft(reference: tuple[Preprocessing, object], name: str) -> None:
    pre, stages = reference
    data = photo(name).read_bytes()
    ours = prepare(data, [pre], max_pixels=LIMIT, draft=False).inputs[pre]
    check(ours, timm_pixels(Image.open(photo(name)).convert("RGB"), stages), name)


@pytest.mark.parametrize("size", ODD_SIZES, ids=[f"{w}x{h}" for w, h in ODD_SIZES])
def test_odd_sizes_equal_timm(reference: tuple[Preprocessing, object], size: tuple[int, int]) -> None:
    pre, stages = reference
    width, height = size
    if width * height < 64:  # too small to resize a photo into: noise
        pixels = np.random.default_rng(width * 31 + height).integers(0, 256, (height, width, 3), np.uint8)
        image = Image.fromarray(pixels)
    else:
        image = Image.open(photo("coffee.png")).convert("RGB").resize(size, Image.Resampling.BILINEAR)
    ours = prepare(encode(image, "PNG"), [pre], max_pixels=LIMIT, draft=False).inputs[pre]
    check(ours, timm_pixels(image, stages), f"{width}x{height}")


def test_draft_decoding_keeps_its_tolerance_against_timm(reference: tuple[Preprocessing, object]) -> None:
    """Draft decoding trades exactness for speed on large JPEGs: against timm on the
    full-size decode it stays within the tolerance stated in test_imaging.py."""
    pre, stages = reference
    drafted = 0
    for name, data in big_real_jpegs().items():
        prepared = prepare(data, [pre], max_pixels=LIMIT, draft=True, oversample=2.0)
        full = Image.open(io.BytesIO(data))  # the reference decodes at full size
        diff = np.abs(prepared.inputs[pre].astype(np.int16) - timm_pixels(full.convert("RGB"), stages))
        assert diff.mean() <= DRAFT_MEAN_TOLERANCE, name
        assert np.percentile(diff, 99) <= DRAFT_P99_TOLERANCE, name
        drafted += prepared.draft_scale > 1
    assert drafted >= 2


def test_transparency_is_composited_on_white_unlike_timm(reference: tuple[Preprocessing, object]) -> None:
    """A deliberate departure (README): timm's ``convert("RGB")`` keeps the colour under a
    transparent pixel, often black; we composite on white, as a viewer shows the image."""
    pre, stages = reference
    rgba = Image.new("RGBA", (400, 400), (0, 0, 0, 0))
    rgba.paste((200, 30, 30, 255), (150, 150, 250, 250))
    ours = prepare(encode(rgba, "PNG"), [pre], max_pixels=LIMIT, draft=False).inputs[pre]
    theirs = timm_pixels(rgba.convert("RGB"), stages)
    assert tuple(ours[5, 5]) == (255, 255, 255) and tuple(theirs[5, 5]) == (0, 0, 0)
    assert np.abs(ours[149, 149].astype(int) - (200, 30, 30)).max() <= 2  # the opaque square is kept
    # On the opaque image the two agree again.
    white = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    check(ours, timm_pixels(white, stages), "composited")


def test_preprocess_equals_prepare_without_draft() -> None:
    image = Image.open(photo("rocket.jpg")).convert("RGB")
    pre = Preprocessing(0.8975)
    data = encode(image, "PNG")
    assert np.array_equal(
        preprocess(image, pre), prepare(data, [pre], max_pixels=LIMIT, draft=False).inputs[pre]
    )
