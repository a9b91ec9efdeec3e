"""Contrastive losses of the InfoNCE family on the fused, tiled kernel.

None of these modules materialises the (batch x batch) similarity matrix: the forward keeps
one log-sum-exp per row (and per column for CLIP), the backward recomputes similarity tiles.
Inputs are unnormalised embeddings; the L2 normalisation is part of the fused op.
"""
from __future__ import annotations

from torch import Tensor, nn

from pyssl import ops


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

    Shape:
        - z0, z1: :math:`(N, D)`, any floating dtype (fp16/bf16 accumulate in float32).
        - output: scalar.

    Example:
        >>> loss_fn = NTXentLoss(temperature=0.5)
        >>> loss = loss_fn(projector(backbone(view0)), projector(backbone(view1)))
    """

    def __init__(self, temperature: float = 0.5, check_inputs_finite: bool = False):
        super().__init__()
        self.temperature = ops.check_positive("NTXentLoss", "temperature", temperature)
        self.check_inputs_finite = check_inputs_finite

    def forward(self, z0: Tensor, z1: Tensor) -> Tensor:
        return ops.ntxent(z0, z1, self.temperature, check_inputs_finite=self.check_inputs_finite)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


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

    Shape:
        - query: :math:`(N, D)`; key: :math:`(K, D)` with :math:`K \ge N`.
        - output: scalar.
    """

    def __init__(self, temperature: float = 0.1, check_inputs_finite: bool = False):
        super().__init__()
        self.temperature = ops.check_positive("InfoNCELoss", "temperature", temperature)
        self.check_inputs_finite = check_inputs_finite

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        return ops.infonce(
            query, key, 1.0 / self.temperature, symmetric=False, check_inputs_finite=self.check_inputs_finite
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class ClipLoss(nn.Module):
    r"""Symmetric CLIP loss: the mean of the image->text and text->image cross-entropies.

    .. math::
        S_{ij} = s \cos(x_i, y_j), \qquad
        \mathcal{L} = \frac{1}{2N}\sum_{i=1}^{N}\Big[-\log\operatorname{softmax}_j(S_{ij})_{i}
        - \log\operatorname{softmax}_i(S_{ij})_{j=i}\Big]

    Same value and gradients as open_clip's ``ClipLoss`` on one process given the
    normalised features. ``logit_scale`` :math:`s` is the multiplier itself (already
    exponentiated, as open_clip passes it): a float, or a tensor that may require grad.

    Shape:
        - image_features, text_features: :math:`(N, D)`.
        - logit_scale: float or a one-element tensor.
        - output: scalar.
    """

    def __init__(self, check_inputs_finite: bool = False):
        super().__init__()
        self.check_inputs_finite = check_inputs_finite

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale) -> Tensor:
        return ops.infonce(
            image_features,
            text_features,
            logit_scale,
            symmetric=True,
            check_inputs_finite=self.check_inputs_finite,
        )
