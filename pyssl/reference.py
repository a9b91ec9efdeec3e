"""One eager PyTorch reference per fused op and memory-bounded loss: the formula written the
obvious way, with the full similarity (or d x d, or views x batch x K) matrix materialised. The tests compare every kernel with these (on float64 inputs),
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


def negative_cosine_similarity(x0: Tensor, x1: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    """``pyssl.losses.NegativeCosineSimilarity``: the mean of -cos(x0, x1) along ``dim``."""
    x0, x1 = torch.broadcast_tensors(x0, x1)
    norms = x0.norm(dim=dim).clamp_min(eps) * x1.norm(dim=dim).clamp_min(eps)
    return -((x0 * x1).sum(dim) / norms).mean()


def barlow_twins(z_a: Tensor, z_b: Tensor, lambda_param: float = 5e-3, eps: float = 1e-5) -> Tensor:
    """``pyssl.losses.BarlowTwinsLoss`` (one process) through the full d x d cross-correlation of
    the batch-normalised views (biased variance, ``F.batch_norm``'s eps, as lightly)."""
    n, d = z_a.shape
    a = (z_a - z_a.mean(0)) / torch.sqrt(z_a.var(0, unbiased=False) + eps)
    b = (z_b - z_b.mean(0)) / torch.sqrt(z_b.var(0, unbiased=False) + eps)
    c = a.T @ b / n
    off_diagonal = ~torch.eye(d, dtype=torch.bool, device=c.device)
    return (1 - torch.diagonal(c)).square().sum() + lambda_param * c[off_diagonal].square().sum()


def vicreg(
    z_a: Tensor,
    z_b: Tensor,
    lambda_param: float = 25.0,
    mu_param: float = 25.0,
    nu_param: float = 1.0,
    eps: float = 1e-4,
) -> Tensor:
    """``pyssl.losses.VICRegLoss`` (one process; views (N, ..., d)) through the full d x d
    covariance of each view."""
    n, d = z_a.shape[0], z_a.shape[-1]
    off_diagonal = ~torch.eye(d, dtype=torch.bool, device=z_a.device)

    def variance(z):
        return torch.relu(1 - torch.sqrt(z.var(0) + eps)).mean()

    def covariance(z):
        z = z - z.mean(0)
        cov = torch.einsum("n...i,n...j->...ij", z, z) / (n - 1)  # (..., d, d)
        return (cov[..., off_diagonal].square().sum(-1) / d).mean()

    invariance = (z_a - z_b).square().mean()
    return (
        lambda_param * invariance
        + mu_param * 0.5 * (variance(z_a) + variance(z_b))
        + nu_param * (covariance(z_a) + covariance(z_b))
    )


def dino(
    teacher_out: list[Tensor], student_out: list[Tensor], center: Tensor, teacher_temp: float, student_temp: float
) -> Tensor:
    """``pyssl.losses.DINOLoss`` with every view stacked, as lightly computes it: the mean over
    the (teacher, student) view pairs of different index of the teacher-student cross-entropy."""
    t = F.softmax((torch.stack(teacher_out) - center) / teacher_temp, dim=-1)
    s = F.log_softmax(torch.stack(student_out) / student_temp, dim=-1)
    loss = -torch.einsum("tbd,sbd->ts", t, s)
    loss.fill_diagonal_(0)
    n_terms = loss.numel() - loss.diagonal().numel()
    return loss.sum() / (n_terms * t.shape[1])


def sinkhorn(scores: Tensor, iterations: int = 3, epsilon: float = 0.05) -> Tensor:
    """SwAV's Sinkhorn-Knopp codes of prototype scores ``(B, K)`` (one process), the paper's
    way: ``Q = exp(scores / epsilon)`` normalised to total mass 1, then ``iterations`` times
    every prototype's mass set to 1/K and every sample's to 1/B; returned times B, so that each
    sample's row of codes sums to 1 (``pyssl.losses.swav.sinkhorn``)."""
    q = torch.exp(scores / epsilon)
    q = q / q.sum()
    b, k = q.shape
    for _ in range(iterations):
        q = q / q.sum(0, keepdim=True) / k
        q = q / q.sum(1, keepdim=True) / b
    return q * b


def swav(
    high_resolution: list[Tensor],
    low_resolution: list[Tensor],
    queue: list[Tensor] | None = None,
    temperature: float = 0.1,
    iterations: int = 3,
    epsilon: float = 0.05,
) -> Tensor:
    """``pyssl.losses.SwaVLoss`` (one process), pair by pair: the codes of each high-resolution
    crop (from its scores, and the queue's when given) predicted by every other crop's softmax,
    each cross-entropy averaged over the batch, the mean over the pairs of each code, then over
    the codes."""
    crops = [*high_resolution, *low_resolution]
    total = 0
    for i, scores in enumerate(high_resolution):
        rows = scores.shape[0]
        with torch.no_grad():
            scores = scores if queue is None else torch.cat([scores, queue[i]])
            q = sinkhorn(scores.detach(), iterations, epsilon)[:rows]
        pairs = [-(q * F.log_softmax(z / temperature, dim=1)).sum(1).mean() for v, z in enumerate(crops) if v != i]
        total = total + sum(pairs) / len(pairs)
    return total / len(high_resolution)


__all__ = [
    "ntxent",
    "ntxent_stats",
    "infonce",
    "infonce_stats",
    "moco",
    "ema",
    "negative_cosine_similarity",
    "barlow_twins",
    "vicreg",
    "dino",
    "sinkhorn",
    "swav",
]
