"""pyssl's operators when its compiled extension is missing: the schemas of csrc/schemas.h,
defined from Python, with kernels in eager PyTorch for CPU and CUDA tensors alike.

This is the documented fallback (README, "Without the compiled extension"): every loss, method
and augmentation runs, at eager PyTorch's speed and memory (the N x N similarity matrix is
materialised, as in :mod:`pyssl.reference`), with the fused kernels' values and gradients up to
float rounding. Above ``torch.ops.pyssl`` nothing changes: :mod:`pyssl.ops` registers the same
argument checks, fake kernels and autograd formulas on these operators as on the compiled ones,
and the backwards are the kernels' closed forms (they get the forward's log-sum-exps, not a
graph). The augmentation kernel is registered by :mod:`pyssl.augment.reference`, which holds the
composition of the functional ops it is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# Kept word for word as csrc/schemas.h declares them (tests/test_fallback.py compares the two).
SCHEMAS = {
    "ntxent_forward": "ntxent_forward(Tensor z, float temperature, bool? tensor_cores=None) -> (Tensor loss, Tensor lse)",
    "ntxent_backward": (
        "ntxent_backward(Tensor grad_loss, Tensor z, Tensor lse, float temperature, bool? tensor_cores=None) -> Tensor"
    ),
    "infonce_forward": (
        "infonce_forward(Tensor query, Tensor key, Tensor logit_scale, bool symmetric, bool? tensor_cores=None) "
        "-> (Tensor loss, Tensor lse_row, Tensor lse_col)"
    ),
    "infonce_backward": (
        "infonce_backward(Tensor grad_loss, Tensor query, Tensor key, Tensor logit_scale, "
        "Tensor lse_row, Tensor lse_col, bool symmetric, bool? tensor_cores=None, "
        "bool[3] output_mask=[True, True, True]) "
        "-> (Tensor grad_query, Tensor grad_key, Tensor grad_logit_scale)"
    ),
    "moco_forward": (
        "moco_forward(Tensor query, Tensor key, Tensor queue, float temperature) "
        "-> (Tensor loss, Tensor lse, Tensor expected_queue)"
    ),
    "moco_backward": (
        "moco_backward(Tensor grad_loss, Tensor query, Tensor key, Tensor lse, Tensor expected_queue, "
        "float temperature, bool[2] output_mask=[True, True]) -> (Tensor grad_query, Tensor grad_key)"
    ),
    "ema_update_": "ema_update_(Tensor(a!)[] ema, Tensor[] online, float momentum) -> ()",
    "augment_fused": (
        "augment_fused(Tensor images, Tensor source_index, Tensor crop_boxes, Tensor flip, "
        "Tensor jitter_factors, Tensor jitter_order, Tensor gray, Tensor blur_sigma, "
        "Tensor blur_kernel_size, Tensor solarize_threshold, Tensor mean, Tensor std, "
        "int out_h, int out_w, ScalarType? out_dtype=None, bool channels_last=False, "
        "int blur_kernel_bound=-1) -> Tensor"
    ),
    "augment_draw_crops": (
        "augment_draw_crops(Tensor uniforms, int height, int width, float scale_min, float scale_max, "
        "float ratio_min, float ratio_max) -> Tensor"
    ),
}

# The kernels' norm clamp (csrc/common.h: kNormEps).
NORM_EPS = 1e-12

_library: torch.library.Library | None = None


def define_ops() -> None:
    """Defines ``torch.ops.pyssl`` from :data:`SCHEMAS` with the kernels below (once). Called
    before anything imports :mod:`pyssl.ops`, which registers its fake kernels and autograd
    formulas on the operators when it is imported (as here, by :func:`register_kernel`)."""
    global _library
    if _library is not None:
        return
    _library = torch.library.Library("pyssl", "DEF")
    for schema in SCHEMAS.values():
        _library.define(schema)
    for name, kernel in _KERNELS.items():
        register_kernel(name, kernel)


def register_kernel(name: str, kernel: Callable) -> None:
    """``kernel`` as the CPU and CUDA implementation of ``pyssl::name``, after the checks of the
    op's fake kernel (the messages the compiled kernels give)."""
    from pyssl.ops import FAKE_KERNELS

    check = FAKE_KERNELS[name]

    def checked(*args, **kwargs):
        check(*args, **kwargs)
        return kernel(*args, **kwargs)

    for key in ("CPU", "CUDA"):
        _library.impl(name, checked, key)


