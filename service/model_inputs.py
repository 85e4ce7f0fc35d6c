"""A model's input from a decoded image: the preprocessing its config states (timm's eval
crop, or 10 or 144 crops), each crop resampled by Pillow from the image as decoded.

Apart from the decode (:mod:`service.imaging`) because this is the part held to timm's
numbers (``tests/gateway/images/test_preprocessing_reference.py``), not to hostile bytes: it only
ever sees an RGB image already within the limits. Synchronous and CPU-bound, as the decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import crops as geometry

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


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
