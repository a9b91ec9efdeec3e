r"""DINO's projection head (Caron et al., 2021): an MLP, L2 normalisation and a weight-normalised
layer of K prototypes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyssl.models.errors import ModelError


class DINOProjectionHead(nn.Module):
    r"""DINO's head.

    .. math::
        h = \mathrm{MLP}(x),\quad
        y_k = g_k\,\frac{v_k}{\lVert v_k \rVert} \cdot \frac{h}{\lVert h \rVert},\quad k = 1..K,

    the MLP being ``num_layers`` linear layers with GELU (and, with ``batch_norm``, BatchNorm)
    between them, ``in_dim -> hidden_dim -> ... -> bottleneck_dim``; the last layer is
    weight-normalised (direction ``v_k``, the ``prototypes``; length ``g_k``) and has no bias.
    With ``norm_last_layer`` (the paper's default) every ``g_k`` is 1 and not learnt, so the
    outputs are cosines in [-1, 1], which keeps the teacher's sharpened softmax stable.

    Args:
        in_dim: the backbone's feature width.
        hidden_dim, bottleneck_dim: the MLP's widths (the paper: 2,048 and 256).
        out_dim: K, the number of prototypes (the paper: 65,536).
        num_layers: linear layers of the MLP (>= 1; the paper: 3).
        batch_norm: BatchNorm after each hidden linear layer (the paper: none, for ViTs).
        norm_last_layer: fix the prototypes' lengths to 1.

    Shape:
        - x: (B, in_dim); ``forward(x, freeze_prototypes=False)`` -> (B, out_dim).
          ``freeze_prototypes`` passes no gradient to the last layer (the paper keeps it fixed
          in the first epoch, when the prototypes are still random and easily collapse).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        out_dim: int = 65536,
        num_layers: int = 3,
        batch_norm: bool = False,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        for name, value in (
            ("in_dim", in_dim),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
            ("out_dim", out_dim),
            ("num_layers", num_layers),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelError(f"DINOProjectionHead: {name} must be a positive int, got {value!r}")
        layers, d = [], in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(d, hidden_dim))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            d = hidden_dim
        layers.append(nn.Linear(d, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):  # the paper's initialisation
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # only the directions matter: any isotropic start will do (nn.Linear's)
        bound = 1.0 / math.sqrt(bottleneck_dim)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim).uniform_(-bound, bound))
        self.prototype_norm = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)
        self.norm_last_layer = bool(norm_last_layer)
        self.out_dim = out_dim

    def forward(self, x: Tensor, freeze_prototypes: bool = False) -> Tensor:
        h = F.normalize(self.mlp(x), dim=-1)
        v, g = self.prototypes, self.prototype_norm
        if freeze_prototypes:
            v, g = v.detach(), g.detach()
        w = F.normalize(v, dim=-1)
        if not self.norm_last_layer:
            w = w * g
        return F.linear(h, w)

    def extra_repr(self) -> str:
        k, d = self.prototypes.shape
        return f"prototypes={k}, bottleneck_dim={d}, norm_last_layer={self.norm_last_layer}"
