"""SimSiam (Chen & He, 2021): BYOL without the momentum teacher; the stop-gradient alone keeps
the representation from collapsing."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pyssl.losses import NegativeCosineSimilarity
from pyssl.methods.base import Method, MethodError, StepOutput, images_of, simclr_augment_defaults, two_views
from pyssl.methods.registry import register
from pyssl.models import ProjectionHead


@register("simsiam")
class SimSiam(Method):
    """SimSiam.

    Both views go through one network: ``backbone`` -> ``projection_head`` (3-layer MLP with BN,
    BN after the last layer too) -> ``prediction_head`` (a bottleneck MLP). Each view's
    prediction regresses the other view's projection, which is detached:
    :math:`\\tfrac12 (\\ell(p_0, \\mathrm{sg}(z_1)) + \\ell(p_1, \\mathrm{sg}(z_0)))` with
    :math:`\\ell` the negative cosine similarity.

    ``std_of_outputs`` in the metrics is the paper's collapse monitor: the standard deviation of
    the normalised projections over the batch, averaged over features; about ``1/sqrt(out_dim)``
    while the representation is healthy, 0 when it has collapsed.

    Args:
        hidden_dim, out_dim: projection widths (the paper: 2,048 and 2,048).
        pred_dim: the predictor's bottleneck (default ``out_dim // 4``: the paper's 512 for 2,048).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        image_size: int = 32,
        in_channels: int = 3,
        hidden_dim: int = 2048,
        out_dim: int = 2048,
        pred_dim: int | None = None,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        augment=None,
        augment_kwargs=None,
    ):
        pred_dim = out_dim // 4 if pred_dim is None else pred_dim
        if not isinstance(pred_dim, int) or pred_dim < 1:
            raise MethodError(f"simsiam: pred_dim must be a positive int, got {pred_dim!r}")
        super().__init__(backbone, image_size, in_channels, mean, std, augment, augment_kwargs)
        self.projection_head = ProjectionHead(self.backbone.out_dim, hidden_dim, out_dim, 3, last_bn=True)
        self.prediction_head = ProjectionHead(out_dim, pred_dim, out_dim, 2, batch_norm=True)
        self.criterion = NegativeCosineSimilarity()

    def augment_defaults(self, image_size: int) -> dict:
        return simclr_augment_defaults(image_size, scale=(0.2, 1.0))

    def forward(self, x: Tensor) -> Tensor:
        return self.projection_head(self.backbone(x))

    def training_step(self, batch) -> StepOutput:
        v0, v1 = two_views(self.augment, images_of(batch))
        z0, z1 = self(torch.cat([v0, v1])).chunk(2)
        p0, p1 = self.prediction_head(torch.cat([z0, z1])).chunk(2)
        loss = 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))
        with torch.no_grad():
            spread = nn.functional.normalize(z0.float(), dim=1).std(dim=0).mean()
        return self.output(loss, std_of_outputs=spread)
