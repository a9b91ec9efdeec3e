"""RotNet: predict which of four rotations was applied (Gidaris et al., 2018)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pyssl.methods._pretext import PretextMethod, accuracy, make_backbone, pretext_spec
from pyssl.methods.registry import register
from pyssl.pretext.nets import mlp
from pyssl.pretext.transforms import rotate_all4


@register("rotnet")
class RotNet(PretextMethod):
    """4-way rotation prediction on all four rotations of every image.

    Each batch of ``N`` images becomes ``4N`` (0, 90, 180, 270 degrees) in one on-device
    gather (:func:`~pyssl.pretext.transforms.rotate_all4`); a linear head on the pooled
    backbone features classifies the rotation with cross-entropy.

    Args:
        backbone: ``"small"`` (the pretext conv encoder), a name for
            :func:`pyssl.models.build_backbone`, or a module with ``out_dim``.
        image_size, in_channels, mean, std: the input (see :class:`PretextMethod`).
        hidden_dim: ``None`` for a linear rotation head, else the width of an MLP head.
    """

    spec = pretext_spec("digits")

    def __init__(
        self,
        backbone: str | nn.Module = "small",
        image_size: int = 16,
        in_channels: int = 3,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        hidden_dim: int | None = None,
    ):
        super().__init__(image_size, in_channels, mean, std)
        self.backbone = make_backbone(backbone, in_channels, image_size)
        d = self.backbone.out_dim
        self.head = nn.Linear(d, 4) if hidden_dim is None else mlp(d, int(hidden_dim), 4)

    def check_images(self, images: Tensor) -> None:
        super().check_images(images)
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(
                f"rotnet: rotation by 90 degrees needs square images, got {images.shape[-2]}x{images.shape[-1]}"
            )

    def pretext_loss(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        rotated, labels = rotate_all4(self.normalize(images))
        logits = self.head(self.backbone(rotated))
        return F.cross_entropy(logits, labels), {"rotation_acc": accuracy(logits, labels)}
