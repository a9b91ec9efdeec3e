"""One eager PyTorch reference per fused op: the formula written the obvious way, with the full
similarity matrix materialised. The tests compare every kernel with these (on float64 inputs),
and the benchmarks time them as "eager PyTorch" (in the inputs' dtype). They compute in the
dtype they are given and differentiate with autograd; they are what the fused ops replace, so
they cost O(N^2) memory (NT-Xent, InfoNCE, CLIP) or O(N K) (MoCo).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _ntxent_logits(z: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    u = F.normalize(z, dim=1)
    logits = (u @ u.T / temperature).fill_diagonal_(float("-inf"))
    n = z.shape[0] // 2
    return logits, torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)


def ntxent_stats(z: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """NT-Xent over ``z = cat(view0, view1)`` (2N rows; row i's positive is row i + N mod 2N, itself
    excluded): ``(loss, lse)`` with ``lse`` the log-sum-exp of each row's logits, as the kernels
    return it."""
    logits, target = _ntxent_logits(z, temperature)
    return F.cross_entropy(logits, target), torch.logsumexp(logits, dim=1)


def ntxent(z0: Tensor, z1: Tensor, temperature: float = 0.5) -> Tensor:
    """SimCLR's NT-Xent loss of two views (``pyssl.losses.NTXentLoss``)."""
    return F.cross_entropy(*_ntxent_logits(torch.cat([z0, z1]), temperature))


def _infonce_logits(query: Tensor, key: Tensor, logit_scale) -> Tensor:
    # the scale applied to the (N, d) rows, not to the (N, K) logits: one N x K tensor fewer
    return (logit_scale * F.normalize(query, dim=1)) @ F.normalize(key, dim=1).T


def infonce_stats(query: Tensor, key: Tensor, logit_scale, symmetric: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """InfoNCE (``symmetric=False``: key i is query i's positive, every other key a negative) or
    CLIP's symmetric loss: ``(loss, lse_row, lse_col)``, ``lse_col`` empty unless symmetric.
    ``logit_scale`` multiplies the cosine similarities (a number or a 0-dim tensor)."""
    logits = _infonce_logits(query, key, logit_scale)
    lse_row = torch.logsumexp(logits, dim=1)
    lse_col = torch.logsumexp(logits, dim=0) if symmetric else logits.new_empty(0)
    return _infonce_loss(logits, symmetric), lse_row, lse_col


def _infonce_loss(logits: Tensor, symmetric: bool) -> Tensor:
    target = torch.arange(logits.shape[0], device=logits.device)
    loss = F.cross_entropy(logits, target)
    return 0.5 * (loss + F.cross_entropy(logits.T, target)) if symmetric else loss


def infonce(query: Tensor, key: Tensor, logit_scale, symmetric: bool = False) -> Tensor:
    """``pyssl.losses.InfoNCELoss`` (``logit_scale = 1 / temperature``) and ``ClipLoss``
    (``symmetric=True``)."""
    return _infonce_loss(_infonce_logits(query, key, logit_scale), symmetric)


def moco(query: Tensor, key: Tensor, queue: Tensor, temperature: float = 0.2) -> Tensor:
    """MoCo's loss: logits ``[q.k, q.queue^T] / T`` (the queue rows used as stored), the
    positive in column 0 (``pyssl.losses.MoCoLoss`` before its enqueue)."""
    u, v = F.normalize(query, dim=1), F.normalize(key, dim=1)
    logits = torch.cat([(u * v).sum(1, keepdim=True), u @ queue.to(u.dtype).T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(query.shape[0], dtype=torch.long, device=query.device))


def ema(ema_tensors: list[Tensor], online: list[Tensor], momentum: float) -> list[Tensor]:
    """``momentum * ema + (1 - momentum) * online`` for every pair (``pyssl.ops.ema_update_``,
    here out of place)."""
    return [momentum * e + (1 - momentum) * o.to(e.dtype) for e, o in zip(ema_tensors, online)]


__all__ = ["ntxent", "ntxent_stats", "infonce", "infonce_stats", "moco", "ema"]
