"""Context encoder: reconstruct a masked region from its context (Pathak et al., 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from pyssl.methods._pretext import MethodError, PretextMethod, as_method_error, own_encoder_only, pretext_spec
from pyssl.methods.registry import register
from pyssl.pretext.nets import ConvDecoder, ConvEncoder
from pyssl.pretext.transforms import region_masks


@register("inpainting")
class Inpainting(PretextMethod):
    """Context encoder with a masked L2 reconstruction loss and an adversarial loss.

    A region of every image (the central square of side ``mask_fraction * S`` with
    ``mask="center"``, a square at a random place with ``mask="random"``) is set to the
    data mean; an encoder-decoder reconstructs the image and the loss is

    ``rec_weight * L2 over the masked pixels + adv_weight * -log D(composite)``

    where the composite is the context with the reconstructed region pasted in, and the
    discriminator ``D`` learns to tell composites from real images (its own BCE loss, added
    to the returned loss with weight ``disc_weight``). Both players train from the single
    loss the trainer back-propagates: the generator's adversarial term goes through ``D``
    with its parameters detached, and ``D``'s term sees the composite detached, so each
    loss only updates its own player. The paper's weights are 0.999 / 0.001.

    Args:
        image_size, in_channels, mean, std: the data.
        widths: encoder channels (the decoder mirrors them); the backbone is the encoder.
        mask, mask_fraction: the dropped region.
        rec_weight, adv_weight, disc_weight: loss weights (``adv_weight=0`` turns the
            adversarial part, and the discriminator's training, off).
        backbone: only ``"small"`` (the encoder is built with ``widths``).
        hidden_dim: accepted for the CLI; unused.
    """

    spec = pretext_spec("colour_digits")

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        widths: tuple[int, ...] = (16, 32, 64),
        mask: str = "center",
        mask_fraction: float = 0.5,
        rec_weight: float = 0.999,
        adv_weight: float = 0.001,
        disc_weight: float = 1.0,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        backbone: str = "small",
        hidden_dim: int | None = None,
    ):
        own_encoder_only("inpainting", backbone)
        super().__init__(image_size, in_channels, mean, std)
        as_method_error(region_masks, 1, 8, mask, mask_fraction)  # validates mask and mask_fraction
        for name, w in (("rec_weight", rec_weight), ("adv_weight", adv_weight), ("disc_weight", disc_weight)):
            if not w >= 0:
                raise MethodError(f"inpainting: {name} must be >= 0, got {w}")
        self.mask_mode, self.mask_fraction = mask, float(mask_fraction)
        self.rec_weight, self.adv_weight, self.disc_weight = float(rec_weight), float(adv_weight), float(disc_weight)
        widths = tuple(widths)
        self.backbone = ConvEncoder(in_channels, widths)
        self.decoder = ConvDecoder(widths[-1], in_channels, widths=tuple(reversed(widths[:-1])))
        self.discriminator = nn.Sequential(ConvEncoder(in_channels, widths), nn.Linear(widths[-1], 1))

    def check_images(self, images: Tensor) -> None:
        super().check_images(images)
        need = self.backbone.downsample
        if images.shape[-1] != images.shape[-2] or images.shape[-1] % need:
            raise ValueError(
                f"inpainting: images must be square with a side that is a multiple of {need}, "
                f"got {images.shape[-2]}x{images.shape[-1]}; the minimum is {max(need, 4)}x{max(need, 4)}"
            )
        if images.shape[-1] < 4:
            raise ValueError(
                f"inpainting: images of {images.shape[-1]}x{images.shape[-1]} are too small; the minimum is 4x4"
            )

    def reconstruct(self, images: Tensor, mask: Tensor) -> Tensor:
        """The decoder's full image from the masked input (normalised units)."""
        x = self.normalize(images)
        return self.decoder(self.backbone.forward_features(x * (~mask)))

    def pretext_loss(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.normalize(images)
        n, c, s, _ = x.shape
        mask = region_masks(n, s, self.mask_mode, self.mask_fraction, device=x.device)
        m = mask.to(x.dtype)
        rec = self.decoder(self.backbone.forward_features(x * (1 - m)))
        masked_pixels = m.sum() * c
        rec_loss = ((rec - x) ** 2 * m).sum() / masked_pixels
        loss = self.rec_weight * rec_loss
        metrics = {"rec_mse": rec_loss.detach()}
        if self.adv_weight > 0:
            composite = x * (1 - m) + rec * m
            frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            fake_for_g = functional_call(self.discriminator, frozen, (composite,))
            g_adv = F.binary_cross_entropy_with_logits(fake_for_g, torch.ones_like(fake_for_g))
            real_logit = self.discriminator(x)
            fake_logit = self.discriminator(composite.detach())
            d_loss = F.binary_cross_entropy_with_logits(
                real_logit, torch.ones_like(real_logit)
            ) + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit))
            loss = loss + self.adv_weight * g_adv + self.disc_weight * d_loss
            metrics["g_adv"] = g_adv.detach()
            metrics["d_loss"] = d_loss.detach()
            metrics["d_acc"] = float(((real_logit > 0).float().mean() + (fake_logit < 0).float().mean()) / 2)
        with torch.no_grad():
            # Baseline: fill the hole with the mean colour of each image's context.
            ctx_mean = (x * (1 - m)).sum(dim=(2, 3), keepdim=True) / (1 - m).sum(dim=(2, 3), keepdim=True)
            metrics["rec_mse_context_mean"] = ((ctx_mean - x) ** 2 * m).sum() / masked_pixels
        return loss, metrics
