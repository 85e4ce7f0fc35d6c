"""Crop geometry: timm's single centre crop, the 10-crop and the 144-crop protocols.

Every crop is described the same way: an image resized so that its shorter side is some
length (torchvision's rule: the longer side ``int(short * long / short_of_source)``,
truncated), an integer rectangle of that resized image, and whether it is mirrored. The
rectangle is mapped back to the source image as a float box, so each crop is made by one
Pillow resampling step (``Image.resize(..., box=...)``) from the decoded pixels, without
ever allocating the resized image (341 × 3,410,000 pixels for a 1 × 10,000 source). Pillow
places each output pixel at ``box_left + (i + 0.5) * scale`` and clips its filter at the
source's own edges, so the filter taps and weights are those of resizing the whole image
and then cropping. What can differ is the rounding to 8 bits between Pillow's horizontal
and vertical passes, whose order Pillow chooses itself and may choose differently for a
box than for the whole image (observed with Pillow 13): against timm's transform that
leaves p99 ≤ 1 grey level, max 2
(``tests/gateway/images/test_preprocessing_reference.py``).

Protocols (``crops``):

- ``1``: timm's eval transform (``resolve_data_config`` + ``create_transform``): shorter
  side to ``floor(input_size / crop_pct)``, centre crop of ``input_size`` at the offset
  ``int(round((resized - input_size) / 2))`` (torchvision's ``CenterCrop``).
- ``10``: Krizhevsky et al. 2012 ("ImageNet classification with deep convolutional neural
  networks", section 4.1): the four corner crops and the centre crop of the central square
  of the resized image, and their mirrors. The resized square's side is timm's
  ``floor(input_size / crop_pct)`` (341 for 299 at 0.875, the ratio of AlexNet's 224 of
  256), and the centre crop is exactly the single crop.
- ``144``: Szegedy et al. 2015 ("Going deeper with convolutions", section 7), the
  protocol the Inception-v4 paper's Table 4 uses: 4 scales × 3 squares (left, centre,
  right; top, centre, bottom for portraits) × 6 crops (4 corners, centre, the whole square
  resized) × 2 mirrors. GoogLeNet's shorter sides 256, 288, 320, 352 are for 224 crops;
  scaled by ``input_size / 224`` and floored they are 341, 384, 427, 469 for 299.

This module is pure geometry (no Pillow, no numpy), so it is tested against hand-computed
cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator, Field

#: The protocols the gateway serves, by crop count.
PROTOCOLS: dict[int, str] = {
    1: "centre crop (timm eval transform)",
    10: "4 corners + centre of the central square, and mirrors (Krizhevsky et al. 2012)",
    144: "4 scales x 3 squares x (4 corners + centre + whole square) x 2 mirrors (Szegedy et al. 2015)",
}
SUPPORTED_CROPS: tuple[int, ...] = tuple(PROTOCOLS)
#: GoogLeNet's shorter sides and the crop size they were chosen for.
GOOGLENET_SCALES: tuple[int, ...] = (256, 288, 320, 352)
GOOGLENET_CROP = 224


@dataclass(frozen=True)
class Region:
    """One crop: a rectangle of the source image resized so its shorter side is
    ``short``, possibly mirrored; made at ``size`` × ``size``."""

    resized: tuple[int, int]  # (width, height) of the intermediate resized image
    rect: tuple[int, int, int, int]  # (left, top, width, height) in the resized image
    size: int  # the output side
    mirror: bool = False
    #: A rectangle of the resized image that holds this unscaled crop and its siblings (the
    #: square of a 10- or 144-crop): rendered once and sliced, 5 crops for one resampling.
    within: tuple[int, int, int, int] | None = None

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The rectangle in the coordinates of a ``width`` × ``height`` source."""
        sx, sy = width / self.resized[0], height / self.resized[1]
        left, top, w, h = self.rect
        return (left * sx, top * sy, (left + w) * sx, (top + h) * sy)

    def mirrored(self) -> Region:
        return Region(self.resized, self.rect, self.size, not self.mirror, self.within)


def resized_size(width: int, height: int, short: int) -> tuple[int, int]:
    """torchvision's ``Resize(short)``: the shorter side becomes ``short``, the longer
    ``int(short * long / shorter)`` (truncated, in floating point as torchvision does)."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def centre_offset(total: int, crop: int) -> int:
    """torchvision's ``CenterCrop`` offset: ``int(round(...))``, Python's round (half to even)."""
    return round((total - crop) / 2.0)


def scale_size(input_size: int, crop_pct: float) -> int:
    """timm's shorter side before the centre crop."""
    return math.floor(input_size / crop_pct)


