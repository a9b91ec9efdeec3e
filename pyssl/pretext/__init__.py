"""Self-prediction pretext tasks: transforms, colour space, embedded colour data, small nets.

The methods themselves live in :mod:`pyssl.methods` (``rotnet``, ``relative_patch``,
``jigsaw``, ``inpainting``, ``colorization``, ``split_brain``, ``video_colorization``).
"""

from pyssl.pretext.lab import ABQuantizer, lab_to_rgb, rgb_to_lab
from pyssl.pretext.transforms import (
    extract_patches,
    grid_geometry,
    grid_origins,
    maximal_hamming_permutations,
    region_masks,
    rotate_all4,
)

__all__ = [
    "ABQuantizer",
    "rgb_to_lab",
    "lab_to_rgb",
    "rotate_all4",
    "grid_geometry",
    "grid_origins",
    "extract_patches",
    "maximal_hamming_permutations",
    "region_masks",
]
