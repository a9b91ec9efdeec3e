"""Metric-learning losses: contrastive, triplet, N-pair, lifted structure, NCE over a memory bank
(InstDisc) and soft nearest neighbours.

These are plain PyTorch (no fused kernel). The losses over a labelled batch work from one
(batch x batch) distance matrix and masks of that shape, so memory grows as :math:`B^2`; the
triplet loss over all triplets never forms the :math:`B^3` triplet tensor (it sorts each
anchor's negative distances once, see :class:`TripletLoss`). Inputs of any floating dtype are
accepted: float64 is computed in float64, everything else in float32, and the loss is returned
in the input dtype.

Two rules hold for every loss here:

- NaN in, NaN out: if any input embedding holds a NaN or an infinity, the loss is NaN and so are
  the gradients of the embeddings, even where the loss's own masks (hinges at zero, pairs with
  a zero loss left out of a mean) would drop the affected terms. A diverged model therefore never
  yields a clean-looking loss, and ``torch.amp.GradScaler`` skips the step. pytorch-metric-learning
  can hide a NaN behind its non-zero filter (its ``TripletMarginLoss`` with one NaN row returns
  the mean of the other triplets; its ``ContrastiveLoss`` can too); here it cannot.
- Nothing to compare is not an error: an empty batch (``(0, D)`` embeddings) or a batch without
  a single valid pair or triplet gives 0, connected to the graph with zero gradients, as
  pytorch-metric-learning's losses do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyssl import ops

# Elements of the (rows, noise samples, dim) block of gathered memory-bank rows NCELoss holds
# at once: 16 MiB of float32, whatever the batch and the number of noise samples.
_GATHER_BUDGET = 1 << 22


# ---- argument checks ---------------------------------------------------------------------------


def _check_choice(op: str, name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        listed = " or ".join(repr(c) for c in choices)
        raise ValueError(f"{op}: {name} must be {listed}, got {value!r}")
    return value


def _check_bank_indices(op: str, name: str, indices, rows: int, device: torch.device) -> None:
    if not isinstance(indices, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(indices).__name__}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"{op}: {name} must be an integer tensor, got dtype {indices.dtype}")
    if indices.device != device:
        raise ValueError(f"{op}: {name} is on {indices.device} but features on {device}")
    low, high = torch.aminmax(indices) if indices.numel() else (0, 0)
    if not (0 <= int(low) and int(high) < rows):
        raise ValueError(f"{op}: {name} must index the memory bank's {rows} rows, got values outside [0, {rows})")


# ---- shared pieces -------------------------------------------------------------------------------


def _euclidean_distances(x: Tensor, *, squared: bool) -> Tensor:
    """(B, B) Euclidean distances between the rows of ``x``, squared or not."""
    if not squared:
        # cdist's own backward takes the subgradient 0 at distance 0 (coincident points, the
        # diagonal), where the slope of a square root is infinite.
        return torch.cdist(x, x)
    sq_norms = x.square().sum(1, keepdim=True)
    ones = torch.ones_like(sq_norms)
    # One matmul of augmented rows gives |x_i|^2 + |x_j|^2 - 2 x_i.x_j: no (B, B) broadcast
    # sum, forward or backward.
    return (torch.cat([x * -2, sq_norms, ones], 1) @ torch.cat([x, ones, sq_norms], 1).T).clamp_min(0)


def _masked_logsumexp(values: Tensor, mask: Tensor) -> Tensor:
    """Per row, the log-sum-exp of ``values`` where ``mask`` holds.

    A row whose mask is empty would be a log-sum-exp of -inf alone: -inf, with NaN in its backward
    (zeroed further down the graph, but it trips anomaly detection). Such a row takes all its
    entries instead, and every caller leaves it out of the loss.
    """
    keep = mask | ~mask.any(1, keepdim=True)
    return torch.logsumexp(values.masked_fill(~keep, float("-inf")), dim=1)


def _nan_unless_finite(loss: Tensor, *inputs: Tensor) -> Tensor:
    """``loss``, made NaN in value and gradients when any of ``inputs`` holds NaN or inf.

    Adds ``sum(x * poison)`` with ``poison`` 0 or NaN, decided on the device (no synchronisation):
    0 and a zero gradient for finite inputs, NaN for both otherwise.
    """
    for x in inputs:
        poison = torch.where(torch.isfinite(x).all(), 0.0, float("nan")).to(x.dtype)
        loss = loss + (x * poison).sum().to(loss.dtype)
    return loss


def _mean_where(values: Tensor, counted: Tensor) -> Tensor:
    """Mean of ``values`` over ``counted``; 0 (with zero gradient) when nothing is counted."""
    return torch.where(counted, values, 0.0).sum() / torch.count_nonzero(counted).clamp_min(1)


class _LabelledBatchLoss(nn.Module):
    """Base of the losses of one labelled batch: checks the inputs, casts to the accumulation
    dtype, builds the positive and negative pair masks, and returns the input dtype."""

    def __init__(self, normalize_embeddings: bool, check_inputs_finite: bool, reduction: str | None = None):
        super().__init__()
        self.normalize_embeddings = bool(normalize_embeddings)
        self.check_inputs_finite = check_inputs_finite
        if reduction is not None:
            self.reduction = _check_choice(type(self).__name__, "reduction", reduction, ("mean_nonzero", "mean"))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        op = type(self).__name__
        ops.check_embeddings("embeddings", embeddings, op=op, allow_empty=True)
        if not isinstance(labels, Tensor):
            raise TypeError(f"{op}: labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"{op}: labels must be an integer (or bool) tensor, got dtype {labels.dtype}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(
                f"{op}: labels must have shape ({embeddings.shape[0]},), one per embedding, got {tuple(labels.shape)}"
            )
        ops.check_same_device(op, embeddings=embeddings, labels=labels)
        if self.check_inputs_finite:
            ops.check_finite(op, embeddings=embeddings)
        raw = embeddings.to(ops.accumulate_dtype(embeddings.dtype))
        x = F.normalize(raw, dim=1) if self.normalize_embeddings else raw
        same_label = labels[:, None] == labels[None, :]
        not_self = ~torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
        loss = self._loss(x, same_label & not_self, ~same_label)
        return _nan_unless_finite(loss, raw).to(embeddings.dtype)

    def _loss(self, x: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        raise NotImplementedError


# ---- contrastive -------------------------------------------------------------------------------


class ContrastiveLoss(_LabelledBatchLoss):
    r"""Contrastive loss (Chopra, Hadsell & LeCun 2005; Hadsell et al. 2006) over all pairs of a
    labelled batch.

    Every ordered pair :math:`(i, j)`, :math:`i \ne j`, is positive (same label, set
    :math:`P`) or negative (set :math:`N`). With :math:`d_{ij}` the distance and
    :math:`[x]_+ = \max(x, 0)`, positives are pulled within ``pos_margin`` and negatives pushed
    beyond ``neg_margin``:

    .. math::
        \ell^+_{ij} = [d_{ij} - m_+]_+^{\,p}, \qquad \ell^-_{ij} = [m_- - d_{ij}]_+^{\,p}, \qquad
        \mathcal{L} = \operatorname{mean}_{(i,j) \in P,\ \ell^+_{ij} > 0} \ell^+_{ij}
        + \operatorname{mean}_{(i,j) \in N,\ \ell^-_{ij} > 0} \ell^-_{ij}

    with :math:`p = 2` (``squared_hinge=True``, the squared terms of Hadsell et al., without
    their factor :math:`\tfrac12`) or :math:`p = 1`. The default reduction
    (``"mean_nonzero"``) averages positives and negatives separately over the pairs with a
    non-zero loss, as pytorch-metric-learning's default reducer does (an empty set adds 0);
    ``"mean"`` is the paper's plain mean of :math:`\ell^+ + \ell^-` over all pairs.

    With ``squared_hinge=False`` this is pytorch-metric-learning's ``ContrastiveLoss`` (same
    value and gradients): ``distance="euclidean"`` matches its default ``LpDistance`` (with
    ``normalize_embeddings`` passed to it); ``distance="cosine"`` matches
    ``distance=CosineSimilarity()`` with its margins :math:`1 - m_+` and :math:`1 - m_-`.
    One exception (the module's rules): a NaN or inf embedding makes this loss NaN, where pml's
    non-zero filter can drop the NaN terms and return a clean number.

    Args:
        pos_margin: :math:`m_+ \ge 0`; positive pairs closer than this cost nothing.
        neg_margin: :math:`m_- > m_+`; negative pairs farther than this cost nothing.
        distance: ``"euclidean"`` (default) or ``"cosine"`` (:math:`d_{ij} = 1 - \cos(x_i, x_j)`,
            in :math:`[0, 2]`; embeddings are always normalised then).
        squared_hinge: square the hinge terms (default) or not.
        reduction: ``"mean_nonzero"`` (default) or ``"mean"``.
        normalize_embeddings: L2-normalise the embeddings before the Euclidean distance
            (default, as pytorch-metric-learning).
        check_inputs_finite: raise on NaN/inf embeddings (costs a device synchronisation).

    Shape:
        - embeddings: :math:`(B, D)`, any floating dtype (fp16/bf16 accumulate in float32).
        - labels: :math:`(B,)` integer class labels: equal labels make a positive pair, different
          ones a negative pair.
        - output: scalar, in the dtype of ``embeddings``.

    Example:
        >>> loss_fn = ContrastiveLoss(neg_margin=1.0)
        >>> loss = loss_fn(model(images), labels)  # every ordered pair of the batch
    """

    def __init__(
        self,
        pos_margin: float = 0.0,
        neg_margin: float = 1.0,
        *,
        distance: str = "euclidean",
        squared_hinge: bool = True,
        reduction: str = "mean_nonzero",
        normalize_embeddings: bool = True,
        check_inputs_finite: bool = False,
    ):
        super().__init__(normalize_embeddings, check_inputs_finite, reduction)
        op = "ContrastiveLoss"
        self.pos_margin = ops.check_non_negative(op, "pos_margin", pos_margin)
        self.neg_margin = ops.check_non_negative(op, "neg_margin", neg_margin)
        if self.neg_margin <= self.pos_margin:
            raise ValueError(
                f"{op}: neg_margin must be > pos_margin, got neg_margin={self.neg_margin}, pos_margin={self.pos_margin}"
            )
        self.distance = _check_choice(op, "distance", distance, ("euclidean", "cosine"))
        self.squared_hinge = bool(squared_hinge)

    def _loss(self, x: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        if self.distance == "cosine":
            unit = F.normalize(x, dim=1)
            dist = 1 - unit @ unit.T
        else:
            dist = _euclidean_distances(x, squared=False)
        pos_losses = F.relu(dist - self.pos_margin)
        neg_losses = F.relu(self.neg_margin - dist)
        if self.squared_hinge:
            pos_losses, neg_losses = pos_losses.square(), neg_losses.square()
        if self.reduction == "mean":
            return _mean_where(torch.where(positive, pos_losses, neg_losses), positive | negative)
        return _mean_where(pos_losses, positive & (pos_losses > 0)) + _mean_where(
            neg_losses, negative & (neg_losses > 0)
        )

    def extra_repr(self) -> str:
        return (
            f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, distance={self.distance!r}, "
            f"squared_hinge={self.squared_hinge}, reduction={self.reduction!r}"
        )


# ---- triplet -----------------------------------------------------------------------------------


class TripletLoss(_LabelledBatchLoss):
    r"""Triplet margin loss (Schroff et al. 2015, FaceNet; Hermans et al. 2017) over the triplets
    of a labelled batch.

    A triplet :math:`(a, p, n)` has :math:`y_p = y_a`, :math:`p \ne a` and :math:`y_n \ne y_a`;
    its loss is the hinge

    .. math::
        \ell_{apn} = [d_{ap} - d_{an} + m]_+

    with :math:`d` the Euclidean distance (``squared=True``: its square, as FaceNet).

    - ``mining="all"``: every triplet of the batch. The default reduction ``"mean_nonzero"``
      averages over the triplets with :math:`\ell_{apn} > 0` (0 if there is none), exactly as
      pytorch-metric-learning's ``TripletMarginLoss`` (``triplets_per_anchor="all"``, its
      default ``AvgNonZeroReducer``); ``"mean"`` averages over all triplets.
    - ``mining="batch_hard"`` (Hermans et al.): one triplet per anchor that has a positive and
      a negative, from its farthest positive and nearest negative,
      :math:`[\max_p d_{ap} - \min_n d_{an} + m]_+`. ``"mean_nonzero"`` matches
      pytorch-metric-learning's ``TripletMarginLoss`` fed by ``BatchHardMiner``; ``"mean"``
      (over all those anchors) is Hermans et al.'s batch-hard loss.

    ``"all"`` costs :math:`O(B^2 \log B)` time and :math:`O(B^2)` memory: the sum over the
    :math:`O(B^3)` triplets is, per anchor and positive, (number of violating negatives)
    :math:`\times (d_{ap} + m)` minus their distance sum, read from each anchor's sorted negative
    distances and their running sum.

    With the defaults (``margin=0.05``, Euclidean distance of normalised embeddings) this is
    pytorch-metric-learning's ``TripletMarginLoss()`` (same value and gradients).
    One exception (the module's rules): a NaN or inf embedding makes this loss NaN, where pml
    averages the triplets that stay finite.

    Args:
        margin: :math:`m \ge 0`.
        mining: ``"all"`` (default) or ``"batch_hard"``.
        squared: use squared Euclidean distances.
        reduction: ``"mean_nonzero"`` (default) or ``"mean"``.
        normalize_embeddings: L2-normalise the embeddings first (default, as FaceNet and
            pytorch-metric-learning).
        check_inputs_finite: raise on NaN/inf embeddings (costs a device synchronisation).

    Shape:
        - embeddings: :math:`(B, D)`, any floating dtype (fp16/bf16 accumulate in float32).
        - labels: :math:`(B,)` integer class labels; batches of P classes x K samples (Hermans et
          al.) give every anchor positives.
        - output: scalar, in the dtype of ``embeddings``.

    Example:
        >>> loss_fn = TripletLoss(margin=0.2, mining="batch_hard")
        >>> loss = loss_fn(model(images), labels)  # one triplet per anchor
    """

    def __init__(
        self,
        margin: float = 0.05,
        *,
        mining: str = "all",
        squared: bool = False,
        reduction: str = "mean_nonzero",
        normalize_embeddings: bool = True,
        check_inputs_finite: bool = False,
    ):
        super().__init__(normalize_embeddings, check_inputs_finite, reduction)
        self.margin = ops.check_non_negative("TripletLoss", "margin", margin)
        self.mining = _check_choice("TripletLoss", "mining", mining, ("all", "batch_hard"))
        self.squared = bool(squared)

    def _loss(self, x: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        dist = _euclidean_distances(x, squared=self.squared)
        if self.mining == "batch_hard":
            return self._batch_hard(dist, positive, negative)
        return self._all_triplets(dist, positive, negative)

    def _batch_hard(self, dist: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        hardest_positive = dist.masked_fill(~positive, float("-inf")).max(dim=1).values
        hardest_negative = dist.masked_fill(~negative, float("inf")).min(dim=1).values
        has_triplet = positive.any(1) & negative.any(1)
        # Anchors without a triplet have hinge 0: -inf hardest positive or +inf hardest negative.
        losses = F.relu(hardest_positive - hardest_negative + self.margin)
        counted = has_triplet & (losses > 0) if self.reduction == "mean_nonzero" else has_triplet
        return _mean_where(losses, counted)

    def _all_triplets(self, dist: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        # Non-negatives sort last as +inf and never count as violating.
        sorted_negative = dist.masked_fill(~negative, float("inf")).sort(dim=1).values
        # (a, p, n) violates the margin iff d_an < d_ap + m: per (a, p), the violating negatives
        # are a prefix of a's sorted negative distances.
        thresholds = dist + self.margin
        violating = torch.searchsorted(sorted_negative.detach(), thresholds.detach())
        violating = violating.masked_fill(~positive, 0)
        prefix_sums = sorted_negative.cumsum(dim=1)
        violating_sum = prefix_sums.gather(1, (violating - 1).clamp_min(0))
        # where, not a product: an anchor without negatives has inf prefix sums.
        per_pair = torch.where(violating > 0, violating * thresholds - violating_sum, 0.0)
        if self.reduction == "mean_nonzero":
            count = violating.sum()
        else:
            count = (torch.count_nonzero(positive, dim=1) * torch.count_nonzero(negative, dim=1)).sum()
        return per_pair.sum() / count.clamp_min(1)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mining={self.mining!r}, squared={self.squared}, reduction={self.reduction!r}"


# ---- lifted structure --------------------------------------------------------------------------


class LiftedStructureLoss(_LabelledBatchLoss):
    r"""Lifted structured embedding loss (Oh Song et al. 2016), smooth log-sum-exp form.

    For each positive pair :math:`(i, j)` (same label, :math:`i \ne j`), with :math:`N_i` the
    samples labelled differently from :math:`i` and :math:`d` the Euclidean distance:

    .. math::
        J_{ij} = \log\Big(\sum_{k \in N_i} e^{m_- - d_{ik}} + \sum_{l \in N_j} e^{m_- - d_{jl}}\Big)
        + d_{ij} - m_+, \qquad
        \mathcal{L} = \frac{1}{2|P|} \sum_{\{i,j\} \in P} [J_{ij}]_+^2

    (:math:`P` the unordered positive pairs; :math:`m_+ = 0` is the paper's loss). It is
    computed from one log-sum-exp per row, :math:`J_{ij} = \operatorname{logaddexp}(L_i, L_j) +
    d_{ij} - m_+`, in :math:`O(B^2)` memory; a batch without positive pairs or without negatives
    gives 0.

    This is pytorch-metric-learning's ``LiftedStructureLoss(neg_margin, pos_margin)`` (same
    value and gradients, with ``normalize_embeddings`` passed to its ``LpDistance``), which is the
    paper's loss. Its ``GeneralizedLiftedStructureLoss`` is a different loss (Hermans et al.'s
    per-anchor generalisation), not this one.

    Args:
        neg_margin: :math:`m_- \ge 0`, the paper's :math:`\alpha`.
        pos_margin: :math:`m_+ \ge 0`.
        normalize_embeddings: L2-normalise the embeddings first (default, as
            pytorch-metric-learning).
        check_inputs_finite: raise on NaN/inf embeddings (costs a device synchronisation).

    Shape:
        - embeddings: :math:`(B, D)`, any floating dtype (fp16/bf16 accumulate in float32).
        - labels: :math:`(B,)` integer class labels; a batch of a single class has no negatives
          and gives 0.
        - output: scalar, in the dtype of ``embeddings``.

    Example:
        >>> loss_fn = LiftedStructureLoss(neg_margin=1.0)
        >>> loss = loss_fn(model(images), labels)  # one term per positive pair
    """

    def __init__(
        self,
        neg_margin: float = 1.0,
        pos_margin: float = 0.0,
        *,
        normalize_embeddings: bool = True,
        check_inputs_finite: bool = False,
    ):
        super().__init__(normalize_embeddings, check_inputs_finite)
        self.neg_margin = ops.check_non_negative("LiftedStructureLoss", "neg_margin", neg_margin)
        self.pos_margin = ops.check_non_negative("LiftedStructureLoss", "pos_margin", pos_margin)

    def _loss(self, x: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        dist = _euclidean_distances(x, squared=False)
        row_negative_lse = _masked_logsumexp(self.neg_margin - dist, negative)
        pair_terms = torch.logaddexp(row_negative_lse[:, None], row_negative_lse[None, :]) + dist - self.pos_margin
        # With two labels in the batch every row has negatives; with one, none has.
        counted = positive & negative.any(1, keepdim=True)
        return _mean_where(F.relu(pair_terms).square() / 2, counted)

    def extra_repr(self) -> str:
        return f"neg_margin={self.neg_margin}, pos_margin={self.pos_margin}"


# ---- soft nearest neighbours ---------------------------------------------------------------------


class SoftNearestNeighborsLoss(_LabelledBatchLoss):
    r"""Soft nearest neighbour loss (Frosst, Papernot & Hinton 2019).

    With :math:`d_{ij} = \lVert x_i - x_j \rVert^2` and temperature :math:`T`:

    .. math::
        \mathcal{L} = -\frac{1}{|R|} \sum_{i \in R} \log
        \frac{\sum_{j \ne i,\ y_j = y_i} e^{-d_{ij}/T}}{\sum_{k \ne i} e^{-d_{ik}/T}}

    computed as a difference of two log-sum-exps (no underflow at small :math:`T`). :math:`R`
    is the set of rows with at least one same-label neighbour: a row alone in its class has an
    undefined log and is left out (a batch with no such row gives 0).

    pytorch-metric-learning has no loss of this name; its ``NCALoss(softmax_scale=1/T,
    distance=LpDistance(power=2, normalize_embeddings=False))`` computes the same value where no
    probability underflows (it takes the log of a softmax sum and also drops rows where that sum
    underflows to 0, which this loss keeps).

    Args:
        temperature: :math:`T > 0`.
        normalize_embeddings: L2-normalise the embeddings first (default off, as the paper).
        check_inputs_finite: raise on NaN/inf embeddings (costs a device synchronisation).

    Shape:
        - embeddings: :math:`(B, D)`, any floating dtype (fp16/bf16 accumulate in float32).
        - labels: :math:`(B,)` integer class labels; a sample alone in its class is left out.
        - output: scalar, in the dtype of ``embeddings``.

    Example:
        >>> loss_fn = SoftNearestNeighborsLoss(temperature=10.0)
        >>> loss = loss_fn(hidden_layer_activations.flatten(1), labels)
    """

    def __init__(
        self, temperature: float = 1.0, *, normalize_embeddings: bool = False, check_inputs_finite: bool = False
    ):
        super().__init__(normalize_embeddings, check_inputs_finite)
        self.temperature = ops.check_positive("SoftNearestNeighborsLoss", "temperature", temperature)

    def _loss(self, x: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        logits = _euclidean_distances(x, squared=True) / -self.temperature
        if logits.shape[0] > 1:
            # Every row but the diagonal is in the denominator: mask B entries in place rather
            # than copy the (B, B) matrix. (A single row keeps its one entry; it has no positive.)
            logits.diagonal().fill_(float("-inf"))
        row_losses = torch.logsumexp(logits, dim=1) - _masked_logsumexp(logits, positive)
        return _mean_where(row_losses, positive.any(1))

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


# ---- N-pair ------------------------------------------------------------------------------------


class NPairLoss(nn.Module):
    r"""Multi-class N-pair loss (Sohn 2016) with its L2 regulariser on the embeddings.

    :math:`N` pairs of anchors :math:`a_i` and positives :math:`p_i` from :math:`N` different
    classes; the other pairs' positives are the negatives of anchor :math:`i`:

    .. math::
        \mathcal{L} = \frac{1}{N} \sum_{i=1}^{N} -\log
        \frac{e^{a_i^\top p_i}}{\sum_{j=1}^{N} e^{a_i^\top p_j}}
        \;+\; \lambda\, \frac{1}{2N} \sum_{i=1}^{N} \big(\lVert a_i \rVert^2 + \lVert p_i \rVert^2\big)

    The embeddings are not normalised (the regulariser keeps their norm in check).

    This is pytorch-metric-learning's ``NPairsLoss(distance=DotProductSimilarity(
    normalize_embeddings=False), embedding_regularizer=LpRegularizer(power=2),
    embedding_reg_weight=l2_reg)`` called on ``cat([anchors, positives])`` with labels
    ``cat([arange(N), arange(N)])`` (same value and gradients); its default normalises the
    embeddings, where the regulariser would be a constant.

    Args:
        l2_reg: :math:`\lambda \ge 0`, the weight of the regulariser (0 turns it off).
        check_inputs_finite: raise on NaN/inf embeddings (costs a device synchronisation).

    Shape:
        - anchors, positives: :math:`(N, D)`, row :math:`i` of each from class :math:`i`; any
          floating dtype (fp16/bf16 accumulate in float32).
        - output: scalar, in the dtype of ``anchors``.

    Example:
        >>> loss_fn = NPairLoss(l2_reg=0.002)
        >>> loss = loss_fn(model(first_image_per_class), model(second_image_per_class))
    """

    def __init__(self, l2_reg: float = 0.002, *, check_inputs_finite: bool = False):
        super().__init__()
        self.l2_reg = ops.check_non_negative("NPairLoss", "l2_reg", l2_reg)
        self.check_inputs_finite = check_inputs_finite

    def forward(self, anchors: Tensor, positives: Tensor) -> Tensor:
        op = "NPairLoss"
        ops.check_embeddings("anchors", anchors, op=op, allow_empty=True)
        ops.check_embeddings("positives", positives, op=op, allow_empty=True)
        if anchors.shape != positives.shape:
            raise ValueError(
                f"{op}: anchors and positives must have the same shape, got {tuple(anchors.shape)} and {tuple(positives.shape)}"
            )
        ops.check_same_device(op, anchors=anchors, positives=positives)
        if self.check_inputs_finite:
            ops.check_finite(op, anchors=anchors, positives=positives)
        out_dtype = torch.promote_types(anchors.dtype, positives.dtype)
        a, p = anchors.to(ops.accumulate_dtype(out_dtype)), positives.to(ops.accumulate_dtype(out_dtype))
        if a.shape[0] == 0:
            # No pair: cross_entropy and mean would give the NaN of an empty mean.
            return ((a * 0).sum() + (p * 0).sum()).to(out_dtype)
        logits = a @ p.T
        loss = F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))
        if self.l2_reg:
            loss = loss + self.l2_reg * (a.square().sum(1).mean() + p.square().sum(1).mean()) / 2
        return _nan_unless_finite(loss, a, p).to(out_dtype)

    def extra_repr(self) -> str:
        return f"l2_reg={self.l2_reg}"


# ---- NCE over a memory bank ----------------------------------------------------------------------


class _BankScores(torch.autograd.Function):
    """``scores[i, k] = features[i] . bank[indices[i, k]]`` without the autograd graph saving the
    (B, K, D) block of gathered bank rows: rows are gathered in chunks, in the forward and again
    in the backward. The bank gets no gradient."""

    @staticmethod
    def _chunks(indices: Tensor, dim: int):
        rows = max(1, _GATHER_BUDGET // max(1, indices.shape[1] * dim))
        for start in range(0, indices.shape[0], rows):
            yield slice(start, start + rows)

    @staticmethod
    def forward(ctx, features: Tensor, bank: Tensor, indices: Tensor) -> Tensor:
        scores = features.new_empty(indices.shape)
        for rows in _BankScores._chunks(indices, features.shape[1]):
            gathered = bank[indices[rows]].to(features.dtype)
            scores[rows] = torch.bmm(gathered, features[rows].unsqueeze(2)).squeeze(2)
        ctx.save_for_backward(bank, indices)
        return scores

    @staticmethod
    def backward(ctx, grad_scores: Tensor):
        bank, indices = ctx.saved_tensors
        grad_features = grad_scores.new_empty(indices.shape[0], bank.shape[1])
        for rows in _BankScores._chunks(indices, bank.shape[1]):
            gathered = bank[indices[rows]].to(grad_scores.dtype)
            grad_features[rows] = torch.bmm(grad_scores[rows].unsqueeze(1), gathered).squeeze(1)
        return grad_features, None, None


class NCELoss(nn.Module):
    r"""Noise-contrastive estimation against a memory bank, as in instance discrimination
    (Wu et al. 2018, InstDisc).

    Each of :math:`n` training samples is its own class, represented by a row :math:`v_j` of a
    memory bank (stored normalised). The normalised feature :math:`f_i` of sample
    :math:`c_i` has the non-parametric softmax probability :math:`P(j \mid f_i) =
    \exp(v_j^\top f_i / \tau) / Z`; NCE replaces the softmax over all :math:`n` rows by a binary
    classification of the data sample :math:`c_i` against :math:`m` noise samples
    :math:`j_{ik}` drawn from the uniform noise distribution :math:`P_n = 1/n`:

    .. math::
        h(j, f) = \frac{P(j \mid f)}{P(j \mid f) + m P_n}
        = \sigma\!\Big(\frac{v_j^\top f}{\tau} - \log Z - \log\frac{m}{n}\Big), \qquad
        \mathcal{L} = -\frac{1}{B} \sum_{i=1}^{B} \Big[\log h(c_i, f_i)
        + \sum_{k=1}^{m} \log\big(1 - h(j_{ik}, f_i)\big)\Big]

    computed with ``logsigmoid`` (no overflow). The normalising constant :math:`Z` is passed in
    (``normalizer``) or, as in the paper, estimated once from the first batch by Monte Carlo,
    :math:`Z \approx n \cdot \operatorname{mean}_{i,k} \exp(v_{j}^\top f_i/\tau)` over the data
    and noise scores of that batch, and then kept fixed; it is the ``log_normalizer`` buffer
    (NaN until estimated), so it is saved in and restored from ``state_dict()``. Unlike the
    authors' code, no :math:`\epsilon` is added to the denominators.

    The bank is read, never written, and gets no gradient: update it after the step (InstDisc:
    :math:`v_{c_i} \leftarrow \operatorname{normalize}(\mu v_{c_i} + (1 - \mu) f_i)`, e.g.
    :math:`\mu = 0.5`). Memory stays bounded: bank rows are gathered in chunks, and the
    backward gathers them again rather than keeping them. The indices are range-checked first,
    which costs one device synchronisation per call.

    NaN in, NaN out (module docstring) covers the features and the bank rows that a call reads
    (its data and noise samples); a non-finite bank row that is not drawn does not enter the loss.
    A batch of no features gives 0 and leaves the estimate of :math:`Z` to the next batch.

    Args:
        temperature: :math:`\tau > 0`.
        num_noise: :math:`m \ge 1` noise samples per data sample.
        normalizer: :math:`Z > 0`, or ``None`` (default) to estimate it from the first batch.
        check_inputs_finite: raise on NaN/inf features or bank (costs a device synchronisation).

    Shape:
        - features: :math:`(B, D)`, unnormalised; any floating dtype (fp16/bf16 accumulate in
          float32).
        - memory_bank: :math:`(n, D)`, rows used as stored.
        - indices: :math:`(B,)` integers, the bank row of each sample (its data sample :math:`c_i`).
        - noise_indices (optional): :math:`(B, m)` integers; drawn uniformly from
          :math:`[0, n)` (with replacement) when not given.
        - output: scalar, in the dtype of ``features``.

    Example:
        >>> loss_fn = NCELoss(temperature=0.07, num_noise=4096)
        >>> features = model(images)
        >>> loss = loss_fn(features, memory_bank, sample_indices)
        >>> with torch.no_grad():
        ...     updated = 0.5 * memory_bank[sample_indices] + 0.5 * F.normalize(features, dim=1)
        ...     memory_bank[sample_indices] = F.normalize(updated, dim=1)
    """

    log_normalizer: Tensor

    def __init__(
        self,
        temperature: float = 0.07,
        num_noise: int = 4096,
        *,
        normalizer: float | None = None,
        check_inputs_finite: bool = False,
    ):
        super().__init__()
        op = "NCELoss"
        self.temperature = ops.check_positive(op, "temperature", temperature)
        if isinstance(num_noise, bool) or not isinstance(num_noise, int):
            raise TypeError(f"{op}: num_noise must be an int, got {type(num_noise).__name__}")
        if num_noise < 1:
            raise ValueError(f"{op}: num_noise must be >= 1, got {num_noise}")
        self.num_noise = num_noise
        log_z = float("nan") if normalizer is None else math.log(ops.check_positive(op, "normalizer", normalizer))
        self.register_buffer("log_normalizer", torch.tensor(log_z, dtype=torch.float64))
        self.check_inputs_finite = check_inputs_finite

    def forward(
        self, features: Tensor, memory_bank: Tensor, indices: Tensor, noise_indices: Tensor | None = None
    ) -> Tensor:
        op = "NCELoss"
        ops.check_embeddings("features", features, op=op, allow_empty=True)
        ops.check_embeddings("memory_bank", memory_bank, op=op)
        if memory_bank.shape[1] != features.shape[1]:
            raise ValueError(
                f"{op}: memory_bank must have the feature dim of features, got {tuple(memory_bank.shape)} "
                f"and {tuple(features.shape)}"
            )
        bank_rows = memory_bank.shape[0]
        ops.check_same_device(op, features=features, memory_bank=memory_bank)
        _check_bank_indices(op, "indices", indices, bank_rows, features.device)
        if indices.shape != features.shape[:1]:
            raise ValueError(f"{op}: indices must have shape ({features.shape[0]},), got {tuple(indices.shape)}")
        if noise_indices is None:
            noise_indices = torch.randint(0, bank_rows, (features.shape[0], self.num_noise), device=features.device)
        else:
            _check_bank_indices(op, "noise_indices", noise_indices, bank_rows, features.device)
            if noise_indices.shape != (features.shape[0], self.num_noise):
                raise ValueError(
                    f"{op}: noise_indices must have shape ({features.shape[0]}, num_noise={self.num_noise}), "
                    f"got {tuple(noise_indices.shape)}"
                )
        if self.check_inputs_finite:
            ops.check_finite(op, features=features, memory_bank=memory_bank)
        if features.shape[0] == 0:
            # No sample: 0, and no estimate of Z from an empty batch (it would be -inf for good).
            return (features * 0).sum()
        raw = features.to(ops.accumulate_dtype(features.dtype))
        sampled = torch.cat([indices[:, None], noise_indices], dim=1).long()
        scores = _BankScores.apply(F.normalize(raw, dim=1), memory_bank.detach(), sampled)
        loss = self.loss_from_scores(scores[:, 0], scores[:, 1:], bank_rows)
        # The bank is too large to check each step; the rows read are the scores.
        return _nan_unless_finite(loss, raw, scores).to(features.dtype)

    def loss_from_scores(self, data_scores: Tensor, noise_scores: Tensor, num_data: int) -> Tensor:
        r"""The loss from precomputed scores :math:`v^\top f` (not yet divided by :math:`\tau`).

        ``data_scores`` :math:`(B,)` are the data samples', ``noise_scores`` :math:`(B, m)` the
        noise samples' (any :math:`m \ge 1`), for a bank of ``num_data`` rows. Estimates
        :math:`Z` from them if it is not known yet.
        """
        op = "NCELoss.loss_from_scores"
        ops.check_embeddings("noise_scores", noise_scores, op=op)
        if not isinstance(data_scores, Tensor) or data_scores.shape != noise_scores.shape[:1]:
            shape = tuple(data_scores.shape) if isinstance(data_scores, Tensor) else type(data_scores).__name__
            raise ValueError(f"{op}: data_scores must be a tensor of shape ({noise_scores.shape[0]},), got {shape}")
        if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
            raise ValueError(f"{op}: num_data must be an int >= 1, got {num_data!r}")
        scores = torch.cat([data_scores[:, None], noise_scores], dim=1)
        logits = scores.to(ops.accumulate_dtype(scores.dtype)) / self.temperature
        log_z = self._log_normalizer(logits.detach(), num_data)
        # log of the odds P(j|f) / (m Pn(j)) that sample j is the data sample, not noise
        logits = logits - (log_z + math.log(noise_scores.shape[1] / num_data)).to(logits.dtype)
        data_term = F.logsigmoid(logits[:, 0])
        noise_term = F.logsigmoid(-logits[:, 1:]).sum(1)
        return -(data_term + noise_term).mean()

    def _log_normalizer(self, logits: Tensor, num_data: int) -> Tensor:
        """The stored log Z, or (first call) the Monte-Carlo estimate from these logits, stored.
        Decided on the device: no synchronisation."""
        estimate = math.log(num_data) + torch.logsumexp(logits.flatten().double(), 0) - math.log(logits.numel())
        stored = self.log_normalizer.to(logits.device)
        log_z = torch.where(torch.isnan(stored), estimate, stored)
        self.log_normalizer.copy_(log_z)
        return log_z

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, num_noise={self.num_noise}"
