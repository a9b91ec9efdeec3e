"""MoCo v3 (Chen, Xie & He, 2021): a momentum teacher, a predictor, and a symmetric InfoNCE loss
against the other view's in-batch keys (no queue)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pyssl.losses import InfoNCELoss
from pyssl.methods.base import StepOutput, images_of, simclr_augment_defaults, two_views
from pyssl.methods.momentum_method import MomentumMethod
from pyssl.methods.registry import register
from pyssl.methods.spec import MethodSpec
from pyssl.models import ProjectionHead


@register("mocov3")
class MoCoV3(MomentumMethod):
    """MoCo v3.

    The query network is ``backbone`` -> ``projection_head`` (3 layers, BN after the last) ->
    ``prediction_head`` (2 layers); the key network is the momentum teacher of the backbone and
    the projection head. Loss: :math:`2\\tau\\,(\\mathrm{ctr}(q_0, k_1) + \\mathrm{ctr}(q_1, k_0))`,
    ``ctr`` the fused InfoNCE (:class:`pyssl.losses.InfoNCELoss`) whose positive for query
    :math:`i` is key :math:`i` and whose negatives are the other keys of the batch (gathered
    over all processes under torch.distributed); the factor :math:`2\\tau` is the paper's.
    The teacher's momentum follows the cosine ramp from ``momentum`` to 1 (one fused EMA call per
    step). Works with any backbone, the small ViT included.

    Args:
        hidden_dim, out_dim: MLP widths (the paper: 4,096 and 256).
        temperature: :math:`\\tau` (the paper: 0.2 for ResNets, 0.2 / 0.1 for ViTs).
    """

    spec = MethodSpec(teachers=(("backbone_momentum", "backbone"), ("projection_head_momentum", "projection_head")))

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        image_size: int = 32,
        in_channels: int = 3,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        temperature: float = 0.2,
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
        self.projection_head = ProjectionHead(self.backbone.out_dim, hidden_dim, out_dim, 3, last_bn=True)
        self.prediction_head = ProjectionHead(out_dim, hidden_dim, out_dim, 2, batch_norm=True)
        self.build_teachers()
        self.temperature = temperature
        # several ranks: each scores its own queries against all keys (the same averaged gradient)
        self.criterion = InfoNCELoss(temperature, gather_distributed=True, local_loss=True)

    def augment_defaults(self, image_size: int) -> dict:
        return simclr_augment_defaults(image_size, jitter=(0.4, 0.4, 0.2, 0.1))

    def forward(self, x: Tensor) -> Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x)))

    @torch.no_grad()
    def keys(self, x: Tensor) -> Tensor:
        self.update_teachers()
        return self.projection_head_momentum(self.backbone_momentum(x))

    def training_step(self, batch) -> StepOutput:
        v0, v1 = two_views(self.augment, images_of(batch))
        q0, q1 = self(torch.cat([v0, v1])).chunk(2)
        k0, k1 = self.keys(torch.cat([v0, v1])).chunk(2)
        loss = 2 * self.temperature * (self.criterion(q0, k1) + self.criterion(q1, k0))
        return self.output(loss)
