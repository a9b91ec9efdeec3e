"""BYOL (Grill et al., 2020): an online network predicts a momentum teacher's projection."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pyssl.losses import NegativeCosineSimilarity
from pyssl.methods.base import StepOutput, images_of, simclr_augment_defaults, two_views
from pyssl.methods.momentum_method import MomentumMethod
from pyssl.methods.registry import register
from pyssl.methods.spec import MethodSpec
from pyssl.models import ProjectionHead


@register("byol")
class BYOL(MomentumMethod):
    """BYOL.

    The online network (``backbone`` -> ``projection_head`` -> ``prediction_head``) predicts,
    for each view, the teacher's projection of the other view; the teacher (``backbone_momentum``
    -> ``projection_head_momentum``) is the online network's exponential moving average and gets
    no gradient. Loss: :math:`\\tfrac12 (\\ell(p_0, z'_1) + \\ell(p_1, z'_0))` with
    :math:`\\ell` the negative cosine similarity (:class:`pyssl.losses.NegativeCosineSimilarity`),
    so it lies in [-1, 1] and reaches -1 when every prediction points at its target.

    The momentum follows the paper's cosine ramp from ``momentum`` (0.99 here, 0.996 in the
    paper's 1,000-epoch runs) to 1 over training; the teacher is updated (one fused EMA call for
    both of its modules) before it encodes the step's targets, as in MoCo.

    Args:
        hidden_dim, out_dim: widths of the projection and prediction MLPs (Linear-BN-ReLU-Linear;
            the paper: 4,096 and 256).
        momentum, momentum_end: the teacher's momentum schedule (see :class:`MomentumMethod`).
    """

    spec = MethodSpec(teachers=(("backbone_momentum", "backbone"), ("projection_head_momentum", "projection_head")))

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        image_size: int = 32,
        in_channels: int = 3,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        momentum: float = 0.99,
        momentum_end: float | None = 1.0,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        augment=None,
        augment_kwargs=None,
    ):
        super().__init__(
            backbone,
            image_size,
            in_channels,
            mean,
            std,
            augment,
            augment_kwargs,
            momentum=momentum,
            momentum_end=momentum_end,
        )
        self.projection_head = ProjectionHead(self.backbone.out_dim, hidden_dim, out_dim, 2, batch_norm=True)
        self.prediction_head = ProjectionHead(out_dim, hidden_dim, out_dim, 2, batch_norm=True)
        self.build_teachers()
        self.criterion = NegativeCosineSimilarity()

    def augment_defaults(self, image_size: int) -> dict:
        return simclr_augment_defaults(image_size, jitter=(0.4, 0.4, 0.2, 0.1))

    def forward(self, x: Tensor) -> Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x)))

    @torch.no_grad()
    def targets(self, x: Tensor) -> Tensor:
        self.update_teachers()
        return self.projection_head_momentum(self.backbone_momentum(x))

    def training_step(self, batch) -> StepOutput:
        v0, v1 = two_views(self.augment, images_of(batch))
        p0, p1 = self(torch.cat([v0, v1])).chunk(2)
        t0, t1 = self.targets(torch.cat([v0, v1])).chunk(2)
        loss = 0.5 * (self.criterion(p0, t1) + self.criterion(p1, t0))
        return self.output(loss)
