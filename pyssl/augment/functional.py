"""Batched functional image ops with per-image parameters.

Every op takes a batch ``images`` of shape (B, C, H, W), uint8 (values 0..255) or floating
(values in [0, 1]; B = 0 gives an empty batch back), and per-image parameters: a number (the same for every image) or a tensor
of B values. Each returns what ``torchvision.transforms.v2.functional`` returns for one image
and its parameters, in the input's dtype: uint8 results are truncated or rounded the way
torchvision does (bilinear resizing without antialias). These are plain PyTorch, vectorised
over the batch; the fused pipeline (:class:`pyssl.augment.SimCLRAugment`) computes the same
composition in one kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor

# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma).
LUMA = (0.2989, 0.587, 0.114)
# Largest blur kernel the fused kernels accept (csrc/augment/augment_math.h: kMaxKernelSize).
MAX_KERNEL_SIZE = 191


# ---- argument checks ---------------------------------------------------------------------------


def check_images(op: str, images, *, channels: Sequence[int] = (1, 3)) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"{op}: images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"{op}: images must be uint8 or floating, got dtype {images.dtype}")
    if images.dim() != 4:
        raise ValueError(f"{op}: images must be a batch (B, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] not in channels:
        raise ValueError(
            f"{op}: images must have {' or '.join(map(str, channels))} channels, got {images.shape[1]} "
            f"(shape {tuple(images.shape)})"
        )
    # An empty batch (0, C, H, W) is valid and gives one back, as torchvision's kernels do;
    # images without pixels are not.
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"{op}: images have no pixels (shape {tuple(images.shape)})")


def per_image(op: str, name: str, value, images: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``value`` (a number or B values) as a (B,) tensor on the images' device."""
    batch = images.shape[0]
    dtype = dtype or compute_dtype(images)
    if isinstance(value, Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{op}: {name} must be a real tensor, got dtype {value.dtype}")
        if value.dim() == 0:
            value = value.expand(batch)
        elif value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(f"{op}: {name} must hold one value per image ({batch}), got shape {tuple(value.shape)}")
        return value.to(device=images.device, dtype=dtype)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{op}: {name} must be a number or a tensor of {batch} values, got {type(value).__name__}")
    return torch.full((batch,), float(value), device=images.device, dtype=dtype)


def per_image_mask(op: str, name: str, mask, images: Tensor) -> Tensor:
    batch = images.shape[0]
    if mask is None:
        return torch.ones(batch, dtype=torch.bool, device=images.device)
    if isinstance(mask, bool):
        return torch.full((batch,), mask, dtype=torch.bool, device=images.device)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{op}: {name} must be a bool tensor of {batch} values")
    if mask.shape != (batch,):
        raise ValueError(f"{op}: {name} must have shape ({batch},), got {tuple(mask.shape)}")
    return mask.to(images.device)


def _check_range(op: str, name: str, values: Tensor, low: float, high: float) -> None:
    # Synchronises with the device; these ops are the reference path, the pipeline draws valid
    # parameters itself.
    bad = torch.isnan(values) | (values < low) | (values > high)
    if bool(bad.any()):
        first = values[bad][0].item()
        raise ValueError(f"{op}: {name} must be in [{low}, {high}], got {first}")


def compute_dtype(images: Tensor) -> torch.dtype:
    return torch.float64 if images.dtype == torch.float64 else torch.float32


def _bound(images: Tensor) -> float:
    return 255.0 if images.dtype == torch.uint8 else 1.0


def _col(t: Tensor) -> Tensor:
    return t.view(-1, 1, 1, 1)


def _finish(result: Tensor, like: Tensor, *, rounding: bool = False) -> Tensor:
    """Back to the input dtype: uint8 is truncated (torchvision's ``.to``) or rounded."""
    if like.dtype == torch.uint8:
        if rounding:
            result = result.round()
        return result.clamp(0, 255).to(torch.uint8)
    return result.to(like.dtype)


# ---- geometry ---------------------------------------------------------------------------------------


def _taps(start: Tensor, length: Tensor, out_size: int, dtype: torch.dtype):
    """Bilinear source rows/columns of crops (align_corners=False, no antialias), as
    torch's upsample_bilinear2d: (B, out) absolute indices i0, i1 and weights w0, w1."""
    scale = (length.to(dtype) / out_size).unsqueeze(1)
    dst = torch.arange(out_size, device=length.device, dtype=dtype).unsqueeze(0)
    src = ((dst + 0.5) * scale - 0.5).clamp_min(0)
    last = (length - 1).unsqueeze(1)
    i0 = torch.minimum(src.floor().long(), last)
    w1 = (src - i0.to(dtype)).clamp(0, 1)
    i1 = i0 + (i0 < last).long()
    base = start.unsqueeze(1)
    return base + i0, base + i1, 1 - w1, w1


def check_boxes(op: str, boxes, images: Tensor) -> Tensor:
    batch, _, height, width = images.shape
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{op}: boxes must be a tensor (B, 4) of (top, left, height, width)")
    if boxes.is_floating_point() or boxes.dtype == torch.bool or boxes.is_complex():
        raise TypeError(f"{op}: boxes must be an integer tensor, got dtype {boxes.dtype}")
    if boxes.shape != (batch, 4):
        raise ValueError(
            f"{op}: boxes must have shape ({batch}, 4) (top, left, height, width), got {tuple(boxes.shape)}"
        )
    boxes = boxes.to(device=images.device, dtype=torch.long)
    top, left, h, w = boxes.unbind(1)
    bad = (top < 0) | (left < 0) | (h <= 0) | (w <= 0) | (top + h > height) | (left + w > width)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{op}: boxes[{i}] = {tuple(boxes[i].tolist())} (top, left, height, width) is not inside the "
            f"{height}x{width} image"
        )
    return boxes


