"""Python face of the compiled operators (``torch.ops.pyssl``).

Each op gets three things here: argument checks that raise clear Python errors naming the
argument, a fake (meta) kernel so ``torch.compile`` can trace it, and its autograd formula.
"""

from __future__ import annotations

import math
import os
from numbers import Real

import torch
from torch import Tensor

# The namespace the wrappers below call: torch.ops.pyssl, or torch.ops.pyssl_emu inside
# pyssl.emulation.cuda_emulated() (the CUDA kernels run by the CPU emulator).
_ops = torch.ops.pyssl


# ---- argument checks shared by the op families -------------------------------------------------


def check_embeddings(name: str, t, *, op: str, allow_empty: bool = False) -> None:
    """Checks that ``t`` is a 2-D floating tensor (batch, dim), with rows unless ``allow_empty``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{op}: {name} is an empty batch (shape {tuple(t.shape)})")
    if t.shape[1] == 0:
        raise ValueError(f"{op}: {name} has no features (shape {tuple(t.shape)})")


def check_same_device(op: str, **tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"{op}: all inputs must be on one device, got {listed}")


def check_finite(op: str, **tensors: Tensor) -> None:
    """Optional (it synchronises with the device): raises if any input holds NaN or inf."""
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{op}: {name} contains NaN or inf")


def check_real(op: str, name: str, value) -> float:
    """``value`` as a float; bools and non-numbers raise ``TypeError`` naming the argument."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_positive(op: str, name: str, value) -> float:
    value = check_real(op, name, value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {value}")
    return value


def check_non_negative(op: str, name: str, value) -> float:
    value = check_real(op, name, value)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{op}: {name} must be a finite number >= 0, got {value}")
    return value


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tensor_cores_requested() -> bool:
    """Whether CUDA fp16/bf16 input of the InfoNCE family takes the tensor-core kernels
    (``PYSSL_INFONCE_TENSOR_CORES=0``: the float32 SIMT kernels). Read once per forward; the
    backward of that forward takes the same path whatever the variable says by then."""
    return os.environ.get("PYSSL_INFONCE_TENSOR_CORES", "1") != "0"


# ---- fused NT-Xent -------------------------------------------------------------------------------


def ntxent(z0: Tensor, z1: Tensor, temperature: float = 0.5, *, check_inputs_finite: bool = False) -> Tensor:
    """Fused NT-Xent (SimCLR) loss of two views; see :class:`pyssl.losses.NTXentLoss`."""
    op = "pyssl.ntxent"
    check_embeddings("z0", z0, op=op)
    check_embeddings("z1", z1, op=op)
    if z0.shape != z1.shape:
        raise ValueError(f"{op}: z0 and z1 must have the same shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    check_same_device(op, z0=z0, z1=z1)
    temperature = check_positive(op, "temperature", temperature)
    if check_inputs_finite:
        check_finite(op, z0=z0, z1=z1)
    dtype = torch.promote_types(z0.dtype, z1.dtype)
    z = torch.cat([z0.to(dtype), z1.to(dtype)])
    loss, _ = _ops.ntxent_forward(z, temperature, tensor_cores_requested())
    return loss


# The fake kernels check what the C++ kernels check (csrc/*/..._check.h), so that a traced or
# compiled program with a wrong shape fails when it is traced, with the kernels' message.


def _check_rows(op: str, name: str, t: Tensor) -> None:
    torch._check(t.dim() == 2, lambda: f"{op}: {name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
    torch._check(t.is_floating_point(), lambda: f"{op}: {name} must be a floating tensor, got {t.dtype}")


def _check_stats(op: str, name: str, t: Tensor, rows) -> None:
    torch._check(t.dim() == 1 and t.shape[0] == rows, lambda: f"{op}: {name} must have shape ({rows},)")


def _ntxent_forward_fake(z, temperature, tensor_cores=None):
    _check_rows("pyssl.ntxent", "z", z)
    torch._check(
        z.shape[0] % 2 == 0 and z.shape[0] >= 2,
        lambda: f"pyssl.ntxent: z must hold the two views' rows (an even number >= 2), got {z.shape[0]}",
    )
    return z.new_empty(()), z.new_empty((z.shape[0],), dtype=accumulate_dtype(z.dtype))


def _ntxent_backward_fake(grad_loss, z, lse, temperature, tensor_cores=None):
    _check_rows("pyssl.ntxent_backward", "z", z)
    _check_stats("pyssl.ntxent_backward", "lse", lse, z.shape[0])
    return torch.empty_like(z)


def _ntxent_setup_context(ctx, inputs, output):
    z, temperature, *rest = inputs
    _, lse = output
    ctx.save_for_backward(z, lse)
    ctx.temperature = temperature
    # The forward's kernel choice, also when the caller left it to the environment.
    ctx.tensor_cores = rest[0] if rest and rest[0] is not None else tensor_cores_requested()


def _ntxent_backward(ops):
    def backward(ctx, grad_loss, grad_lse):
        z, lse = ctx.saved_tensors
        return ops.ntxent_backward(grad_loss, z, lse, ctx.temperature, ctx.tensor_cores), None, None

    return backward


# ---- fused InfoNCE / CLIP ---------------------------------------------------------------------


def _as_logit_scale(op: str, logit_scale, like: Tensor) -> Tensor:
    """A 0-dim tensor on `like`'s device; keeps the autograd link of a learnable scale."""
    dtype = accumulate_dtype(like.dtype)
    if isinstance(logit_scale, Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"{op}: logit_scale must hold a single value, got shape {tuple(logit_scale.shape)}")
        if not logit_scale.is_floating_point():
            raise TypeError(f"{op}: logit_scale must be a floating tensor, got dtype {logit_scale.dtype}")
        return logit_scale.reshape(()).to(device=like.device, dtype=dtype)
    value = check_positive(op, "logit_scale", logit_scale)
    # torch.full fills on the device; torch.tensor(value, device=cuda) would be a blocking copy
    # from the host in every forward.
    return torch.full((), value, device=like.device, dtype=dtype)


def infonce(
    query: Tensor,
    key: Tensor,
    logit_scale,
    *,
    symmetric: bool = False,
    check_inputs_finite: bool = False,
) -> Tensor:
    """Fused InfoNCE (``symmetric=False``) or CLIP (``symmetric=True``) loss.

    Logits are ``logit_scale * cos(query_i, key_j)``; the positive of query ``i`` is key ``i``.
    See :class:`pyssl.losses.InfoNCELoss` and :class:`pyssl.losses.ClipLoss`.
    """
    op = "pyssl.clip_loss" if symmetric else "pyssl.infonce"
    qname, kname = ("image_features", "text_features") if symmetric else ("query", "key")
    check_embeddings(qname, query, op=op)
    check_embeddings(kname, key, op=op)
    if query.shape[1] != key.shape[1]:
        raise ValueError(
            f"{op}: {qname} and {kname} must have the same feature dim, got {tuple(query.shape)} and {tuple(key.shape)}"
        )
    if symmetric and query.shape[0] != key.shape[0]:
        raise ValueError(
            f"{op}: {qname} and {kname} must have the same batch size, got {query.shape[0]} and {key.shape[0]}"
        )
    if not symmetric and key.shape[0] < query.shape[0]:
        raise ValueError(
            f"{op}: {kname} needs at least one row per {qname} row (key i is the positive of query i), "
            f"got {key.shape[0]} keys for {query.shape[0]} queries"
        )
    check_same_device(op, **{qname: query, kname: key})
    if isinstance(logit_scale, Tensor) and logit_scale.device != query.device and logit_scale.dim() > 0:
        raise ValueError(f"{op}: logit_scale is on {logit_scale.device} but {qname} on {query.device}")
    if check_inputs_finite:
        check_finite(op, **{qname: query, kname: key})
    dtype = torch.promote_types(query.dtype, key.dtype)
    query, key = query.to(dtype), key.to(dtype)
    scale = _as_logit_scale(op, logit_scale, query)
    loss, _, _ = _ops.infonce_forward(query, key, scale, symmetric, tensor_cores_requested())
    return loss


def _check_query_key(op: str, query: Tensor, key: Tensor, symmetric: bool) -> None:
    _check_rows(op, "query", query)
    _check_rows(op, "key", key)
    torch._check(query.shape[1] == key.shape[1], lambda: f"{op}: query and key must have the same dim")
    if symmetric:
        torch._check(query.shape[0] == key.shape[0], lambda: f"{op}: query and key must have the same batch size")
    else:
        torch._check(key.shape[0] >= query.shape[0], lambda: f"{op}: need at least one key per query")


def _infonce_forward_fake(query, key, logit_scale, symmetric, tensor_cores=None):
    _check_query_key("pyssl.infonce", query, key, symmetric)
    torch._check(logit_scale.numel() == 1, lambda: "pyssl.infonce: logit_scale must hold one value")
    acc = accumulate_dtype(query.dtype)
    lse_col = query.new_empty((key.shape[0] if symmetric else 0,), dtype=acc)
    return query.new_empty(()), query.new_empty((query.shape[0],), dtype=acc), lse_col


def _infonce_backward_fake(
    grad_loss, query, key, logit_scale, lse_row, lse_col, symmetric, tensor_cores=None, output_mask=(True,) * 3
):
    _check_query_key("pyssl.infonce_backward", query, key, symmetric)
    _check_stats("pyssl.infonce_backward", "lse_row", lse_row, query.shape[0])
    if symmetric:
        _check_stats("pyssl.infonce_backward", "lse_col", lse_col, key.shape[0])
    grads = torch.empty_like(query), torch.empty_like(key), torch.empty_like(logit_scale)
    return tuple(g if wanted else None for g, wanted in zip(grads, output_mask))


def _infonce_setup_context(ctx, inputs, output):
    query, key, logit_scale, symmetric, *rest = inputs
    _, lse_row, lse_col = output
    ctx.save_for_backward(query, key, logit_scale, lse_row, lse_col)
    ctx.symmetric = symmetric
    ctx.tensor_cores = rest[0] if rest and rest[0] is not None else tensor_cores_requested()


def _infonce_backward(ops):
    def backward(ctx, grad_loss, grad_lse_row, grad_lse_col):
        query, key, logit_scale, lse_row, lse_col = ctx.saved_tensors
        # Only the gradients autograd asks for: a detached key (a momentum encoder's) costs no
        # key-side sweep.
        grad_query, grad_key, grad_scale = ops.infonce_backward(
            grad_loss,
            query,
            key,
            logit_scale,
            lse_row,
            lse_col,
            ctx.symmetric,
            ctx.tensor_cores,
            list(ctx.needs_input_grad[:3]),
        )
        return grad_query, grad_key, grad_scale, None, None

    return backward


# ---- MoCo queue loss -----------------------------------------------------------------------------


def check_queue(op: str, queue, dim: int) -> None:
    if not isinstance(queue, Tensor):
        raise TypeError(f"{op}: queue must be a torch.Tensor, got {type(queue).__name__}")
    if not queue.is_floating_point():
        raise TypeError(f"{op}: queue must be a floating tensor, got dtype {queue.dtype}")
    if queue.dim() != 2 or queue.shape[1] != dim:
        raise ValueError(f"{op}: queue must have shape (K, {dim}) (K may be 0), got {tuple(queue.shape)}")


def moco(
    query: Tensor, key: Tensor, queue: Tensor, temperature: float = 0.2, *, check_inputs_finite: bool = False
) -> Tensor:
    """Fused MoCo loss of ``query`` against its ``key`` (positive) and the ``queue`` (negatives).

    ``queue`` rows are used as stored (MoCo stores normalised keys) and get no gradient; it is
    not modified. See :class:`pyssl.losses.MoCoLoss`, which also owns and updates the queue.
    """
    op = "pyssl.moco"
    check_embeddings("query", query, op=op)
    check_embeddings("key", key, op=op)
    if query.shape != key.shape:
        raise ValueError(
            f"{op}: query and key must have the same shape, got {tuple(query.shape)} and {tuple(key.shape)}"
        )
    check_queue(op, queue, query.shape[1])
    check_same_device(op, query=query, key=key, queue=queue)
    temperature = check_positive(op, "temperature", temperature)
    if check_inputs_finite:
        check_finite(op, query=query, key=key, queue=queue)
    dtype = torch.promote_types(query.dtype, key.dtype)
    loss, _, _ = _ops.moco_forward(query.to(dtype), key.to(dtype), queue.detach(), temperature)
    return loss


def _moco_forward_fake(query, key, queue, temperature):
    _check_rows("pyssl.moco", "query", query)
    torch._check(query.shape == key.shape, lambda: "pyssl.moco: query and key must have the same shape")
    torch._check(
        queue.dim() == 2 and queue.shape[1] == query.shape[1], lambda: "pyssl.moco: queue must have shape (K, dim)"
    )
    acc = accumulate_dtype(query.dtype)
    return query.new_empty(()), query.new_empty((query.shape[0],), dtype=acc), query.new_empty(query.shape, dtype=acc)


def _moco_backward_fake(grad_loss, query, key, lse, expected_queue, temperature, output_mask=(True, True)):
    _check_rows("pyssl.moco_backward", "query", query)
    torch._check(query.shape == key.shape, lambda: "pyssl.moco_backward: query and key must have the same shape")
    _check_stats("pyssl.moco_backward", "lse", lse, query.shape[0])
    torch._check(
        expected_queue.shape == query.shape, lambda: "pyssl.moco_backward: expected_queue must have query's shape"
    )
    grads = torch.empty_like(query), torch.empty_like(key)
    return tuple(g if wanted else None for g, wanted in zip(grads, output_mask))


def _moco_setup_context(ctx, inputs, output):
    query, key, queue, temperature = inputs
    _, lse, expected_queue = output
    # The queue is not saved: expected_queue carries all the backward needs from it, so the
    # caller may overwrite (enqueue into) the queue before backward runs.
    ctx.save_for_backward(query, key, lse, expected_queue)
    ctx.temperature = temperature


def _moco_backward(ops):
    def backward(ctx, grad_loss, grad_lse, grad_expected_queue):
        query, key, lse, expected_queue = ctx.saved_tensors
        grad_query, grad_key = ops.moco_backward(
            grad_loss, query, key, lse, expected_queue, ctx.temperature, list(ctx.needs_input_grad[:2])
        )
        return grad_query, grad_key, None, None

    return backward


# ---- momentum EMA --------------------------------------------------------------------------------


def ema_update_(ema: list[Tensor], online: list[Tensor], momentum: float) -> None:
    """In place, for every pair: ``ema[i] = momentum * ema[i] + (1 - momentum) * online[i]``.

    One pass over all tensors (a single kernel launch on CUDA); the lists may differ in dtype
    (e.g. float32 EMA of a bfloat16 model). See :func:`pyssl.momentum.update_momentum`.
    """
    op = "pyssl.ema_update_"
    ema, online = list(ema), list(online)
    if len(ema) != len(online):
        raise ValueError(f"{op}: ema and online must have the same length, got {len(ema)} and {len(online)}")
    momentum = check_real(op, "momentum", momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{op}: momentum must be in [0, 1], got {momentum}")
    for i, (e, o) in enumerate(zip(ema, online)):
        for name, t in (("ema", e), ("online", o)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{op}: {name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{op}: {name}[{i}] must be a floating tensor, got dtype {t.dtype}")
        if e.shape != o.shape:
            raise ValueError(f"{op}: ema[{i}] has shape {tuple(e.shape)} but online[{i}] has shape {tuple(o.shape)}")
        if e.device != o.device:
            raise ValueError(f"{op}: ema[{i}] is on {e.device} but online[{i}] on {o.device}")
    if not ema:
        return
    devices = {e.device for e in ema}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    with torch.no_grad():
        _ops.ema_update_(ema, online, momentum)


def _ema_update_fake(ema, online, momentum):
    torch._check(len(ema) == len(online), lambda: "pyssl.ema_update_: ema and online must have the same length")
    for i, (e, o) in enumerate(zip(ema, online)):
        torch._check(e.shape == o.shape, lambda i=i: f"pyssl.ema_update_: ema[{i}] and online[{i}] differ in shape")
    return None


# ---- batched image augmentations ------------------------------------------------------------------
# augment_fused has no autograd formula on purpose: it is data augmentation, applied to inputs
# that never require grad. Argument checks with clear messages live in pyssl.augment, which
# builds the parameter tensors; the C++ kernels repeat the shape/dtype checks.


def augment_fused(
    images: Tensor,
    source_index: Tensor,
    crop_boxes: Tensor,
    flip: Tensor,
    jitter_factors: Tensor,
    jitter_order: Tensor,
    gray: Tensor,
    blur_sigma: Tensor,
    blur_kernel_size: Tensor,
    solarize_threshold: Tensor,
    mean: Tensor,
    std: Tensor,
    out_h: int,
    out_w: int,
    out_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    blur_kernel_bound: int = -1,
) -> Tensor:
    """The fused augmentation op (schema and parameter layout in csrc/ops.cpp)."""
    return _ops.augment_fused(
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
        out_dtype,
        channels_last,
        blur_kernel_bound,
    )


def _augment_fused_fake(
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
):
    torch._check(images.dim() == 4, lambda: "pyssl.augment_fused: images must be (B, C, H, W)")
    out = images.new_empty((source_index.shape[0], images.shape[1], out_h, out_w), dtype=out_dtype or torch.float32)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def augment_draw_crops(uniforms: Tensor, height: int, width: int, scale, ratio) -> Tensor:
    """RandomResizedCrop boxes (N, 4) = (top, left, height, width) from (N, 4 * attempts)
    uniforms; see csrc/ops.cpp."""
    return _ops.augment_draw_crops(
        uniforms, height, width, float(scale[0]), float(scale[1]), float(ratio[0]), float(ratio[1])
    )


def _augment_draw_crops_fake(uniforms, height, width, scale_min, scale_max, ratio_min, ratio_max):
    torch._check(
        uniforms.dim() == 2 and uniforms.shape[1] % 4 == 0,
        lambda: "pyssl.augment_draw_crops: uniforms must be (N, 4 * attempts)",
    )
    return uniforms.new_empty((uniforms.shape[0], 4), dtype=torch.long)


# ---- registration ------------------------------------------------------------------------------


# Each op's fake (meta) kernel: its output shapes, after the checks the kernels make.
FAKE_KERNELS = {
    "ntxent_forward": _ntxent_forward_fake,
    "ntxent_backward": _ntxent_backward_fake,
    "infonce_forward": _infonce_forward_fake,
    "infonce_backward": _infonce_backward_fake,
    "moco_forward": _moco_forward_fake,
    "moco_backward": _moco_backward_fake,
    "ema_update_": _ema_update_fake,
    "augment_fused": _augment_fused_fake,
    "augment_draw_crops": _augment_draw_crops_fake,
}


def register_library(lib: str) -> None:
    """Fake kernels and autograd formulas for the ops of namespace ``lib`` (``pyssl``, and
    ``pyssl_emu`` for the emulated CUDA kernels of :mod:`pyssl.emulation`): each op's backward
    calls the backward op of the same namespace."""
    ops = getattr(torch.ops, lib)
    for name, fake in FAKE_KERNELS.items():
        torch.library.register_fake(f"{lib}::{name}")(fake)
    torch.library.register_autograd(
        f"{lib}::ntxent_forward", _ntxent_backward(ops), setup_context=_ntxent_setup_context
    )
    torch.library.register_autograd(
        f"{lib}::infonce_forward", _infonce_backward(ops), setup_context=_infonce_setup_context
    )
    torch.library.register_autograd(f"{lib}::moco_forward", _moco_backward(ops), setup_context=_moco_setup_context)


register_library("pyssl")
