"""Relative patch location: which of the 8 neighbours is the second patch (Doersch et al., 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyssl.methods._pretext import MethodError, PretextMethod, accuracy, as_method_error, make_backbone, pretext_spec
from pyssl.methods.registry import register
from pyssl.pretext.nets import mlp
from pyssl.pretext.transforms import (
    drop_colour_channels,
    extract_patches,
    grid_geometry,
    grid_origins,
    project_out_green_magenta,
)

_CHROMATIC = ("project", "drop", "none")

# Positions 0..8 of the 3x3 grid, row-major; 4 is the centre, the other 8 are the classes.
_NEIGHBOURS = (0, 1, 2, 3, 5, 6, 7, 8)


@register("relative_patch")
class RelativePatch(PretextMethod):
    """Predict the position (one of 8) of a patch relative to the centre patch.

    The image is cut into a 3x3 grid of patches with ``gap`` pixels between neighbours and
    up to ``jitter`` pixels of random shift per patch, so the task cannot be solved by
    matching edges or continuing lines across the border. Every image contributes all 8
    (centre, neighbour) pairs. One shared-weight patch encoder (the backbone) embeds both
    patches; an MLP on the concatenated features classifies the position. Images smaller
    than ``3 * (patch + gap + 2 * jitter)`` raise ``ValueError`` naming the minimum.

    Chromatic aberration is the other shortcut the paper found: colour fringes along the
    green-magenta axis grow towards the frame's edges and give away where a patch was.
    ``chromatic="project"`` (default) removes that axis from the training patches,
    ``"drop"`` keeps one random colour channel per patch (the others become faint noise),
    ``"none"`` leaves them alone. Only the pretext task sees this; the backbone is evaluated
    on unmodified images. Grey inputs (``in_channels=1``) have nothing to remove.

    Args:
        patch_size: side of a patch (default: the largest that fits the grid).
        gap, jitter: pixels between patches, and random shift per patch.
        hidden_dim: width of the MLP head (default 256).
        chromatic: ``"project"``, ``"drop"`` or ``"none"`` (see above).
        backbone, image_size, in_channels, mean, std: as :class:`~pyssl.methods.rotnet.RotNet`.
    """

    spec = pretext_spec("colour_digits")

    def __init__(
        self,
        backbone: str | nn.Module = "small",
        image_size: int = 32,
        in_channels: int = 3,
        patch_size: int | None = None,
        gap: int = 2,
        jitter: int = 1,
        hidden_dim: int | None = None,
        chromatic: str = "project",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ):
        super().__init__(image_size, in_channels, mean, std)
        if chromatic not in _CHROMATIC:
            raise MethodError(f"relative_patch: chromatic must be one of {_CHROMATIC}, got {chromatic!r}")
        self.chromatic = chromatic
        self.patch_size, self.gap, self.jitter = patch_size, gap, jitter
        patch = as_method_error(grid_geometry, image_size, patch_size, gap, jitter, task="relative_patch")
        self.backbone = make_backbone(backbone, in_channels, patch)
        self.head = mlp(2 * self.backbone.out_dim, int(hidden_dim or 256), 8)

    def check_images(self, images: Tensor) -> None:
        super().check_images(images)
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"relative_patch: expected square images, got {images.shape[-2]}x{images.shape[-1]}")
        grid_geometry(images.shape[-1], self.patch_size, self.gap, self.jitter, task="relative_patch")

    def pretext_loss(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        n, size = images.shape[0], images.shape[-1]
        patch = grid_geometry(size, self.patch_size, self.gap, self.jitter, task="relative_patch")
        origins = grid_origins(n, size, patch, self.gap, self.jitter, device=images.device)
        x = self.to_float(images)
        colour = x.shape[1] == 3
        if colour and self.chromatic == "project":
            x = project_out_green_magenta(x)
        patches = extract_patches(x, origins, patch).flatten(0, 1)  # (N * 9, C, p, p)
        if colour and self.chromatic == "drop":
            patches = drop_colour_channels(patches)
        feats = self.backbone(self.normalize(patches)).view(n, 9, -1)
        centre = feats[:, 4:5].expand(-1, 8, -1)
        neighbours = feats[:, list(_NEIGHBOURS)]
        logits = self.head(torch.cat([centre, neighbours], dim=-1).flatten(0, 1))
        labels = torch.arange(8, device=images.device).repeat(n)
        return F.cross_entropy(logits, labels), {"position_acc": accuracy(logits, labels)}
