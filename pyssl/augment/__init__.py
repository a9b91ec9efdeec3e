"""Batched image augmentations for self-supervised learning.

- :mod:`pyssl.augment.functional`: per-image-parameter ops on batches, each matching
  ``torchvision.transforms.v2.functional`` (``resized_crop``, ``hflip``, ``adjust_*``,
  ``rgb_to_grayscale``, ``gaussian_blur``, ``solarize``, ``normalize``).
- :class:`SimCLRAugment`: the whole SimCLR / MoCo v2 pipeline (random parameters drawn on the
  device) in one fused C++/CUDA op; :func:`byol_pair` for BYOL's asymmetric views.
"""

from pyssl.augment.functional import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    hflip,
    normalize,
    resized_crop,
    rgb_to_grayscale,
    solarize,
)
from pyssl.augment.pipeline import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentParams,
    MultiViewAugment,
    SimCLRAugment,
    byol_pair,
)

# isort: split
# The fused op's reference composition (and its kernel where the extension is missing).
from pyssl.augment import reference

__all__ = [
    "AugmentParams",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiViewAugment",
    "SimCLRAugment",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "byol_pair",
    "gaussian_blur",
    "hflip",
    "normalize",
    "reference",
    "resized_crop",
    "rgb_to_grayscale",
    "solarize",
]
