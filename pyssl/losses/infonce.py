"""Contrastive losses of the InfoNCE family on the fused, tiled kernel.

None of these modules materialises the (batch x batch) similarity matrix: the forward keeps
one log-sum-exp per row (and per column for CLIP), the backward recomputes similarity tiles.
Inputs are unnormalised embeddings; the L2 normalisation is part of the fused op.

With ``gather_distributed=True`` in a process group of more than one rank, both inputs are
all-gathered (with gradient, :func:`pyssl.distributed.gather_with_grad`) so that every rank
computes the loss over the global batch, the other ranks' samples serving as extra negatives.
The trade-off: every rank redoes the whole loss over batch x world-size rows (cheap beside the
encoders) and in exchange gets exactly the single-process gradient once parameter gradients are
averaged over ranks, as DDP and the pyssl trainer do. Every rank must pass the same shapes.
The flag is ignored in a single process.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pyssl import distributed, ops


class NTXentLoss(nn.Module):
    r"""NT-Xent loss of SimCLR (normalised temperature-scaled cross-entropy).

    The two views are stacked into :math:`2N` rows :math:`z_k`, normalised to :math:`u_k`.
    Row :math:`i`'s positive is its other view :math:`p(i) = i \pm N`; every other row but
    itself is a negative:

    .. math::
        \mathcal{L} = \frac{1}{2N}\sum_{i=1}^{2N} -\log
        \frac{\exp(u_i^\top u_{p(i)}/\tau)}{\sum_{j \ne i} \exp(u_i^\top u_j/\tau)}

    Same value and gradients as lightly's ``NTXentLoss`` without a memory bank.

    Args:
        temperature: :math:`\tau > 0`.
        check_inputs_finite: raise on NaN/inf embeddings (costs a device synchronisation).
        gather_distributed: compute the loss over the batches of all ranks (see the module's doc).

    Shape:
        - z0, z1: :math:`(N, D)`, any floating dtype (fp16/bf16 accumulate in float32).
        - output: scalar.

    Example:
        >>> loss_fn = NTXentLoss(temperature=0.5)
        >>> loss = loss_fn(projector(backbone(view0)), projector(backbone(view1)))
    """

    def __init__(self, temperature: float = 0.5, check_inputs_finite: bool = False, gather_distributed: bool = False):
        super().__init__()
        self.temperature = ops.check_positive("NTXentLoss", "temperature", temperature)
        self.check_inputs_finite = check_inputs_finite
        self.gather_distributed = gather_distributed

    def forward(self, z0: Tensor, z1: Tensor) -> Tensor:
        if self.gather_distributed:
            z0, z1 = distributed.gather_with_grad(z0), distributed.gather_with_grad(z1)
        return ops.ntxent(z0, z1, self.temperature, check_inputs_finite=self.check_inputs_finite)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"


class InfoNCELoss(nn.Module):
    r"""Asymmetric InfoNCE with in-batch negatives (CPC; MoCo without a queue).

    .. math::
        \mathcal{L} = \frac{1}{N}\sum_{i=1}^{N} -\log
        \frac{\exp(\cos(q_i, k_i)/\tau)}{\sum_{j=1}^{K} \exp(\cos(q_i, k_j)/\tau)}

    The positive of query :math:`i` is key :math:`i`; keys beyond the :math:`N`-th
    (:math:`K > N`) are extra negatives.

    Args:
        temperature: :math:`\tau > 0`.
        check_inputs_finite: raise on NaN/inf embeddings (costs a device synchronisation).
        gather_distributed: compute the loss over the queries and keys of all ranks (see the
            module's doc); the gathered keys are ordered so that positives still come first.

    Shape:
        - query: :math:`(N, D)`; key: :math:`(K, D)` with :math:`K \ge N`.
        - output: scalar.
    """

    def __init__(self, temperature: float = 0.1, check_inputs_finite: bool = False, gather_distributed: bool = False):
        super().__init__()
        self.temperature = ops.check_positive("InfoNCELoss", "temperature", temperature)
        self.check_inputs_finite = check_inputs_finite
        self.gather_distributed = gather_distributed

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        if self.gather_distributed and distributed.is_distributed():
            query, key = _gather_queries_and_keys(query, key)
        return ops.infonce(
            query, key, 1.0 / self.temperature, symmetric=False, check_inputs_finite=self.check_inputs_finite
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"


def _gather_queries_and_keys(query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """Gathered queries and keys with each gathered query's positive at its own row: the keys
    beyond the local batch (extra negatives) go after all ranks' positives, not between them."""
    if key.dim() != 2 or query.dim() != 2 or key.shape[0] < query.shape[0]:
        return query, key  # the op raises its own shape error
    rows = query.shape[0]
    positives = distributed.gather_with_grad(key[:rows])
    if key.shape[0] > rows:
        key = torch.cat([positives, distributed.gather_with_grad(key[rows:])])
    else:
        key = positives
    return distributed.gather_with_grad(query), key


class ClipLoss(nn.Module):
    r"""Symmetric CLIP loss: the mean of the image->text and text->image cross-entropies.

    .. math::
        S_{ij} = s \cos(x_i, y_j), \qquad
        \mathcal{L} = \frac{1}{2N}\sum_{i=1}^{N}\Big[-\log\operatorname{softmax}_j(S_{ij})_{i}
        - \log\operatorname{softmax}_i(S_{ij})_{j=i}\Big]

    Same value and gradients as open_clip's ``ClipLoss`` on one process given the
    normalised features. ``logit_scale`` :math:`s` is the multiplier itself (already
    exponentiated, as open_clip passes it): a float, or a tensor that may require grad.

    Args:
        check_inputs_finite: raise on NaN/inf embeddings (costs a device synchronisation).
        gather_distributed: compute the loss over the pairs of all ranks (see the module's doc);
            a ``logit_scale`` tensor is not gathered (it is the same parameter on every rank).

    Shape:
        - image_features, text_features: :math:`(N, D)`.
        - logit_scale: float or a one-element tensor.
        - output: scalar.
    """

    def __init__(self, check_inputs_finite: bool = False, gather_distributed: bool = False):
        super().__init__()
        self.check_inputs_finite = check_inputs_finite
        self.gather_distributed = gather_distributed

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale) -> Tensor:
        if self.gather_distributed:
            image_features = distributed.gather_with_grad(image_features)
            text_features = distributed.gather_with_grad(text_features)
        return ops.infonce(
            image_features,
            text_features,
            logit_scale,
            symmetric=True,
            check_inputs_finite=self.check_inputs_finite,
        )

    def extra_repr(self) -> str:
        return f"gather_distributed={self.gather_distributed}"
