"""Split-brain autoencoder: L -> ab and ab -> L, features concatenated (Zhang et al., 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pyssl.methods._pretext import MethodError, PretextMethod, own_encoder_only, pretext_spec
from pyssl.methods.registry import register
from pyssl.pretext.lab import AB_RANGE, ABQuantizer, rgb_to_lab
from pyssl.pretext.nets import Backbone, ConcatBackbone, ConvEncoder, DenseHead, LabChannels, normalized_lab

_LOSSES = ("classification", "regression")


@register("split_brain")
class SplitBrain(PretextMethod):
    """Two disjoint sub-networks, each predicting one part of the Lab image from the other.

    Sub-network 1 sees L and predicts ab; sub-network 2 sees ab and predicts L. With
    ``loss="classification"`` (the paper's better choice) ab is classified into the
    in-gamut bins of spacing ``grid`` and L into ``l_bins`` uniform bins of [0, 100], with
    cross-entropy; with ``"regression"`` both are L2 regressions. Predictions are made at
    the encoders' resolution (1/4 of the image by default) against area-averaged targets. The backbone concatenates
    the two encoders' pooled features (each of width ``widths[-1]``), so the
    representation sees the whole image although neither half saw it in training.

    Args:
        image_size, in_channels: the data (RGB).
        widths: channels of each sub-network's encoder.
        loss, grid, l_bins: the prediction targets.
        backbone: only ``"small"``: the method builds its own encoders on Lab channels.
        mean, std: accepted for the CLI and ignored (the Lab conversion needs raw [0, 1] RGB).
        hidden_dim: width of the dense prediction head (default 64).
    """

    spec = pretext_spec("colour_digits")

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        widths: tuple[int, ...] = (16, 32, 64),
        loss: str = "classification",
        grid: float = 10.0,
        l_bins: int = 50,
        backbone: str = "small",
        mean=None,
        std=None,
        hidden_dim: int | None = None,
    ):
        own_encoder_only("split_brain", backbone)
        super().__init__(image_size, in_channels, mean=(0.0,) * 3, std=(1.0,) * 3)
        if loss not in _LOSSES:
            raise MethodError(f"split_brain: loss must be one of {_LOSSES}, got {loss!r}")
        if l_bins < 2:
            raise MethodError(f"split_brain: l_bins must be >= 2, got {l_bins}")
        self.loss_kind, self.l_bins = loss, int(l_bins)
        self.quantizer = ABQuantizer(grid)
        widths = tuple(widths)
        cls = loss == "classification"
        self.encoder_l = ConvEncoder(1, widths)
        self.head_l = DenseHead(widths[-1], self.quantizer.num_bins if cls else 2, int(hidden_dim or 64))
        self.encoder_ab = ConvEncoder(2, widths)
        self.head_ab = DenseHead(widths[-1], self.l_bins if cls else 1, int(hidden_dim or 64))
        self.backbone = ConcatBackbone(
            Backbone(LabChannels("L"), self.encoder_l, self.encoder_l.out_dim),
            Backbone(LabChannels("ab"), self.encoder_ab, self.encoder_ab.out_dim),
        )

    def check_images(self, images: Tensor) -> None:
        super().check_images(images)
        need = self.encoder_l.downsample
        if images.shape[-1] % need or images.shape[-2] % need:
            raise ValueError(
                f"split_brain: image size {images.shape[-2]}x{images.shape[-1]} must be a multiple of "
                f"{need} (the encoders' downsampling); the minimum is {need}x{need}"
            )

    def pretext_loss(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.to_float(images)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        nlab = normalized_lab(x)
        out_ab = self.head_l(self.encoder_l.forward_features(nlab[:, :1]))  # L -> ab
        out_l = self.head_ab(self.encoder_ab.forward_features(nlab[:, 1:]))  # ab -> L
        # Targets area-averaged to the predictions' resolution (1/downsample of the image).
        lab = F.avg_pool2d(rgb_to_lab(x), self.encoder_l.downsample)
        nlab = F.avg_pool2d(nlab, self.encoder_l.downsample)
        ab_bins = self.quantizer.encode(lab[:, 1:], dim=1)
        l_bins = (lab[:, 0] / 100.0 * self.l_bins).long().clamp(0, self.l_bins - 1)
        if self.loss_kind == "classification":
            loss_ab = F.cross_entropy(out_ab, ab_bins)
            loss_l = F.cross_entropy(out_l, l_bins)
            with torch.no_grad():
                m = {
                    "ab_bin_acc": (out_ab.argmax(1) == ab_bins).float().mean(),
                    "l_bin_acc": (out_l.argmax(1) == l_bins).float().mean(),
                }
        else:
            loss_ab = F.mse_loss(out_ab, lab[:, 1:] / AB_RANGE)
            loss_l = F.mse_loss(out_l, nlab[:, :1])
            m = {}
        with torch.no_grad():
            # What a model that learned nothing reaches: always the most frequent bin of the batch.
            m["ab_bin_acc_constant"] = torch.bincount(ab_bins.flatten()).max() / ab_bins.numel()
            m["l_bin_acc_constant"] = torch.bincount(l_bins.flatten()).max() / l_bins.numel()
            m["loss_ab"], m["loss_l"] = loss_ab.detach(), loss_l.detach()
        return loss_ab + loss_l, m