def _check_size(op: str, size) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ValueError(f"{op}: size must be a positive int or a pair (height, width) of them, got {size!r}")
    return int(size[0]), int(size[1])


def resized_crop(images: Tensor, boxes: Tensor, size) -> Tensor:
    """Crop ``boxes[i] = (top, left, height, width)`` of image i and resize it bilinearly
    (no antialias) to ``size``; torchvision's ``resized_crop(..., antialias=False)``."""
    op = "pyssl.augment.resized_crop"
    check_images(op, images, channels=range(1, 1 << 30))
    out_h, out_w = _check_size(op, size)
    boxes = check_boxes(op, boxes, images)
    dtype = compute_dtype(images)
    batch, channels, _, width = images.shape
    y0, y1, wy0, wy1 = _taps(boxes[:, 0], boxes[:, 2], out_h, dtype)
    x0, x1, wx0, wx1 = _taps(boxes[:, 1], boxes[:, 3], out_w, dtype)
    x = images.to(dtype)

    def rows(index):
        return x.gather(2, index.view(batch, 1, out_h, 1).expand(batch, channels, out_h, width))

    def cols(r, index):
        return r.gather(3, index.view(batch, 1, 1, out_w).expand(batch, channels, out_h, out_w))

    wx0, wx1 = wx0.view(batch, 1, 1, out_w), wx1.view(batch, 1, 1, out_w)
    r0, r1 = rows(y0), rows(y1)
    top = cols(r0, x0) * wx0 + cols(r0, x1) * wx1
    bottom = cols(r1, x0) * wx0 + cols(r1, x1) * wx1
    out = top * wy0.view(batch, 1, out_h, 1) + bottom * wy1.view(batch, 1, out_h, 1)
    return _finish(out, images, rounding=True)


