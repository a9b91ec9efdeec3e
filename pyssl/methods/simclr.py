"""SimCLR (Chen et al., 2020): two augmented views, a projection head, NT-Xent."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pyssl.losses import NTXentLoss
from pyssl.methods.base import Method, StepOutput, images_of, simclr_augment_defaults, two_views
from pyssl.methods.registry import register
from pyssl.models import ProjectionHead


@register("simclr")
class SimCLR(Method):
    """SimCLR.

    Both views go through the backbone as one batch (one BN statistic over 2N images, as on one
    device in the paper), then through the MLP head (Linear-BN-ReLU-Linear, SimCLR v2), then into
    the fused NT-Xent loss, which never builds the 2N x 2N similarity matrix. Distributed, the
    loss gathers the embeddings of all ranks, so the negatives are those of the global batch.

    Args:
        backbone: a name for :func:`pyssl.models.build_backbone` or a module with ``out_dim``.
        hidden_dim, out_dim: projection head widths.
        temperature: NT-Xent temperature.
        augment: a callable ``images -> views`` (default: SimCLR's augmentation; no blur below
            64 px, as in the paper's CIFAR setting).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        image_size: int = 32,
        in_channels: int = 3,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        temperature: float = 0.5,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        augment=None,
        augment_kwargs=None,
    ):
        super().__init__(backbone, image_size, in_channels, mean, std, augment, augment_kwargs)
        self.projection_head = ProjectionHead(self.backbone.out_dim, hidden_dim, out_dim, 2, batch_norm=True)
        # Inert in a single process; under torch.distributed every rank's loss covers the global batch.
        self.criterion = NTXentLoss(temperature, gather_distributed=True)

    def augment_defaults(self, image_size: int) -> dict:
        return simclr_augment_defaults(image_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection_head(self.backbone(x))

    def training_step(self, batch) -> StepOutput:
        v0, v1 = two_views(self.augment, images_of(batch))
        z0, z1 = self(torch.cat([v0, v1])).chunk(2)
        return self.output(self.criterion(z0, z1))
