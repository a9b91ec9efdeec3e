"""Projection and prediction heads."""

from __future__ import annotations

from torch import nn

from pyssl.models.errors import ModelError


class ProjectionHead(nn.Sequential):
    """Linear layers with BN/ReLU between them, and optionally BN (no affine) after the last.

    ``num_layers=1`` is MoCo v1's linear head; ``num_layers=2`` without BN is MoCo v2's MLP head;
    with BN it is SimCLR's (v2) head."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        num_layers: int = 2,
        batch_norm: bool = True,
        last_bn: bool = False,
    ):
        if num_layers < 1:
            raise ModelError(f"ProjectionHead: num_layers must be >= 1, got {num_layers}")
        layers, d = [], in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(d, hidden_dim, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            d = hidden_dim
        layers.append(nn.Linear(d, out_dim))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)
        self.out_dim = out_dim


def linear_head(in_dim: int, out_dim: int = 128) -> ProjectionHead:
    """MoCo v1: one linear layer."""
    return ProjectionHead(in_dim, out_dim=out_dim, num_layers=1)


def mlp_head(in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, batch_norm: bool = False) -> ProjectionHead:
    """MoCo v2 (``batch_norm=False``) / SimCLR (``batch_norm=True``): Linear-(BN)-ReLU-Linear."""
    return ProjectionHead(in_dim, hidden_dim, out_dim, 2, batch_norm)


class PredictionHead(ProjectionHead):
    """BYOL/SimSiam predictor: Linear-BN-ReLU-Linear on the projection."""

    def __init__(self, in_dim: int = 256, hidden_dim: int = 4096, out_dim: int = 256):
        super().__init__(in_dim, hidden_dim, out_dim, num_layers=2, batch_norm=True)
