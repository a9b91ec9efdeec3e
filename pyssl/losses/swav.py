r"""SwAV's swapped-prediction loss (Caron et al., 2020) and its Sinkhorn-Knopp codes.

For crops :math:`c = 1..C` of one batch of :math:`B` images, the first :math:`H` at high
resolution, each with prototype scores :math:`z_c \in \mathbb{R}^{B \times K}` (the cosine
similarities of its normalised projections with :math:`K` normalised prototypes), the codes
:math:`q_i` of every high-resolution crop come from :func:`sinkhorn` (no gradient), and

.. math::
    \mathcal{L} = \frac{1}{H} \sum_{i=1}^{H} \frac{1}{C - 1} \sum_{c \ne i}
    -\frac{1}{B} \sum_{b} q_{i,b} \cdot \log \operatorname{softmax}(z_{c,b} / \tau).

Grouped by the predicting crop instead, crop :math:`c` is scored against
:math:`W_c = \sum_{i \le H, i \ne c} q_i` once, so each crop costs one log-softmax however many
codes it predicts (the pair-by-pair form costs one per pair).

Sinkhorn-Knopp (the paper's Algorithm 1 and appendix A.1) finds the codes :math:`Q` closest to
:math:`\exp(z / \epsilon)` whose prototypes get equal mass over the batch: starting from
:math:`Q = \exp(z / \epsilon) / \sum \exp(z / \epsilon)`, each iteration scales every
prototype's column to mass :math:`1/K` and every sample's row to :math:`1/B`; the codes are
:math:`B Q`, each sample's row a distribution over the prototypes, the prototypes' columns
summing to about :math:`B / K` (exactly in the limit of many iterations). With a queue, the
queue's scores join the batch for Sinkhorn (more rows to spread the prototypes over) and only
the batch's codes are kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pyssl import distributed, ops, reference


def _all_reduce(t: Tensor, gather: bool, op: str = "sum") -> Tensor:
    """``t`` summed (or maximised) over the ranks in place when ``gather``; ``t`` otherwise."""
    if gather:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def sinkhorn(scores: Tensor, iterations: int = 3, epsilon: float = 0.05, gather_distributed: bool = False) -> Tensor:
    r"""SwAV's codes: Sinkhorn-Knopp on ``exp(scores / epsilon)`` (see the module's doc).

    Runs on ``scores``' device without gradient, in float64 for float64 scores and float32 for
    every other dtype (``exp(1 / 0.05)`` alone is beyond float16's range). The largest score is
    subtracted before the exponential: it cancels in the first normalisation, and spares float32
    an overflow at large ``scores / epsilon``. A prototype (or sample) whose every entry
    underflows to 0 keeps codes of 0 rather than 0 / 0.

    With ``gather_distributed`` in a process group of more than one rank, the scores of all
    ranks form one batch: the maximum, the total and the prototypes' sums are all-reduced
    (:math:`K + 2` numbers per iteration's worth, never the scores), each rank's rows stay on it,
    and :math:`B` is the global batch (every rank must pass the same number of rows, as lightly
    assumes).

    Args:
        scores: :math:`(B, K)` prototype scores, any floating dtype.
        iterations: Sinkhorn-Knopp iterations (the paper's 3); 0 returns the normalised
            exponential times :math:`B`.
        epsilon: the entropic regularisation (the paper's 0.05).
        gather_distributed: one batch over all ranks (see above).

    Returns:
        :math:`(B, K)` codes in float32 (float64 for float64 ``scores``); for ``iterations >= 1``
        each row sums to 1.
    """
    gather = gather_distributed and distributed.is_distributed()
    x = scores.detach().to(ops.accumulate_dtype(scores.dtype)) / epsilon
    peak = _all_reduce(x.max(), gather, "max") if x.numel() else 0.0
    q = torch.exp(x - peak)
    q /= _all_reduce(q.sum(), gather).clamp_min(torch.finfo(q.dtype).tiny)
    batch = q.shape[0] * (distributed.world_size() if gather else 1)
    if iterations == 0:
        return q * batch
    tiny = torch.finfo(q.dtype).tiny
    for _ in range(iterations):
        # A common factor of all entries cancels at the next normalisation: the paper's 1/K and
        # 1/B (and the final times B) only rescale, so the rows are normalised straight to 1.
        q /= _all_reduce(q.sum(0, keepdim=True), gather).clamp_min(tiny)
        q /= q.sum(1, keepdim=True).clamp_min(tiny)
    return q


def _check_crops(op: str, name: str, crops, *, at_least: int = 0) -> list[Tensor]:
    if isinstance(crops, Tensor) or not isinstance(crops, Sequence):
        raise TypeError(f"{op}: {name} must be a list of (batch, prototypes) tensors, got {type(crops).__name__}")
    crops = list(crops)
    if len(crops) < at_least:
        raise ValueError(f"{op}: {name} must hold at least {at_least} tensor(s), got {len(crops)}")
    for i, z in enumerate(crops):
        if not isinstance(z, Tensor):
            raise TypeError(f"{op}: {name}[{i}] must be a torch.Tensor, got {type(z).__name__}")
        if not z.is_floating_point():
            raise TypeError(f"{op}: {name}[{i}] must be a floating tensor, got dtype {z.dtype}")
        if z.dim() != 2:
            raise ValueError(f"{op}: {name}[{i}] must be 2-D (batch, prototypes), got shape {tuple(z.shape)}")
    return crops


class SwaVLoss(nn.Module):
    r"""SwAV's swapped-prediction loss over multi-crop prototype scores (see the module's doc).

    Same arguments, values and gradients as lightly's ``SwaVLoss``; the loss is a 0-dim tensor
    (lightly's has shape (1,)). The codes come from :func:`sinkhorn` in float32 (float64 for
    float64 input) under ``no_grad``; the cross-entropies are computed in float32 too (autocast
    off inside), and the loss is returned in the inputs' dtype.

    Args:
        temperature: :math:`\tau` of the predicting softmax (the paper's 0.1).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (the paper's 3).
        sinkhorn_epsilon: :math:`\epsilon`, Sinkhorn's entropic regularisation (the paper's 0.05).
        sinkhorn_gather_distributed: the codes over the batches of all ranks (each rank keeps its
            own rows; :func:`sinkhorn`); inert outside a process group of more than one rank.

    Shape:
        - high_resolution_outputs: a list of :math:`H \ge 1` tensors :math:`(B, K)`, the scores of
          the high-resolution crops (the crops that get codes).
        - low_resolution_outputs: a list of tensors :math:`(B, K)` (may be empty); at least two
          crops in all.
        - queue_outputs: None, or a list of :math:`H` tensors :math:`(Q, K)`: the scores of the
          stored projections of earlier batches, one queue per high-resolution crop (no gradient).
        - output: scalar, in the inputs' (promoted) dtype.

    Example:
        >>> loss_fn = SwaVLoss()
        >>> high = [prototypes(F.normalize(head(backbone(v)), dim=1)) for v in (view0, view1)]
        >>> low = [prototypes(F.normalize(head(backbone(v)), dim=1)) for v in small_views]
        >>> loss = loss_fn(high, low)
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        op = "SwaVLoss"
        if not isinstance(sinkhorn_gather_distributed, bool):
            raise TypeError(
                f"{op}: sinkhorn_gather_distributed must be True or False, got {sinkhorn_gather_distributed!r}"
            )
        if sinkhorn_gather_distributed and not dist.is_available():
            # lightly's check and error type, raised at construction.
            raise ValueError(
                f"{op}: sinkhorn_gather_distributed is True but torch.distributed is not available; set "
                "sinkhorn_gather_distributed=False or install a torch build with distributed support"
            )
        if isinstance(sinkhorn_iterations, bool) or not isinstance(sinkhorn_iterations, int):
            raise TypeError(f"{op}: sinkhorn_iterations must be an int, got {type(sinkhorn_iterations).__name__}")
        if sinkhorn_iterations < 0:
            raise ValueError(f"{op}: sinkhorn_iterations must be >= 0, got {sinkhorn_iterations}")
        self.temperature = ops.check_positive(op, "temperature", temperature)
        self.sinkhorn_iterations = sinkhorn_iterations
        self.sinkhorn_epsilon = ops.check_positive(op, "sinkhorn_epsilon", sinkhorn_epsilon)
        self.sinkhorn_gather_distributed = sinkhorn_gather_distributed

    def forward(
        self,
        high_resolution_outputs: list[Tensor],
        low_resolution_outputs: list[Tensor],
        queue_outputs: list[Tensor] | None = None,
    ) -> Tensor:
        op = type(self).__name__
        high = _check_crops(op, "high_resolution_outputs", high_resolution_outputs, at_least=1)
        low = _check_crops(op, "low_resolution_outputs", low_resolution_outputs)
        crops = [*high, *low]
        if len(crops) < 2:
            raise ValueError(
                f"{op}: needs at least two crops in all (one predicts the other's codes), got {len(crops)}"
            )
        shape = high[0].shape
        for name, views in (("high_resolution_outputs", high), ("low_resolution_outputs", low)):
            for i, z in enumerate(views):
                if z.shape != shape:
                    raise ValueError(
                        f"{op}: {name}[{i}] has shape {tuple(z.shape)}, high_resolution_outputs[0] "
                        f"{tuple(shape)}: every crop needs the scores of the same batch and prototypes"
                    )
        if shape[0] == 0:
            # lightly's answer would be the NaN of an empty mean
            raise ValueError(f"{op}: high_resolution_outputs hold an empty batch (shape {tuple(shape)})")
        if shape[1] == 0:
            raise ValueError(f"{op}: high_resolution_outputs have no prototypes (shape {tuple(shape)})")
        queue = None
        if queue_outputs is not None:
            queue = _check_crops(op, "queue_outputs", queue_outputs)
            if len(queue) != len(high):
                raise ValueError(
                    f"{op}: queue_outputs must hold one tensor per high-resolution crop ({len(high)}), got {len(queue)}"
                )
            for i, z in enumerate(queue):
                if z.shape[1] != shape[1]:
                    raise ValueError(
                        f"{op}: queue_outputs[{i}] has {z.shape[1]} prototypes, high_resolution_outputs {shape[1]}"
                    )
        everything = [*crops, *(queue or [])]
        ops.check_same_device(op, **{f"crop{i}": z for i, z in enumerate(everything)})
        out = everything[0].dtype
        for z in everything[1:]:
            out = torch.promote_types(out, z.dtype)
        compute = ops.accumulate_dtype(out)

        rows = shape[0]
        with torch.autocast(high[0].device.type, enabled=False):
            codes = []
            for i, z in enumerate(high):
                scores = z.detach()
                if queue is not None:
                    scores = torch.cat([scores.to(compute), queue[i].detach().to(compute)])
                q = sinkhorn(scores, self.sinkhorn_iterations, self.sinkhorn_epsilon, self.sinkhorn_gather_distributed)
                codes.append(q[:rows].to(compute))
            all_codes = sum(codes[1:], codes[0])
            loss = 0.0
            for c, z in enumerate(crops):
                if c < len(high):  # a crop does not predict its own codes
                    others = [q for i, q in enumerate(codes) if i != c]
                    if not others:
                        continue
                    weights = sum(others[1:], others[0])
                else:
                    weights = all_codes
                log_p = F.log_softmax(z.to(compute) / self.temperature, dim=1)
                loss = loss - (weights * log_p).sum()
            loss = loss / (rows * len(high) * (len(crops) - 1))
        return loss.to(out)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, sinkhorn_iterations={self.sinkhorn_iterations}, "
            f"sinkhorn_epsilon={self.sinkhorn_epsilon}, "
            f"sinkhorn_gather_distributed={self.sinkhorn_gather_distributed}"
        )


def swav_loss_reference(
    high_resolution_outputs: list[Tensor],
    low_resolution_outputs: list[Tensor],
    queue_outputs: list[Tensor] | None = None,
    temperature: float = 0.1,
    sinkhorn_iterations: int = 3,
    sinkhorn_epsilon: float = 0.05,
) -> Tensor:
    """float64 reference of :class:`SwaVLoss` (one process), pair by pair with the paper's
    Sinkhorn (:func:`pyssl.reference.swav`)."""
    return reference.swav(
        [z.double() for z in high_resolution_outputs],
        [z.double() for z in low_resolution_outputs],
        None if queue_outputs is None else [z.double() for z in queue_outputs],
        temperature,
        sinkhorn_iterations,
        sinkhorn_epsilon,
    )


__all__ = ["SwaVLoss", "sinkhorn", "swav_loss_reference"]