def centre_crop(width: int, height: int, input_size: int, crop_pct: float) -> Region:
    """timm's single eval crop of a ``width`` × ``height`` image."""
    resized = resized_size(width, height, scale_size(input_size, crop_pct))
    left = centre_offset(resized[0], input_size)
    top = centre_offset(resized[1], input_size)
    return Region(resized, (left, top, input_size, input_size), input_size)


def _five(resized: tuple[int, int], square: tuple[int, int, int], size: int) -> list[Region]:
    """The four corner crops and the centre crop of a square ``(left, top, side)``."""
    left, top, side = square
    far, mid = side - size, centre_offset(side, size)
    offsets = [(0, 0), (far, 0), (0, far), (far, far), (mid, mid)]
    return [
        Region(resized, (left + x, top + y, size, size), size, within=(left, top, side, side))
        for x, y in offsets
    ]


def ten_crops(width: int, height: int, input_size: int, crop_pct: float) -> list[Region]:
    """Krizhevsky's 10 crops; the fifth is the single centre crop, the last five mirror
    the first five."""
    short = scale_size(input_size, crop_pct)
    resized = resized_size(width, height, short)
    square = (centre_offset(resized[0], short), centre_offset(resized[1], short), short)
    crops = _five(resized, square, input_size)
    crops[4] = centre_crop(width, height, input_size, crop_pct)  # exactly the single crop
    return crops + [c.mirrored() for c in crops]


def googlenet_scales(input_size: int) -> tuple[int, ...]:
    """GoogLeNet's shorter sides for ``input_size`` crops: 341, 384, 427, 469 for 299."""
    return tuple(math.floor(s * input_size / GOOGLENET_CROP) for s in GOOGLENET_SCALES)


def googlenet_crops(width: int, height: int, input_size: int) -> list[Region]:
    """The 144 crops, ordered scale, square, crop (4 corners, centre, whole), then the 72
    mirrors in the same order."""
    crops: list[Region] = []
    for short in googlenet_scales(input_size):
        resized = resized_size(width, height, short)
        long_axis = 0 if resized[0] > resized[1] else 1
        extra = resized[long_axis] - short
        for start in (0, centre_offset(resized[long_axis], short), extra):
            left, top = (start, 0) if long_axis == 0 else (0, start)
            crops += _five(resized, (left, top, short), input_size)
            crops.append(Region(resized, (left, top, short, short), input_size))
    return crops + [c.mirrored() for c in crops]


def regions(width: int, height: int, input_size: int, crop_pct: float, crops: int) -> list[Region]:
    """The crops of protocol ``crops`` (1, 10 or 144) for a ``width`` × ``height`` image."""
    if crops == 1:
        return [centre_crop(width, height, input_size, crop_pct)]
    if crops == 10:
        return ten_crops(width, height, input_size, crop_pct)
    if crops == 144:
        return googlenet_crops(width, height, input_size)
    raise ValueError(f"crops must be one of {SUPPORTED_CROPS}, got {crops}")


def uses_crop_pct(crops: int) -> bool:
    """Whether the protocol depends on the model's ``crop_pct`` (144 crops do not: their
    scales are fixed), so that models differing only there can share one batch."""
    return crops != 144


def largest_short_side(input_size: int, crop_pct: float, crops: int) -> int:
    """The largest shorter side a protocol resizes to: what draft decoding must keep."""
    if crops == 144:
        return max(googlenet_scales(input_size))
    return scale_size(input_size, crop_pct)


def _supported(crops: int) -> int:
    if crops not in SUPPORTED_CROPS:
        raise ValueError(f"crops must be one of {', '.join(map(str, SUPPORTED_CROPS))}")
    return crops


#: The multi-crop protocols (service/crops.py): 1, 10 (Krizhevsky et al. 2012), 144 (Szegedy
#: et al. 2015). An int checked against them, so that "10" from a query or form is accepted.
Crops = Annotated[int, AfterValidator(_supported), Field(json_schema_extra={"enum": list(SUPPORTED_CROPS)})]
CROPS_DESCRIPTION = (
    "crops averaged: 1 (timm's centre crop), 10 (4 corners + centre and their mirrors, Krizhevsky et al. "
    "2012) or 144 (GoogLeNet's 4 scales x 3 squares x 6 crops x 2 mirrors, Szegedy et al. 2015)"
)
