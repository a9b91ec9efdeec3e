r"""Non-contrastive losses: negative cosine similarity (BYOL, SimSiam), Barlow Twins and VICReg.

Drop-in replacements for lightly's modules of the same names: same arguments, same value and
gradients. Plain PyTorch (no fused kernel), but Barlow Twins and VICReg never form the
:math:`d \times d` cross-correlation or covariance matrix when the feature dimension :math:`d`
exceeds the number of rows :math:`N` (the papers' 8,192-wide projectors at a per-GPU batch of
a few hundred): their Frobenius terms come from :math:`N \times N` Gram matrices instead. For
:math:`A, B \in \mathbb{R}^{N \times d}`,

.. math::
    \lVert A^\top B \rVert_F^2 = \operatorname{tr}(B^\top A A^\top B)
    = \operatorname{tr}\big((A A^\top)(B B^\top)\big) = \textstyle\sum (A A^\top) \odot (B B^\top),

and the diagonal of :math:`A^\top B` is :math:`\sum_n A_{ni} B_{ni}`, an :math:`O(Nd)` sum, so
the off-diagonal sum of squares is the difference of the two. That costs :math:`O(N^2 d)` time
and :math:`O(N^2 + Nd)` memory, against :math:`O(N d^2)` and :math:`O(d^2)` for the direct
product, which is still used when :math:`d \le N` (there it is the cheaper of the two and exact
in its off-diagonal sum).

Every input dtype is accepted: float64 is computed in float64, everything else in float32
(autocast is switched off inside, so matmuls under ``torch.autocast`` stay float32 too), and the
loss is returned in the inputs' dtype, as lightly's modules return it outside autocast.

The ``*_reference`` functions are float64 transcriptions of the formulas the obvious way (the
full :math:`d \times d` matrix, a boolean off-diagonal mask) that the tests compare against.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pyssl import distributed, ops, reference

# F.batch_norm's default epsilon, which lightly's Barlow Twins normalisation runs with.
_BATCH_NORM_EPS = 1e-5


# ---- argument checks ---------------------------------------------------------------------------


def _check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor, got dtype {t.dtype}")


def _check_views(op: str, z_a, z_b, *, any_middle_dims: bool = False) -> None:
    """Two views of one batch: equal shapes, (N, d) (or (N, ..., d)), N >= 2, d >= 1."""
    for name, z in (("z_a", z_a), ("z_b", z_b)):
        _check_tensor(op, name, z)
        if any_middle_dims and z.dim() < 2:
            raise ValueError(f"{op}: {name} must have at least 2 dims (batch, ..., dim), got shape {tuple(z.shape)}")
        if not any_middle_dims and z.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D (batch, dim), got shape {tuple(z.shape)}")
    if z_a.shape != z_b.shape:
        raise ValueError(f"{op}: z_a and z_b must have the same shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    if z_a.shape[0] < 2:
        # Both losses standardise over the batch: one row has no spread to divide by.
        raise ValueError(f"{op}: z_a and z_b need a batch of at least 2 rows, got shape {tuple(z_a.shape)}")
    if z_a.shape[-1] == 0:
        raise ValueError(f"{op}: z_a and z_b have no features (shape {tuple(z_a.shape)})")
    ops.check_same_device(op, z_a=z_a, z_b=z_b)


def _check_distributed_available(op: str, gather_distributed: bool) -> None:
    # lightly's check and error type, raised at construction.
    if gather_distributed and not dist.is_available():
        raise ValueError(
            f"{op}: gather_distributed is True but torch.distributed is not available; set "
            "gather_distributed=False or install a torch build with distributed support"
        )


def _compute_dtype(*tensors: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(the dtype the loss is computed in, the dtype it is returned in)."""
    out = tensors[0].dtype
    for t in tensors[1:]:
        out = torch.promote_types(out, t.dtype)
    return ops.accumulate_dtype(out), out


def _off_diagonal(m: Tensor) -> Tensor:
    """The off-diagonal entries of the square matrices in the last two dims of ``m``, flattened.

    In the flat row-major layout the diagonal entries are ``d + 1`` apart: dropping the last one
    and viewing the rest as rows of ``d + 1`` puts each diagonal entry first in its row. No
    (d, d) mask is built, unlike boolean indexing.
    """
    d = m.shape[-1]
    flat = m.reshape(*m.shape[:-2], d * d)[..., :-1]
    return flat.reshape(*m.shape[:-2], d - 1, d + 1)[..., 1:].flatten(-2)


# ---- negative cosine similarity ----------------------------------------------------------------