# ---- row normalisation ---------------------------------------------------------------------------


def _unit_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(x / max(||x||, eps), ||x||) per row, in the accumulation dtype."""
    from pyssl.ops import accumulate_dtype

    x = x.to(accumulate_dtype(x.dtype))
    norm = x.norm(dim=1, keepdim=True)
    return x / norm.clamp_min(NORM_EPS), norm


def _unit_rows_backward(grad_unit: Tensor, unit: Tensor, norm: Tensor) -> Tensor:
    """The gradient through u = x / max(||x||, eps): (g - (g.u) u) / ||x||, or g / eps where the
    norm was clamped (the clamp passes nothing to the norm)."""
    projected = (grad_unit - (grad_unit * unit).sum(1, keepdim=True) * unit) / norm.clamp_min(NORM_EPS)
    return torch.where(norm > NORM_EPS, projected, grad_unit / NORM_EPS)


# ---- NT-Xent ------------------------------------------------------------------------------------


def _ntxent_logits(z: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    u, norm = _unit_rows(z)
    logits = (u @ u.T) * (1.0 / temperature)
    logits.fill_diagonal_(float("-inf"))
    rows = z.shape[0]
    positive = (torch.arange(rows, device=z.device) + rows // 2) % rows
    return logits, positive, u, norm


def ntxent_forward(z: Tensor, temperature: float, tensor_cores=None) -> tuple[Tensor, Tensor]:
    logits, positive, _, _ = _ntxent_logits(z, temperature)
    lse = torch.logsumexp(logits, dim=1)
    loss = (lse - logits.gather(1, positive[:, None]).squeeze(1)).mean()
    return loss.to(z.dtype), lse


def ntxent_backward(grad_loss: Tensor, z: Tensor, lse: Tensor, temperature: float, tensor_cores=None) -> Tensor:
    logits, positive, u, norm = _ntxent_logits(z, temperature)
    # dL/dS_ij = (P_ij - [j = positive(i)]) / 2N, and S is symmetric in u.
    g = (logits - lse.to(u.dtype)[:, None]).exp()
    g[torch.arange(z.shape[0], device=z.device), positive] -= 1
    grad_unit = (g + g.T) @ u * (grad_loss.to(u.dtype) / (temperature * z.shape[0]))
    return _unit_rows_backward(grad_unit, u, norm).to(z.dtype)


# ---- InfoNCE / CLIP -----------------------------------------------------------------------------


def infonce_forward(query: Tensor, key: Tensor, logit_scale: Tensor, symmetric: bool, tensor_cores=None):
    u, _ = _unit_rows(query)
    v, _ = _unit_rows(key)
    logits = (u @ v.T) * logit_scale.to(u.dtype).reshape(())
    rows = query.shape[0]
    positive = logits.diagonal()[:rows]
    lse_row = torch.logsumexp(logits, dim=1)
    loss = (lse_row - positive).mean()
    lse_col = logits.new_empty(0)
    if symmetric:
        lse_col = torch.logsumexp(logits, dim=0)
        loss = 0.5 * (loss + (lse_col - positive).mean())
    return loss.to(query.dtype), lse_row, lse_col


def infonce_backward(
    grad_loss, query, key, logit_scale, lse_row, lse_col, symmetric, tensor_cores=None, output_mask=(True,) * 3
):
    u, norm_u = _unit_rows(query)
    v, norm_v = _unit_rows(key)
    scale = logit_scale.to(u.dtype).reshape(())
    cos = u @ v.T
    rows = query.shape[0]
    # dL/dS: (P_row - I) / N for InfoNCE; CLIP adds the column softmax and halves both.
    g = (cos * scale - lse_row.to(u.dtype)[:, None]).exp()
    if symmetric:
        g += (cos * scale - lse_col.to(u.dtype)[None, :]).exp()
    g.diagonal()[:rows] -= 2.0 if symmetric else 1.0
    g *= grad_loss.to(u.dtype) / ((2.0 if symmetric else 1.0) * rows)
    want_query, want_key, want_scale = output_mask
    grad_query = _unit_rows_backward(g @ v * scale, u, norm_u).to(query.dtype) if want_query else None
    grad_key = _unit_rows_backward(g.T @ u * scale, v, norm_v).to(key.dtype) if want_key else None
    grad_scale = (g * cos).sum().to(logit_scale.dtype).reshape(logit_scale.shape) if want_scale else None
    return grad_query, grad_key, grad_scale


# ---- MoCo ---------------------------------------------------------------------------------------


def moco_forward(query: Tensor, key: Tensor, queue: Tensor, temperature: float):
    u, _ = _unit_rows(query)
    v, _ = _unit_rows(key)
    positive = (u * v).sum(1, keepdim=True) / temperature
    negatives = u @ queue.to(u.dtype).T / temperature
    logits = torch.cat([positive, negatives], dim=1)
    lse = torch.logsumexp(logits, dim=1)
    # A_i = sum_j P_ij q_j over the queue only: the backward's term of the negatives.
    expected_queue = (negatives - lse[:, None]).exp() @ queue.to(u.dtype)
    loss = (lse - positive.squeeze(1)).clamp_min(0).mean()
    return loss.to(query.dtype), lse, expected_queue


def moco_backward(grad_loss, query, key, lse, expected_queue, temperature, output_mask=(True, True)):
    u, norm_u = _unit_rows(query)
    v, norm_v = _unit_rows(key)
    coef = grad_loss.to(u.dtype) / (temperature * query.shape[0])
    p0_minus_1 = ((u * v).sum(1, keepdim=True) / temperature - lse.to(u.dtype)[:, None]).exp() - 1
    grad_query = grad_key = None
    if output_mask[0]:
        grad_unit = (p0_minus_1 * v + expected_queue.to(u.dtype)) * coef
        grad_query = _unit_rows_backward(grad_unit, u, norm_u).to(query.dtype)
    if output_mask[1]:
        grad_key = _unit_rows_backward(p0_minus_1 * u * coef, v, norm_v).to(key.dtype)
    return grad_query, grad_key


# ---- momentum EMA ---------------------------------------------------------------------------------


def ema_update_(ema: list[Tensor], online: list[Tensor], momentum: float) -> None:
    from pyssl.ops import accumulate_dtype

    for e, o in zip(ema, online):
        acc = accumulate_dtype(e.dtype)
        e.copy_(momentum * e.to(acc) + (1.0 - momentum) * o.to(acc))


# ---- RandomResizedCrop boxes ----------------------------------------------------------------------


def augment_draw_crops(uniforms, height, width, scale_min, scale_max, ratio_min, ratio_max) -> Tensor:
    """torchvision's RandomResizedCrop draw, every image at once (csrc/augment/augment_math.h:
    draw_crop): the first of the attempts whose box fits, else the centre crop of the allowed
    aspect ratio."""
    n, attempts = uniforms.shape[0], uniforms.shape[1] // 4
    u = uniforms.to(torch.float64).reshape(n, 4, attempts)
    area = float(height) * float(width)
    log_lo, log_hi = math.log(ratio_min), math.log(ratio_max)
    target = area * (scale_min + (scale_max - scale_min) * u[:, 0])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    top = torch.minimum((u[:, 2] * (height - h + 1)).long(), height - h)
    left = torch.minimum((u[:, 3] * (width - w + 1)).long(), width - w)
    drawn = torch.stack([top, left, h, w], dim=2)  # (n, attempts, 4)
    first = torch.argmax(fits.int(), dim=1)  # the first attempt that fits (0 when none does)
    boxes = drawn[torch.arange(n, device=u.device), first]

    in_ratio = width / height
    cw, ch = width, height
    if in_ratio < ratio_min:
        ch = round(width / ratio_min)
    elif in_ratio > ratio_max:
        cw = round(height * ratio_max)
    cw, ch = min(max(cw, 1), width), min(max(ch, 1), height)
    centre = torch.tensor([(height - ch) // 2, (width - cw) // 2, ch, cw], device=u.device)
    return torch.where(fits.any(dim=1, keepdim=True), boxes, centre)


_KERNELS = {
    "ntxent_forward": ntxent_forward,
    "ntxent_backward": ntxent_backward,
    "infonce_forward": infonce_forward,
    "infonce_backward": infonce_backward,
    "moco_forward": moco_forward,
    "moco_backward": moco_backward,
    "ema_update_": ema_update_,
    "augment_draw_crops": augment_draw_crops,
}