def hflip(images: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mirror left-right the images where ``mask`` (B bools; default: all) is True."""
    op = "pyssl.augment.hflip"
    check_images(op, images, channels=range(1, 1 << 30))
    mask = per_image_mask(op, "mask", mask, images)
    return torch.where(_col(mask), images.flip(-1), images)


# ---- colour -------------------------------------------------------------------------------------


def _luma(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    return (r * LUMA[0] + g * LUMA[1] + b * LUMA[2]).unsqueeze(1)


def _blend(images: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    x = images.to(ratio.dtype)
    out = (x * _col(ratio) + other * _col(1 - ratio)).clamp(0, _bound(images))
    return _finish(out, images)


def _gray_for_blend(images: Tensor, dtype: torch.dtype) -> Tensor:
    gray = _luma(images.to(dtype))
    return gray.floor() if images.dtype == torch.uint8 else gray


def adjust_brightness(images: Tensor, factor) -> Tensor:
    """``images * factor`` clamped; factor >= 0 per image."""
    op = "pyssl.augment.adjust_brightness"
    check_images(op, images)
    factor = per_image(op, "factor", factor, images)
    _check_range(op, "factor", factor, 0, math.inf)
    out = (images.to(factor.dtype) * _col(factor)).clamp(0, _bound(images))
    return _finish(out, images)


def adjust_contrast(images: Tensor, factor) -> Tensor:
    """Blend with the mean grayscale value of each image; factor >= 0 per image."""
    op = "pyssl.augment.adjust_contrast"
    check_images(op, images)
    factor = per_image(op, "factor", factor, images)
    _check_range(op, "factor", factor, 0, math.inf)
    if images.shape[1] == 3:
        gray = _gray_for_blend(images, factor.dtype)
    else:
        gray = images.to(factor.dtype)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, factor)


def adjust_saturation(images: Tensor, factor) -> Tensor:
    """Blend with each pixel's grayscale value; factor >= 0 per image (C=1: unchanged)."""
    op = "pyssl.augment.adjust_saturation"
    check_images(op, images)
    factor = per_image(op, "factor", factor, images)
    _check_range(op, "factor", factor, 0, math.inf)
    if images.shape[1] == 1:
        return images
    return _blend(images, _gray_for_blend(images, factor.dtype), factor)


def _rgb_to_hsv(x: Tensor):
    r, g, b = x.unbind(1)
    maxc = torch.maximum(r, torch.maximum(g, b))
    minc = torch.minimum(r, torch.minimum(g, b))
    eqc = maxc == minc
    span = maxc - minc
    ones = torch.ones_like(maxc)
    s = span / torch.where(eqc, ones, maxc)
    div = torch.where(eqc, ones, span)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.fmod(h * (1.0 / 6.0) + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    h6 = h * 6
    i = h6.floor()
    f = h6 - i
    i = i.to(torch.int64).remainder(6)
    q = ((1.0 - s * f) * v).clamp(0, 1)
    t = ((s * f + (1.0 - s)) * v).clamp(0, 1)
    p = ((1.0 - s) * v).clamp(0, 1)
    vpqt = torch.stack((v, p, q, t), dim=1)  # (B, 4, H, W)
    # Which of (v, p, q, t) each of r, g, b takes in the six hue sectors.
    table = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=h.device)
    select = table[:, i].movedim(0, 1)  # (B, 3, H, W)
    return vpqt.gather(1, select)


def adjust_hue(images: Tensor, factor) -> Tensor:
    """Rotate the hue (HSV) by ``factor`` in [-0.5, 0.5] turns (C=1: unchanged)."""
    op = "pyssl.augment.adjust_hue"
    check_images(op, images)
    factor = per_image(op, "factor", factor, images, dtype=torch.float32)
    _check_range(op, "factor", factor, -0.5, 0.5)
    if images.shape[1] == 1:
        return images
    # torchvision converts to float32 (uint8 scaled by 1/255) and back.
    x = images.to(torch.float32)
    if images.dtype == torch.uint8:
        x = x * (1.0 / 255)
    h, s, v = _rgb_to_hsv(x)
    h = torch.remainder(h + factor.view(-1, 1, 1), 1.0)
    out = _hsv_to_rgb(h, s, v)
    if images.dtype == torch.uint8:
        return (out * (255 + 1.0 - 1e-3)).to(torch.uint8)
    return out.to(images.dtype)


def rgb_to_grayscale(images: Tensor, num_output_channels: int = 1) -> Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B`` (C=1: a copy), 1 or 3 output channels."""
    op = "pyssl.augment.rgb_to_grayscale"
    check_images(op, images)
    if num_output_channels not in (1, 3):
        raise ValueError(f"{op}: num_output_channels must be 1 or 3, got {num_output_channels}")
    if images.shape[1] == 1:
        return images.repeat(1, num_output_channels, 1, 1)
    gray = _finish(_luma(images.to(compute_dtype(images))), images)
    return gray.expand(-1, num_output_channels, -1, -1).contiguous()


# ---- filters and point ops -----------------------------------------------------------------------


def kernel_size_for(sigma: Tensor) -> Tensor:
    """Odd kernel size covering +-3 sigma: ``2 * ceil(3 * sigma) + 1`` (capped)."""
    # ceil through an integer cast: sigma >= 0, and elementwise ceil/floor on small CPU tensors
    # can cost milliseconds of thread start-up on a busy machine.
    x = 3 * sigma.double()
    ceil = x.long()
    ceil = ceil + (x > ceil).long()
    return (2 * ceil + 1).clamp(max=MAX_KERNEL_SIZE)


def _reflect(index: Tensor, n: int) -> Tensor:
    if n == 1:
        return torch.zeros_like(index)
    period = 2 * (n - 1)
    index = index.abs() % period
    return torch.where(index >= n, period - index, index)


def gaussian_blur(images: Tensor, sigma, kernel_size=None) -> Tensor:
    """Gaussian blur with per-image ``sigma`` > 0 and reflect padding, as torchvision's
    ``gaussian_blur(image, kernel_size, sigma)``. ``kernel_size``: an odd int, B odd ints, or
    None for ``2 * ceil(3 * sigma) + 1`` per image."""
    op = "pyssl.augment.gaussian_blur"
    check_images(op, images)
    dtype = compute_dtype(images)
    sigma = per_image(op, "sigma", sigma, images, dtype=torch.float64)
    if bool((~(sigma > 0) | ~torch.isfinite(sigma)).any()):
        raise ValueError(
            f"{op}: sigma must be finite and > 0, got {sigma[~(sigma > 0) | ~torch.isfinite(sigma)][0].item()}"
        )
    if kernel_size is None:
        ksize = kernel_size_for(sigma)
    else:
        ksize = per_image(op, "kernel_size", kernel_size, images, dtype=torch.int64)
        if bool(((ksize % 2 == 0) | (ksize < 1) | (ksize > MAX_KERNEL_SIZE)).any()):
            raise ValueError(f"{op}: kernel_size must be odd and in [1, {MAX_KERNEL_SIZE}], got {kernel_size}")
    batch, channels, height, width = images.shape
    kmax = int(ksize.max()) if batch else 1  # an empty batch has no kernel to size
    rmax = kmax // 2
    # One weight table (B, kmax), each image's kernel centred and zero-padded to kmax taps.
    taps = torch.arange(kmax, device=images.device, dtype=torch.float64) - rmax
    radius = (ksize // 2).unsqueeze(1)
    weights = torch.exp(-0.5 * (taps / sigma.unsqueeze(1)) ** 2) * (taps.abs() <= radius)
    weights = (weights / weights.sum(1, keepdim=True)).to(dtype)

    x = images.to(dtype)
    cols = _reflect(torch.arange(-rmax, width + rmax, device=images.device), width)
    padded = x.index_select(3, cols)
    out = torch.zeros_like(x)
    for k in range(kmax):
        out += weights[:, k].view(-1, 1, 1, 1) * padded[..., k : k + width]
    rows = _reflect(torch.arange(-rmax, height + rmax, device=images.device), height)
    padded = out.index_select(2, rows)
    out = torch.zeros_like(x)
    for k in range(kmax):
        out += weights[:, k].view(-1, 1, 1, 1) * padded[:, :, k : k + height]
    return _finish(out, images, rounding=True)


def solarize(images: Tensor, threshold) -> Tensor:
    """Invert (``bound - x``) the values ``>= threshold`` (per image, in the images' units:
    0..255 for uint8, 0..1 for floating; +inf leaves an image unchanged)."""
    op = "pyssl.augment.solarize"
    check_images(op, images)
    threshold = per_image(op, "threshold", threshold, images)
    if bool(torch.isnan(threshold).any()):
        raise ValueError(f"{op}: threshold must not be NaN")
    inverted = (255 - images) if images.dtype == torch.uint8 else 1 - images
    return torch.where(images.to(threshold.dtype) >= _col(threshold), inverted, images)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean[c]) / std[c]`` per channel (floating images only)."""
    op = "pyssl.augment.normalize"
    check_images(op, images, channels=range(1, 1 << 30))
    if not images.is_floating_point():
        raise TypeError(f"{op}: images must be floating (convert uint8 with x / 255 first), got {images.dtype}")
    channels = images.shape[1]
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).reshape(-1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).reshape(-1)
    if mean_t.numel() != channels or std_t.numel() != channels:
        raise ValueError(f"{op}: mean and std need {channels} values, got {mean_t.numel()} and {std_t.numel()}")
    if bool((std_t == 0).any()):
        raise ValueError(f"{op}: std must be non-zero, got {std_t.tolist()}")
    return (images - mean_t.view(1, -1, 1, 1)) / std_t.view(1, -1, 1, 1)
