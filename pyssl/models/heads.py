"""Projection and prediction heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


class SwaVPrototypes(nn.Module):
    r"""SwAV's prototypes: :math:`K` learnable vectors on the unit sphere, scoring normalised
    projections by cosine similarity, :math:`s = z C^\top` for :math:`z` (B, d) of unit rows and
    prototypes :math:`C` (K, d).

    A bias-free linear layer per set of prototypes (the paper's; lightly's has a bias), its
    weight rows put back on the sphere by :meth:`normalize`, which the method calls before each
    step (the paper's "normalize the prototypes" at the start of every iteration). For the first
    ``n_steps_frozen_prototypes`` steps the prototypes get no gradient (the paper freezes them
    for the first epoch: a random start the encoder adapts to first), so the optimiser, which
    skips parameters without a gradient, leaves them as they are, weight decay included.

    Args:
        input_dim: d, the projection's width.
        n_prototypes: K, or a list of K's for several sets of prototypes (then ``forward``
            returns one score matrix per set, as lightly's).
        n_steps_frozen_prototypes: the steps without gradient (0: never frozen).

    Shape:
        - x: :math:`(B, d)`, rows normalised by the caller.
        - output: :math:`(B, K)`, or a list of them for a list of K's.
    """

    def __init__(self, input_dim: int = 128, n_prototypes: int | list[int] = 3000, n_steps_frozen_prototypes: int = 0):
        super().__init__()
        counts = list(n_prototypes) if isinstance(n_prototypes, (list, tuple)) else [n_prototypes]
        if not counts or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in counts):
            raise ModelError(
                f"SwaVPrototypes: n_prototypes must be a positive int or a list of them, got {n_prototypes!r}"
            )
        if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
            raise ModelError(f"SwaVPrototypes: input_dim must be a positive int, got {input_dim!r}")
        if (
            isinstance(n_steps_frozen_prototypes, bool)
            or not isinstance(n_steps_frozen_prototypes, int)
            or n_steps_frozen_prototypes < 0
        ):
            raise ModelError(
                f"SwaVPrototypes: n_steps_frozen_prototypes must be an int >= 0, got {n_steps_frozen_prototypes!r}"
            )
        self.n_prototypes = counts
        self._single = not isinstance(n_prototypes, (list, tuple))
        self.heads = nn.ModuleList([nn.Linear(input_dim, k, bias=False) for k in counts])
        self.n_steps_frozen_prototypes = n_steps_frozen_prototypes

    def forward(self, x: Tensor, step: int | None = None) -> Tensor | list[Tensor]:
        """The scores of ``x``; ``step`` (the training step, from 0) decides whether the
        prototypes are still frozen, and must be given when they ever are."""
        if self.n_steps_frozen_prototypes > 0:
            if step is None:
                raise ValueError(
                    "SwaVPrototypes: n_steps_frozen_prototypes > 0 needs the training step: forward(x, step)"
                )
            self.requires_grad_(step >= self.n_steps_frozen_prototypes)
        scores = [head(x) for head in self.heads]
        return scores[0] if self._single else scores

    @torch.no_grad()
    def normalize(self) -> None:
        """Puts every prototype back on the unit sphere (in place)."""
        for head in self.heads:
            head.weight.copy_(F.normalize(head.weight, dim=1))
