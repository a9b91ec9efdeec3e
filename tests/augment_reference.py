"""The fused pipeline written as a composition of pyssl.augment.functional ops (float32)."""

import torch

import pyssl.augment.functional as AF

_OPS = (AF.adjust_brightness, AF.adjust_contrast, AF.adjust_saturation, AF.adjust_hue)


def compose(images, params, size, mean=None, std=None, dtype=torch.float64):
    """What SimCLRAugment.apply computes for ``params``: uint8 scaled by 1/255, then the
    functional ops in the pipeline's order, image by image parameters."""
    x = images.float() * (1.0 / 255) if images.dtype == torch.uint8 else images.float()
    x = x[params.source_index]
    x = AF.resized_crop(x, params.crop_boxes, size)
    x = AF.hflip(x, params.flip)
    for step in range(4):
        op_of_image = params.jitter_order[:, step]
        for op_index, op in enumerate(_OPS):
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
