"""Jigsaw puzzles: recover which permutation shuffled 3x3 tiles (Noroozi & Favaro, 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyssl.methods._pretext import PretextMethod, accuracy, as_method_error, make_backbone, pretext_spec
from pyssl.methods.registry import register
from pyssl.pretext.nets import mlp
from pyssl.pretext.transforms import extract_patches, grid_geometry, grid_origins, maximal_hamming_permutations


def standardize(x: Tensor) -> Tensor:
    """Every image (or tile) of ``(N, C, H, W)`` to zero mean and unit variance over all its values."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / (x.std(dim=(1, 2, 3), keepdim=True) + 1e-2)


@register("jigsaw")
class Jigsaw(PretextMethod):
    """Shuffle 3x3 tiles by one of ``num_permutations`` permutations; predict its index.

    The permutation set is chosen greedily for maximal Hamming distance
    (:func:`~pyssl.pretext.transforms.maximal_hamming_permutations`). Tiles are separated
    by ``gap`` pixels with ``jitter`` pixels of random shift, and each tile is standardised
    on its own (zero mean, unit variance), so that edge continuity and low-level statistics
    do not give the answer away. A shared tile encoder (the backbone) embeds the 9 tiles; an
    MLP on their concatenation (in shuffled order) predicts the permutation. Images smaller
    than ``3 * (patch + gap + 2 * jitter)`` raise ``ValueError`` naming the minimum.

    Args:
        num_permutations: size P of the permutation set (e.g. 100).
        patch_size, gap, jitter, backbone, ...: as :class:`~pyssl.methods.relative_patch.RelativePatch`.
        hidden_dim: width of the MLP head (default 512).
        seed: seed of the permutation set.
    """

    spec = pretext_spec("colour_digits")

    def __init__(
        self,
        backbone: str | nn.Module = "small",
        image_size: int = 32,
        in_channels: int = 3,
        num_permutations: int = 100,
        patch_size: int | None = None,
        gap: int = 2,
        jitter: int = 1,
        hidden_dim: int | None = None,
        seed: int = 0,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ):
        super().__init__(image_size, in_channels, mean, std)
        self.patch_size, self.gap, self.jitter = patch_size, gap, jitter
        patch = as_method_error(grid_geometry, image_size, patch_size, gap, jitter, task="jigsaw")
        perms = as_method_error(maximal_hamming_permutations, int(num_permutations), 9, int(seed))
        self.register_buffer("permutations", perms, persistent=False)
        self.backbone = make_backbone(backbone, in_channels, patch)
        self.head = mlp(9 * self.backbone.out_dim, int(hidden_dim or 512), int(num_permutations))

    def normalize(self, images: Tensor) -> Tensor:
        """Each image standardised on its own, as the tiles are in training, so the backbone
        sees the same statistics downstream (its BatchNorm statistics come from the tiles)."""
        return standardize(super().normalize(images))

    def check_images(self, images: Tensor) -> None:
        super().check_images(images)
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"jigsaw: expected square images, got {images.shape[-2]}x{images.shape[-1]}")
        grid_geometry(images.shape[-1], self.patch_size, self.gap, self.jitter, task="jigsaw")

    def pretext_loss(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        n, size = images.shape[0], images.shape[-1]
        patch = grid_geometry(size, self.patch_size, self.gap, self.jitter, task="jigsaw")
        labels = torch.randint(0, self.permutations.shape[0], (n,), device=images.device)
        # The tile at shuffled position i comes from grid cell perm[i]: permute the origins.
        origins = grid_origins(n, size, patch, self.gap, self.jitter, device=images.device)
        order = self.permutations[labels]  # (N, 9)
        origins = torch.gather(origins, 1, order.unsqueeze(-1).expand(-1, -1, 2))
        tiles = standardize(extract_patches(super().normalize(images), origins, patch).flatten(0, 1))
        logits = self.head(self.backbone(tiles).view(n, -1))
        return F.cross_entropy(logits, labels), {"permutation_acc": accuracy(logits, labels)}
