"""Colorization: predict the ab channels of CIE Lab from L (Zhang et al., 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pyssl.methods._pretext import MethodError, PretextMethod, own_encoder_only, pretext_spec
from pyssl.methods.registry import register
from pyssl.pretext.lab import AB_RANGE, ABQuantizer, rgb_to_lab
from pyssl.pretext.nets import Backbone, ConvEncoder, DenseHead, LabChannels, normalized_lab

_LOSSES = ("classification", "regression", "both")


@register("colorization")
class Colorization(PretextMethod):
    """Predict every pixel's colour (ab) from its lightness (L).

    A conv encoder on L and a dense head predict, at the encoder's resolution (1/4 of the
    image with the default three stages, as in the paper), both a
    regression of ab (scaled by 1/110) and logits over the ``Q`` in-gamut ab bins of
    spacing ``grid`` (:class:`~pyssl.pretext.lab.ABQuantizer`). ``loss="classification"``
    uses cross-entropy against soft-encoded targets (each true ab spread over its ``soft_k``
    nearest bins with a Gaussian of width ``soft_sigma``), ``"regression"`` the L2 error,
    ``"both"`` the weighted sum. Colour predictions from the classifier are the annealed
    mean of the bin distribution at ``temperature`` (0.38 in the paper). With ``rebalance=lam``
    each pixel's cross-entropy is weighted by the paper's class-rebalancing factor of its true
    bin (:meth:`~pyssl.pretext.lab.ABQuantizer.rebalance_weights`: inverse of the smoothed
    colour frequency mixed with ``lam`` of uniform), so rare saturated colours are not drowned
    by greys; the frequencies are counted over the training batches seen so far (buffer
    ``ab_counts``, saved in checkpoints). The backbone is the encoder on L, global-average-pooled; it takes RGB
    images (grey ones give ab = 0).

    Args:
        image_size, in_channels: the data (RGB 3 channels; grey works but has no colour).
        widths: encoder channels (the decoder mirrors them).
        loss, reg_weight, cls_weight: which losses and their weights.
        rebalance: ``lam`` of the class rebalancing (0.5 in the paper), or ``None`` for none.
        grid, soft_k, soft_sigma, temperature: the ab quantisation.
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
        loss: str = "both",
        reg_weight: float = 1.0,
        cls_weight: float = 1.0,
        grid: float = 10.0,
        soft_k: int = 5,
        soft_sigma: float = 5.0,
        temperature: float = 0.38,
        rebalance: float | None = 0.5,
        backbone: str = "small",
        mean=None,
        std=None,
        hidden_dim: int | None = None,
    ):
        own_encoder_only("colorization", backbone)
        super().__init__(image_size, in_channels, mean=(0.0,) * 3, std=(1.0,) * 3)
        if loss not in _LOSSES:
            raise MethodError(f"colorization: loss must be one of {_LOSSES}, got {loss!r}")
        self.loss_kind, self.reg_weight, self.cls_weight = loss, float(reg_weight), float(cls_weight)
        self.soft_k, self.soft_sigma, self.temperature = int(soft_k), float(soft_sigma), float(temperature)
        self.quantizer = ABQuantizer(grid)
        if not (soft_k >= 1 and soft_sigma > 0 and temperature > 0):
            raise MethodError(
                f"colorization: need soft_k >= 1, soft_sigma > 0, temperature > 0; got {soft_k}, {soft_sigma}, {temperature}"
            )
        if rebalance is not None and not 0.0 < float(rebalance) <= 1.0:
            raise MethodError(f"colorization: rebalance must be in (0, 1] or None, got {rebalance!r}")
        self.rebalance = None if rebalance is None else float(rebalance)
        self.register_buffer("ab_counts", torch.zeros(self.quantizer.num_bins, dtype=torch.float64))
        widths = tuple(widths)
        self.encoder = ConvEncoder(1, widths)
        self.head = DenseHead(widths[-1], 2 + self.quantizer.num_bins, int(hidden_dim or 64))
        self.backbone = Backbone(LabChannels("L"), self.encoder, self.encoder.out_dim)

    def check_images(self, images: Tensor) -> None:
        super().check_images(images)
        size = images.shape[-1]
        need = self.encoder.downsample
        if size % need or images.shape[-2] % need:
            raise ValueError(
                f"colorization: image size {images.shape[-2]}x{size} must be a multiple of {need} "
                f"(the encoder's downsampling); the minimum is {need}x{need}"
            )

    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(ab regression (N, 2, h, w) in Lab units, bin logits (N, Q, h, w))`` at the encoder's
        resolution ``h = H / downsample``."""
        lab = normalized_lab(self.to_float(images))
        out = self.head(self.encoder.forward_features(lab[:, :1]))
        return out[:, :2] * AB_RANGE, out[:, 2:]

    def target_ab(self, x: Tensor) -> Tensor:
        """True ab, area-averaged to the prediction's resolution."""
        ab = rgb_to_lab(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)[:, 1:]
        return F.avg_pool2d(ab, self.encoder.downsample) if self.encoder.downsample > 1 else ab

    def colorize(self, images: Tensor) -> Tensor:
        """RGB images recoloured from their own L and the predicted ab (classifier's annealed mean,
        or the regression when ``loss="regression"``)."""
        from pyssl.pretext.lab import lab_to_rgb

        x = self.to_float(images)
        reg, logits = self.predict(x)
        ab = reg if self.loss_kind == "regression" else self.quantizer.decode(logits, self.temperature, dim=1)
        ab = F.interpolate(ab, size=x.shape[-2:], mode="bilinear", align_corners=False)
        lab = rgb_to_lab(x.expand(-1, 3, -1, -1))
        return lab_to_rgb(torch.cat([lab[:, :1], ab], dim=1))

    def pretext_loss(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.to_float(images)
        ab = self.target_ab(x)
        reg, logits = self.predict(x)
        reg_loss = F.mse_loss(reg / AB_RANGE, ab / AB_RANGE)
        target = self.quantizer.soft_encode(ab, self.soft_k, self.soft_sigma, dim=1)
        bins = self.quantizer.encode(ab, dim=1)
        cls_per_pixel = -(target * F.log_softmax(logits, dim=1)).sum(1)
        if self.rebalance is None:
            cls_loss = cls_per_pixel.mean()
        else:
            if self.training:
                self.ab_counts += torch.bincount(bins.flatten(), minlength=self.quantizer.num_bins).to(self.ab_counts)
            weights = self.quantizer.rebalance_weights(self.ab_counts, self.rebalance, self.soft_sigma)
            cls_loss = (weights[bins] * cls_per_pixel).mean()
        loss = {
            "regression": self.reg_weight * reg_loss,
            "classification": self.cls_weight * cls_loss,
            "both": self.reg_weight * reg_loss + self.cls_weight * cls_loss,
        }[self.loss_kind]
        with torch.no_grad():
            hit = (logits.argmax(1) == bins).float().flatten()
            per_bin = torch.zeros(self.quantizer.num_bins, device=hit.device).index_add_(0, bins.flatten(), hit)
            seen = torch.bincount(bins.flatten(), minlength=self.quantizer.num_bins)
            mean_ab = ab.mean(dim=(0, 2, 3), keepdim=True)
            metrics = {
                "bin_acc": hit.mean(),
                # Mean over the true colours present of their accuracy: what rebalancing raises.
                # (A mask-free form: indexing by seen > 0 would wait for the device.)
                "bin_acc_balanced": (per_bin / seen.clamp_min(1)).sum() / (seen > 0).sum(),
                "ab_rmse": ((reg - ab) ** 2).sum(1).mean().sqrt(),
                # The best constant colour (the batch mean): what a model that learned nothing reaches.
                "ab_rmse_constant": ((mean_ab - ab) ** 2).sum(1).mean().sqrt(),
                "cls_loss": cls_per_pixel.mean(),
            }
        return loss, metrics
