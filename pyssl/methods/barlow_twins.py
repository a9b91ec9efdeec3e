"""Barlow Twins (Zbontar et al., 2021) and VICReg (Bardes et al., 2022): two views through one
network, and a loss on the statistics of their projections instead of negatives."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pyssl.losses import BarlowTwinsLoss, VICRegLoss
from pyssl.methods.base import Method, StepOutput, images_of, simclr_augment_defaults, two_views
from pyssl.methods.registry import register
from pyssl.methods.spec import MethodSpec
from pyssl.models import ProjectionHead


class _RedundancyReduction(Method):
    """Both views go through ``backbone`` -> ``projection_head`` (3 layers, Linear-BN-ReLU twice,
    then Linear: the papers' expander); the loss compares the two batches of projections."""

    def __init__(self, backbone, image_size, in_channels, hidden_dim, out_dim, mean, std, augment, augment_kwargs):
        super().__init__(backbone, image_size, in_channels, mean, std, augment, augment_kwargs)
        out_dim = hidden_dim if out_dim is None else out_dim
        self.projection_head = ProjectionHead(self.backbone.out_dim, hidden_dim, out_dim, 3, batch_norm=True)

    def augment_defaults(self, image_size: int) -> dict:
        return simclr_augment_defaults(image_size, jitter=(0.4, 0.4, 0.2, 0.1))

    def forward(self, x: Tensor) -> Tensor:
        return self.projection_head(self.backbone(x))

    def training_step(self, batch) -> StepOutput:
        v0, v1 = two_views(self.augment, images_of(batch))
        z0, z1 = self(torch.cat([v0, v1])).chunk(2)
        return self.output(self.criterion(z0, z1))


@register("barlow_twins")
class BarlowTwins(_RedundancyReduction):
    """Barlow Twins: the cross-correlation of the two views' batch-normalised projections is
    pushed to the identity (:class:`pyssl.losses.BarlowTwinsLoss`), which never forms the
    ``out_dim`` x ``out_dim`` matrix when the projector is wider than the batch.

    Args:
        hidden_dim, out_dim: projector widths (the paper: 8,192 both; ``out_dim`` defaults to
            ``hidden_dim``).
        lambda_param: weight of the off-diagonal (redundancy) terms (the paper's 5e-3).
        gather_distributed: correlate over the batches of all processes (the paper's global
            batch; inert in one process).

    The loss sums ``out_dim`` squared diagonal terms, so its gradients are large: SGD wants a
    rate about 20x below the contrastive methods' (0.003 per 128 images).
    """

    spec = MethodSpec(train_defaults={"optimizer": "sgd", "lr": 3e-3, "weight_decay": 5e-4, "momentum": 0.9})

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        image_size: int = 32,
        in_channels: int = 3,
        hidden_dim: int = 8192,
        out_dim: int | None = None,
        lambda_param: float = 5e-3,
        gather_distributed: bool = True,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        augment=None,
        augment_kwargs=None,
    ):
        super().__init__(backbone, image_size, in_channels, hidden_dim, out_dim, mean, std, augment, augment_kwargs)
        self.criterion = BarlowTwinsLoss(lambda_param=lambda_param, gather_distributed=gather_distributed)


@register("vicreg")
class VICReg(_RedundancyReduction):
    """VICReg: invariance (MSE between the views' projections), variance (a hinge keeping every
    feature's standard deviation above 1) and covariance (off-diagonal covariances pushed to 0)
    terms (:class:`pyssl.losses.VICRegLoss`, Gram-matrix form for wide projectors).

    Args:
        hidden_dim, out_dim: projector widths (the paper: 8,192 both; ``out_dim`` defaults to
            ``hidden_dim``).
        lambda_param, mu_param, nu_param: weights of the invariance, variance and covariance terms
            (the paper's 25, 25, 1).
        gather_distributed: variance and covariance over the batches of all processes (inert in
            one process).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        image_size: int = 32,
        in_channels: int = 3,
        hidden_dim: int = 8192,
        out_dim: int | None = None,
        lambda_param: float = 25.0,
        mu_param: float = 25.0,
        nu_param: float = 1.0,
        gather_distributed: bool = True,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        augment=None,
        augment_kwargs=None,
    ):
        super().__init__(backbone, image_size, in_channels, hidden_dim, out_dim, mean, std, augment, augment_kwargs)
        self.criterion = VICRegLoss(
            lambda_param=lambda_param, mu_param=mu_param, nu_param=nu_param, gather_distributed=gather_distributed
        )
