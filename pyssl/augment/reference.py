"""The fused augmentation (``torch.ops.pyssl.augment_fused``) as the composition of the
functional ops it is made of, image by image parameters: the reference the fused CPU and CUDA
kernels are tested against, and the op's kernel when pyssl runs without its compiled extension
(:mod:`pyssl._fallback`)."""

from __future__ import annotations

import torch
from torch import Tensor

from pyssl import _extension
from pyssl.augment import functional as AF
from pyssl.augment.pipeline import AugmentParams

_JITTER_OPS = (AF.adjust_brightness, AF.adjust_contrast, AF.adjust_saturation, AF.adjust_hue)


def compose(images: Tensor, params: AugmentParams, size, mean=None, std=None, dtype=torch.float64) -> Tensor:
    """What :meth:`pyssl.augment.SimCLRAugment.apply` computes for ``params``: uint8 scaled by
    1/255, then crop and resize, flip, the four jitter ops in each image's order, grayscale, blur,
    solarize and (with ``mean``, ``std``) normalisation, in float32; the result in ``dtype``."""
    x = images.float() * (1.0 / 255) if images.dtype == torch.uint8 else images.float()
    x = x[params.source_index]
    x = AF.resized_crop(x, params.crop_boxes, size)
    x = AF.hflip(x, params.flip)
    for step in range(4):
        op_of_image = params.jitter_order[:, step]
        for op_index, op in enumerate(_JITTER_OPS):
            chosen = op_of_image == op_index
            if chosen.any():
                adjusted = op(x, params.jitter_factors[:, op_index])
                x = torch.where(chosen.view(-1, 1, 1, 1), adjusted, x)
    x = torch.where(params.gray.view(-1, 1, 1, 1), AF.rgb_to_grayscale(x, x.shape[1]), x)
    blurred = params.blur_sigma > 0
    if blurred.any():
        x = x.clone()
        x[blurred] = AF.gaussian_blur(x[blurred], params.blur_sigma[blurred], params.blur_kernel_size[blurred])
    x = AF.solarize(x, params.solarize_threshold)
    if mean is not None:
        x = AF.normalize(x, mean, std)
    return x.to(dtype)


def augment_fused(
    images,
    source_index,
    crop_boxes,
    flip,
    jitter_factors,
    jitter_order,
    gray,
    blur_sigma,
    blur_kernel_size,
    solarize_threshold,
    mean,
    std,
    out_h,
    out_w,
    out_dtype=None,
    channels_last=False,
    blur_kernel_bound=-1,
) -> Tensor:
    """``torch.ops.pyssl.augment_fused``'s signature over :func:`compose`."""
    params = AugmentParams(
        source_index, crop_boxes, flip, jitter_factors, jitter_order, gray, blur_sigma, blur_kernel_size,
        solarize_threshold,
    )  # fmt: skip
    normalise = mean.numel() > 0
    out = compose(
        images,
        params,
        (out_h, out_w),
        mean.tolist() if normalise else None,
        std.tolist() if normalise else None,
        out_dtype or torch.float32,
    )
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


if not _extension.extension_loaded:
    from pyssl import _fallback

    _fallback.register_kernel("augment_fused", augment_fused)
