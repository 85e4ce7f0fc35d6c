"""Crop geometry against hand-computed cases, the rendered crops, the per-model batches,
and the multi-crop option end to end through a real gateway and Triton."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from service.batches import crops_buffer_bytes, mean_probabilities, model_inputs
from service.crops import (
    Region,
    centre_crop,
    googlenet_crops,
    googlenet_scales,
    regions,
    resized_size,
    ten_crops,
)
from service.imaging import configure_pillow, prepare
from service.model_config import parse_model_config
from service.model_inputs import Preprocessing, render

from ..helpers import encode, model_config_json, photo, symmetric_photo

LIMIT = 50_000_000
V4 = Preprocessing(0.875)
IRV2 = Preprocessing(0.8975)


@pytest.fixture(autouse=True, scope="module")
def _pillow() -> None:
    configure_pillow(LIMIT)


def rects(crops: list[Region]) -> list[tuple[int, int, int, int]]:
    return [c.rect for c in crops]


def test_torchvision_resize_truncates_the_longer_side() -> None:
    assert resized_size(600, 400, 341) == (511, 341)  # 341 * 1.5 = 511.5, truncated
    assert resized_size(400, 600, 341) == (341, 511)
    assert resized_size(1, 10_000, 341) == (341, 3_410_000)
    assert resized_size(500, 341, 341) == (500, 341)


def test_single_crop_by_hand() -> None:
    # 600x400 at 0.875: shorter side 341, the image 511x341; offsets round((511-299)/2) = 106
    # and round((341-299)/2) = 21; the box is that rectangle scaled by 600/511 and 400/341.
    crop = centre_crop(600, 400, 299, 0.875)
    assert crop.resized == (511, 341) and crop.rect == (106, 21, 299, 299)
    assert crop.box(600, 400) == pytest.approx(
        (106 * 600 / 511, 21 * 400 / 341, 405 * 600 / 511, 320 * 400 / 341)
    )
    # Python's round is half-to-even, as torchvision's CenterCrop: (500 - 299) / 2 = 100.5 -> 100.
    assert centre_crop(500, 341, 299, 0.875).rect == (100, 21, 299, 299)
    assert centre_crop(600, 400, 299, 0.8975).resized == (499, 333)  # floor(299 / 0.8975) = 333


def test_ten_crops_by_hand() -> None:
    # 600x400: resized 511x341; the central 341-square starts at round((511-341)/2) = 85; its
    # corners are 0 and 341-299 = 42 in; the centre crop is the single crop (106, 21).
    crops = ten_crops(600, 400, 299, 0.875)
    assert rects(crops[:5]) == [
        (85, 0, 299, 299),
        (127, 0, 299, 299),
        (85, 42, 299, 299),
        (127, 42, 299, 299),
        (106, 21, 299, 299),
    ]
    assert crops[4] == centre_crop(600, 400, 299, 0.875)
    assert rects(crops[5:]) == rects(crops[:5])
    assert [c.mirror for c in crops] == [False] * 5 + [True] * 5


def test_googlenet_crops_by_hand() -> None:
    assert googlenet_scales(299) == (341, 384, 427, 469)  # 256, 288, 320, 352 scaled by 299/224
    crops = googlenet_crops(600, 400, 299)
    assert len(crops) == 144 and len(set(crops)) == 144
    assert sum(c.mirror for c in crops) == 72
    # Scale 384: the image is 576x384; squares at x = 0, round((576-384)/2) = 96 and 192.
    at_384 = [c for c in crops[:72] if c.resized == (576, 384)]
    assert len(at_384) == 18
    centre_square = at_384[6:12]
    assert rects(centre_square) == [
        (96, 0, 299, 299),
        (96 + 85, 0, 299, 299),
        (96, 85, 299, 299),
        (96 + 85, 85, 299, 299),
        (96 + 42, 42, 299, 299),  # round(85 / 2) = 42: half to even
        (96, 0, 384, 384),  # the whole square, resized to 299
    ]
    assert all(c.size == 299 for c in crops)
    # A portrait takes top, centre and bottom squares.
    portrait = googlenet_crops(400, 600, 299)
    assert {c.rect[1] for c in portrait if c.resized == (384, 576) and c.rect[2] == 384} == {0, 96, 192}


def test_regions_refuse_other_counts() -> None:
    assert len(regions(300, 300, 299, 0.875, 1)) == 1
    with pytest.raises(ValueError):
        regions(300, 300, 299, 0.875, 12)


def test_rendered_crops_are_the_crops_of_the_resized_image() -> None:
    """Each crop equals resize-then-crop of the same image (within Pillow's pass-order
    rounding), and a mirrored crop is its twin reversed left to right."""
    image = Image.open(photo("coffee.png")).convert("RGB")  # 600x400
    crops = ten_crops(600, 400, 299, 0.875)
    batch = render(image, crops, image.size, V4)
    resized = image.resize((511, 341), Image.Resampling.BICUBIC)
    for k, crop in enumerate(crops[:5]):
        x, y, w, h = crop.rect
        expected = np.asarray(resized.crop((x, y, x + w, y + h)), dtype=np.int16)
        assert np.percentile(np.abs(batch[k].astype(np.int16) - expected), 99) <= 1, k
        assert np.array_equal(batch[k + 5], batch[k][:, ::-1])


def test_mirrored_crops_of_a_symmetric_image_are_the_opposite_corners() -> None:
    image = symmetric_photo()
    batch = prepare(encode(image, "PNG"), [V4], max_pixels=LIMIT, draft=False, crops=10).batches[V4]
    # mirror(top-left) = top-right, mirror(bottom-left) = bottom-right, mirror(centre) = centre.
    for plain, mirrored in ((1, 5), (0, 6), (3, 7), (2, 8), (4, 9)):
        diff = np.abs(batch[plain].astype(np.int16) - batch[mirrored].astype(np.int16))
        assert diff.max() <= 1, (plain, mirrored)


def test_prepare_shares_the_144_crops_between_crop_fractions() -> None:
    data = photo("rocket.jpg").read_bytes()
    prepared = prepare(data, [V4, IRV2], max_pixels=LIMIT, crops=144)
    assert prepared.batches[V4].shape == (144, 299, 299, 3)
    assert prepared.batches[V4] is prepared.batches[IRV2]  # 144 crops do not depend on crop_pct
    ten = prepare(data, [V4, IRV2], max_pixels=LIMIT, crops=10)
    assert ten.batches[V4].shape == (10, 299, 299, 3) and not np.array_equal(
        ten.batches[V4], ten.batches[IRV2]
    )
    with pytest.raises(ValueError):
        _ = ten.inputs  # single-crop view only
    single = prepare(data, [V4], max_pixels=LIMIT, crops=1)
    assert np.array_equal(ten.batches[V4][4], single.inputs[V4])  # the 10-crop's centre is the single crop


def test_draft_keeps_enough_pixels_for_the_largest_googlenet_scale() -> None:
    big = Image.open(photo("retina.jpg")).convert("RGB").resize((2400, 2000))
    data = encode(big, "JPEG", quality=90)
    assert prepare(data, [V4], max_pixels=LIMIT, crops=1).draft_scale == 2  # 1000 >= 2 * 341
    assert prepare(data, [V4], max_pixels=LIMIT, crops=144).draft_scale == 2  # 1000 >= 2 * 469
    assert prepare(data, [V4], max_pixels=LIMIT, crops=144, oversample=2.2).draft_scale == 1


def test_mean() -> None:
    probabilities = np.array([[0.2, 0.8], [0.6, 0.4]], dtype=np.float32)
    assert mean_probabilities(probabilities).shape == (1, 2)
    assert mean_probabilities(probabilities)[0].tolist() == pytest.approx([0.4, 0.6])


def test_crops_memory_is_counted_against_the_buffer_budget() -> None:
    one = 299 * 299 * 3
    assert crops_buffer_bytes(1, [V4, IRV2]) == 0
    assert crops_buffer_bytes(10, [V4, IRV2, V4]) == 2 * 10 * one * 3  # two crop fractions
    assert crops_buffer_bytes(144, [V4, IRV2]) == 144 * one * 3  # one shared batch: 116 MB
    assert 115e6 < crops_buffer_bytes(144, [V4]) < 117e6


def test_a_batch_counts_each_image_and_its_concatenation() -> None:
    """A batch of images holds each one's crops and their concatenation into one Triton
    input: counted as that many images, one copy more."""
    one = 299 * 299 * 3
    assert crops_buffer_bytes(1, [V4], images=8) == 8 * one * 4
    assert crops_buffer_bytes(10, [V4], images=2) == 2 * 10 * one * 4
    assert crops_buffer_bytes(1, [V4, IRV2], images=64) == 2 * 64 * one * 4  # two crop fractions


def test_ensemble_inputs_are_filled_per_preprocessing() -> None:
    config = model_config_json(
        members="inception_v4,inception_resnet_v2",
        **{"image__0.crop_pct": "0.875", "image__1.crop_pct": "0.8975"},
        **{
            f"image__{i}.{k}": v
            for i in (0, 1)
            for k, v in (("interpolation", "bicubic"), ("input_size", "299"))
        },
    )
    config["config"]["input"].append({**config["config"]["input"][0], "name": "image__1"})
    info = parse_model_config(config)
    assert info.inputs == (("image__0", V4), ("image__1", IRV2)) and info.preprocessing == V4
    prepared = prepare(photo("chelsea.png").read_bytes(), info.preprocessings, max_pixels=LIMIT, crops=10)
    filled = model_inputs(info, prepared)
    assert filled["image__0"] is prepared.batches[V4] and filled["image__1"] is prepared.batches[IRV2]
    # A second input without its own preprocessing parameters breaks the contract.
    del config["config"]["parameters"]["image__1.crop_pct"]
    from service.model_config import ConfigError

    with pytest.raises(ConfigError, match="image__1"):
        parse_model_config(config)