class NegativeCosineSimilarity(nn.Module):
    r"""Negative cosine similarity of BYOL and SimSiam, averaged over the batch.

    .. math::
        \mathcal{L} = -\frac{1}{N} \sum_{n} \frac{x_{0,n}^\top x_{1,n}}
        {\max(\lVert x_{0,n} \rVert, \epsilon)\,\max(\lVert x_{1,n} \rVert, \epsilon)}

    with the similarity taken along ``dim`` (``torch.nn.functional.cosine_similarity``) and the
    mean over every other position. Same arguments and results as lightly's
    ``NegativeCosineSimilarity``. Gradients flow into both inputs: detach the target (the
    momentum encoder's or the stop-gradient branch's output) before the call, as BYOL and
    SimSiam do.

    Args:
        dim: the dimension the similarity is taken along (default 1, the features).
        eps: :math:`\epsilon \ge 0`, the floor of each norm.

    Shape:
        - x0, x1: broadcastable shapes, usually :math:`(N, D)`; any floating dtype.
        - output: scalar, in the inputs' (promoted) dtype.

    Example:
        >>> loss_fn = NegativeCosineSimilarity()
        >>> loss = 0.5 * (loss_fn(p0, z1.detach()) + loss_fn(p1, z0.detach()))  # SimSiam
    """

    def __init__(self, dim: int = 1, eps: float = 1e-8) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"NegativeCosineSimilarity: dim must be an int, got {type(dim).__name__}")
        self.dim = dim
        self.eps = ops.check_non_negative("NegativeCosineSimilarity", "eps", eps)

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        op = type(self).__name__
        _check_tensor(op, "x0", x0)
        _check_tensor(op, "x1", x1)
        try:
            shape = torch.broadcast_shapes(x0.shape, x1.shape)
        except RuntimeError:
            raise ValueError(
                f"{op}: x0 and x1 must have broadcastable shapes, got {tuple(x0.shape)} and {tuple(x1.shape)}"
            ) from None
        if not -len(shape) <= self.dim < len(shape):
            raise ValueError(f"{op}: dim={self.dim} is out of range for inputs of shape {tuple(shape)}")
        ops.check_same_device(op, x0=x0, x1=x1)
        compute, out = _compute_dtype(x0, x1)
        with torch.autocast(x0.device.type, enabled=False):
            loss = -F.cosine_similarity(x0.to(compute), x1.to(compute), self.dim, self.eps).mean()
        return loss.to(out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"


def negative_cosine_similarity_reference(x0: Tensor, x1: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    """float64 reference of :class:`NegativeCosineSimilarity` (:func:`pyssl.reference.negative_cosine_similarity`)."""
    return reference.negative_cosine_similarity(x0.double(), x1.double(), dim, eps)


# ---- Barlow Twins ------------------------------------------------------------------------------


def _barlow_twins(a: Tensor, b: Tensor, lambda_param: float, gram: bool | None = None) -> Tensor:
    """The loss of standardised views ``a``, ``b`` (N, d), with C = a.T @ b / N. ``gram``: take
    the N x N Gram route (None: when d > N)."""
    n, d = a.shape
    if gram is None:
        gram = d > n
    if gram:
        diag = torch.einsum("ni,ni->i", a, b) / n
        frobenius = ((a @ a.T) * (b @ b.T)).sum() / (n * n)
        off_diagonal = frobenius - diag.square().sum()
    else:
        c = (a.T @ b) / n
        diag = torch.diagonal(c)
        off_diagonal = _off_diagonal(c).square().sum()
    return (diag - 1).square().sum() + lambda_param * off_diagonal


class BarlowTwinsLoss(nn.Module):
    r"""Barlow Twins loss (Zbontar et al. 2021): the cross-correlation of two views' projections
    pulled to the identity.

    Each view is standardised per feature over the batch (mean 0; divided by
    :math:`\sqrt{\sigma^2 + 10^{-5}}` with the biased variance :math:`\sigma^2`, as
    ``F.batch_norm`` in training mode does), giving :math:`A, B \in \mathbb{R}^{N \times d}`, and

    .. math::
        C = \frac{1}{N} A^\top B, \qquad
        \mathcal{L} = \sum_i (1 - C_{ii})^2 + \lambda \sum_i \sum_{j \ne i} C_{ij}^2 .

    Same arguments, value and gradients as lightly's ``BarlowTwinsLoss``.

    For :math:`d > N` the :math:`d \times d` matrix :math:`C` is never formed:
    :math:`\sum_{ij} C_{ij}^2 = \sum (A A^\top) \odot (B B^\top) / N^2` from the two
    :math:`N \times N` Gram matrices, :math:`C_{ii} = \sum_n A_{ni} B_{ni} / N`, and the
    off-diagonal sum is their difference (see the module's doc). For :math:`d \le N`, :math:`C`
    is computed directly.

    With ``gather_distributed=True`` in a process group of more than one rank the loss is that
    of lightly's: each rank standardises its own batch and the ranks' cross-correlations are
    averaged, :math:`C = \frac{1}{W} \sum_r A_r^\top B_r / N`. That average is
    :math:`A^\top B / (WN)` for the row-wise concatenations :math:`A, B` of the ranks'
    standardised views, so those are all-gathered (with gradients: every rank needs the same
    batch size) and the loss is formed as above with :math:`WN` rows, the Gram route taken
    when :math:`d > WN`. The gradients are lightly's too: world size times the gradient of the
    one global loss, which the trainer's averaging over ranks divides back out.

    Args:
        lambda_param: :math:`\lambda`, the weight of the redundancy-reduction (off-diagonal) term.
        gather_distributed: average the cross-correlation over all ranks (see above).

    Shape:
        - z_a, z_b: :math:`(N, d)`, :math:`N \ge 2`, any floating dtype.
        - output: scalar, in the inputs' dtype.

    Example:
        >>> loss_fn = BarlowTwinsLoss(lambda_param=5e-3)
        >>> loss = loss_fn(projector(backbone(view0)), projector(backbone(view1)))  # d = 8192 is fine
    """

    def __init__(self, lambda_param: float = 5e-3, gather_distributed: bool = False) -> None:
        super().__init__()
        _check_distributed_available("BarlowTwinsLoss", gather_distributed)
        self.lambda_param = ops.check_real("BarlowTwinsLoss", "lambda_param", lambda_param)
        self.gather_distributed = gather_distributed

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        _check_views(type(self).__name__, z_a, z_b)
        compute, out = _compute_dtype(z_a, z_b)
        with torch.autocast(z_a.device.type, enabled=False):
            a = F.batch_norm(z_a.to(compute), None, None, training=True, eps=_BATCH_NORM_EPS)
            b = F.batch_norm(z_b.to(compute), None, None, training=True, eps=_BATCH_NORM_EPS)
            if self.gather_distributed and distributed.is_distributed():
                a, b = distributed.gather_with_grad(a), distributed.gather_with_grad(b)
            loss = _barlow_twins(a, b, self.lambda_param)
        return loss.to(out)

    def extra_repr(self) -> str:
        return f"lambda_param={self.lambda_param}, gather_distributed={self.gather_distributed}"


def barlow_twins_loss_reference(z_a: Tensor, z_b: Tensor, lambda_param: float = 5e-3) -> Tensor:
    """float64 reference of :class:`BarlowTwinsLoss` (one process), through the full d x d matrix
    (:func:`pyssl.reference.barlow_twins`)."""
    return reference.barlow_twins(z_a.double(), z_b.double(), lambda_param, _BATCH_NORM_EPS)


# ---- VICReg ------------------------------------------------------------------------------------


def _variance_covariance(x: Tensor, eps: float, gram: bool | None = None) -> tuple[Tensor, Tensor]:
    """VICReg's variance and covariance terms of ``x`` (N, M, d): M independent (N, d) batches,
    the terms averaged over them. ``gram``: take the N x N Gram route (None: when d > N)."""
    n, m, d = x.shape
    if gram is None:
        gram = d > n
    centred = x - x.mean(0)
    variance = centred.square().sum(0) / (n - 1)  # (M, d): the covariance's diagonal
    variance_term = F.relu(1 - torch.sqrt(variance + eps)).mean()
    if gram:
        rows = centred.transpose(0, 1)  # (M, N, d)
        frobenius = (rows @ rows.transpose(1, 2)).square().sum((1, 2)) / (n - 1) ** 2
        off_diagonal = frobenius - variance.square().sum(1)
    else:
        columns = centred.permute(1, 2, 0)  # (M, d, N)
        cov = (columns @ columns.transpose(1, 2)) / (n - 1)
        off_diagonal = _off_diagonal(cov).square().sum(1)
    return variance_term, (off_diagonal / d).mean()


class VICRegLoss(nn.Module):
    r"""VICReg loss (Bardes, Ponce & LeCun 2022): invariance, variance and covariance terms.

    For views :math:`Z_a, Z_b \in \mathbb{R}^{N \times d}`, with :math:`\bar Z` a view centred
    per feature over the batch, :math:`\operatorname{Cov}(Z) = \bar Z^\top \bar Z / (N - 1)` and
    :math:`\sigma^2_i(Z)` its diagonal (the unbiased per-feature variance):

    .. math::
        \mathcal{L} = \lambda \,\tfrac{1}{Nd} \lVert Z_a - Z_b \rVert_F^2
        + \mu \,\tfrac12 \big(v(Z_a) + v(Z_b)\big) + \nu \big(c(Z_a) + c(Z_b)\big), \\
        v(Z) = \frac{1}{d} \sum_i \max\big(0, 1 - \sqrt{\sigma_i^2(Z) + \epsilon}\big), \qquad
        c(Z) = \frac{1}{d} \sum_i \sum_{j \ne i} \operatorname{Cov}(Z)_{ij}^2 .

    Same arguments, value and gradients as lightly's ``VICRegLoss``, including its inputs of
    shape :math:`(N, \ldots, d)`: the invariance term is the mean over all elements, and the
    variance and covariance terms are taken per position of the middle dims and averaged.

    For :math:`d > N` the covariance is never formed:
    :math:`\sum_{ij} \operatorname{Cov}_{ij}^2 = \lVert \bar Z \bar Z^\top \rVert_F^2 / (N-1)^2`
    from the :math:`N \times N` Gram matrix, minus the squared variances (see the module's doc).
    For :math:`d \le N` the covariance is computed directly.

    With ``gather_distributed=True`` in a process group of more than one rank, as in lightly,
    the invariance term stays per rank and the variance and covariance terms are taken over the
    all-gathered views of all ranks (gathered with gradients; every rank needs the same batch
    size); :math:`N` is then the global batch.

    Args:
        lambda_param: :math:`\lambda`, weight of the invariance term.
        mu_param: :math:`\mu`, weight of the variance term.
        nu_param: :math:`\nu`, weight of the covariance term.
        gather_distributed: variance and covariance over the batches of all ranks (see above).
        eps: :math:`\epsilon \ge 0` under the square root of the variance.

    Shape:
        - z_a, z_b: :math:`(N, d)` or :math:`(N, \ldots, d)`, :math:`N \ge 2`, any floating dtype.
        - output: scalar, in the inputs' dtype.

    Example:
        >>> loss_fn = VICRegLoss()
        >>> loss = loss_fn(expander(backbone(view0)), expander(backbone(view1)))  # d = 8192 is fine
    """

    def __init__(
        self,
        lambda_param: float = 25.0,
        mu_param: float = 25.0,
        nu_param: float = 1.0,
        gather_distributed: bool = False,
        eps: float = 0.0001,
    ) -> None:
        super().__init__()
        _check_distributed_available("VICRegLoss", gather_distributed)
        self.lambda_param = ops.check_real("VICRegLoss", "lambda_param", lambda_param)
        self.mu_param = ops.check_real("VICRegLoss", "mu_param", mu_param)
        self.nu_param = ops.check_real("VICRegLoss", "nu_param", nu_param)
        self.gather_distributed = gather_distributed
        self.eps = ops.check_non_negative("VICRegLoss", "eps", eps)

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        _check_views(type(self).__name__, z_a, z_b, any_middle_dims=True)
        compute, out = _compute_dtype(z_a, z_b)
        with torch.autocast(z_a.device.type, enabled=False):
            a, b = z_a.to(compute), z_b.to(compute)
            invariance = F.mse_loss(a, b)
            if self.gather_distributed and distributed.is_distributed():
                a, b = distributed.gather_with_grad(a), distributed.gather_with_grad(b)
            var_a, cov_a = _variance_covariance(a.reshape(a.shape[0], -1, a.shape[-1]), self.eps)
            var_b, cov_b = _variance_covariance(b.reshape(b.shape[0], -1, b.shape[-1]), self.eps)
            loss = (
                self.lambda_param * invariance + self.mu_param * 0.5 * (var_a + var_b) + self.nu_param * (cov_a + cov_b)
            )
        return loss.to(out)

    def extra_repr(self) -> str:
        return (
            f"lambda_param={self.lambda_param}, mu_param={self.mu_param}, nu_param={self.nu_param}, "
            f"gather_distributed={self.gather_distributed}, eps={self.eps}"
        )


def vicreg_loss_reference(
    z_a: Tensor,
    z_b: Tensor,
    lambda_param: float = 25.0,
    mu_param: float = 25.0,
    nu_param: float = 1.0,
    eps: float = 1e-4,
) -> Tensor:
    """float64 reference of :class:`VICRegLoss` (one process), through the full d x d covariance
    (:func:`pyssl.reference.vicreg`)."""
    return reference.vicreg(z_a.double(), z_b.double(), lambda_param, mu_param, nu_param, eps)


__all__ = [
    "NegativeCosineSimilarity",
    "BarlowTwinsLoss",
    "VICRegLoss",
    "negative_cosine_similarity_reference",
    "barlow_twins_loss_reference",
    "vicreg_loss_reference",
]
