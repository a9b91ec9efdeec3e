"""Momentum (EMA) encoders: one-pass parameter updates and the cosine momentum schedule."""

from __future__ import annotations

import math
import warnings

from torch import nn

from pyssl import ops


def update_momentum(ema_model: nn.Module, model: nn.Module, m: float, *, copy_buffers: bool = False) -> None:
    r"""EMA update of a momentum encoder: :math:`\theta_k \leftarrow m\,\theta_k + (1 - m)\,\theta_q`.

    Every parameter of ``ema_model`` is updated in place from the matching parameter of
    ``model`` in one pass over all of them (one kernel launch on CUDA, one parallel region on
    CPU), whatever their number. Parameters are paired in ``parameters()`` order; the two
    models must have the same architecture. Their dtypes may differ (keep the EMA in float32:
    with bfloat16 state and m = 0.999 most updates round away).

    Note the argument order: the model that is updated comes first (lightly's
    ``update_momentum(model, model_ema, m)`` takes it second).

    Args:
        ema_model: the momentum (target) encoder, updated in place.
        model: the online encoder, read only.
        m: momentum in [0, 1]; 1 keeps ``ema_model`` unchanged, 0 copies ``model``.
        copy_buffers: also copy ``model``'s buffers (e.g. BatchNorm running statistics) into
            ``ema_model``'s (floating buffers are copied, integer ones such as
            ``num_batches_tracked`` too).
    """
    ema_params, params = list(ema_model.parameters()), list(model.parameters())
    if len(ema_params) != len(params):
        raise ValueError(f"update_momentum: ema_model has {len(ema_params)} parameters but model has {len(params)}")
    ops.ema_update_(ema_params, params, m)
    if copy_buffers:
        ema_buffers, buffers = list(ema_model.buffers()), list(model.buffers())
        if len(ema_buffers) != len(buffers):
            raise ValueError(f"update_momentum: ema_model has {len(ema_buffers)} buffers but model has {len(buffers)}")
        for i, (eb, b) in enumerate(zip(ema_buffers, buffers)):
            if eb.shape != b.shape:
                raise ValueError(
                    f"update_momentum: buffer {i} has shape {tuple(eb.shape)} in ema_model but {tuple(b.shape)} in model"
                )
            eb.copy_(b)


def cosine_schedule(
    step: int, max_steps: int, start_value: float, end_value: float, period: int | None = None
) -> float:
    """Cosine ramp from ``start_value`` (step 0) to ``end_value`` (step ``max_steps - 1``).

    The BYOL / MoCo v3 momentum schedule (e.g. 0.996 -> 1.0); same values and errors as
    lightly's ``cosine_schedule``. With ``period`` the cosine completes a full cycle every
    ``period`` steps instead.
    """
    if step < 0:
        raise ValueError(f"cosine_schedule: step must be >= 0, got {step}")
    if max_steps < 0:
        raise ValueError(f"cosine_schedule: max_steps must be >= 0, got {max_steps}")
    if period is None and step > max_steps:
        warnings.warn(f"cosine_schedule: step {step} exceeds max_steps {max_steps}", RuntimeWarning, stacklevel=2)
    if period is not None and period <= 0:
        raise ValueError(f"cosine_schedule: period must be >= 1, got {period}")
    if period is not None:
        return float(end_value - (end_value - start_value) * (math.cos(2 * math.pi * step / period) + 1) / 2)
    if max_steps <= 1 or step >= max_steps - 1:
        return float(end_value)
    return float(end_value - (end_value - start_value) * (math.cos(math.pi * step / (max_steps - 1)) + 1) / 2)
