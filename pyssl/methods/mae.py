"""MAE (He et al., 2022): masked autoencoders; a ViT encodes a random quarter of the patches and
a light decoder predicts the pixels of the rest (the lecture's "masked generation")."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pyssl.methods.base import Method, MethodError, StepOutput, images_of, simclr_augment_defaults
from pyssl.methods.registry import register
from pyssl.methods.spec import MethodSpec
from pyssl.models import ModelError
from pyssl.models.vit import TransformerBlock, ViT, init_transformer_weights, patchify, sincos_pos_embed_2d


def masked_patch_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """The mean over masked patches (``mask`` 1) of the per-patch mean squared error; the visible
    patches (``mask`` 0) do not count. pred, target: (B, L, D); mask: (B, L)."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def normalized_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """MAE's ``norm_pix_loss`` target: each patch less its mean, over ``sqrt(var + eps)`` (the
    unbiased variance over the patch's pixels and channels, as the paper's code)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


@register("mae")
class MAE(Method):
    """Masked autoencoder.

    Each image (a random resized crop with flips, normalised; no colour augmentation) is cut into
    ``L`` patches; a random ``mask_ratio`` of them per image is dropped (the paper's argsort of
    uniform noise), and the ViT ``backbone`` encodes only the ``round((1 - mask_ratio) * L)``
    visible ones (with their position embeddings and the class token). The decoder embeds the
    encoded tokens to ``decoder_width``, puts a shared learned mask token at every dropped
    position, adds its own fixed sin-cos position embedding, runs ``decoder_depth`` transformer
    blocks and predicts every patch's pixels. The loss is the mean squared error on the masked
    patches only; with ``norm_pix_loss`` each target patch is normalised by its own mean and
    standard deviation first (the paper's default, better features).

    Metrics: ``mean_baseline`` is the loss of predicting 0 for every masked patch (its own mean
    under ``norm_pix_loss``, the data set's mean pixel otherwise): what a model that learnt nothing
    about the images scores; ``visible_mse`` the same error on the visible patches, which the loss
    leaves out.

    The backbone is evaluated downstream as any other: its class token (``ViT.forward``).

    Args:
        backbone: a ViT: ``"vit-mini"`` (a run's default), ``"vit-tiny"``, ``"vit-small"`` or a
            :class:`pyssl.models.ViT`.
        mask_ratio: the fraction of patches dropped, in (0, 1) (the paper: 0.75).
        decoder_width, decoder_depth, decoder_heads: the decoder (the paper: 512, 8, 16 for ViT-L;
            a light 128, 2, 4 here for the small encoders).
        norm_pix_loss: normalise each target patch (the paper's default).
        augment_kwargs: settings of the crop and flip (``scale``, ``p_flip``, ...) over the
            defaults (scale 0.2..1, flip 0.5, no colour jitter, grey or blur).
    """

    spec = MethodSpec(
        # AdamW, weight decay 0.05 (biases and norms: none); the paper's 1.5e-4 per 256 images is
        # 7.5e-5 per 128. The digits' rate, 2e-3, is the data set's (pyssl/data/specs.py), measured.
        train_defaults={"optimizer": "adamw", "lr": 7.5e-5, "weight_decay": 0.05, "momentum": 0.9},
        # vit-mini: a ViT sized for the CPU and the digits (pass --backbone vit-tiny on real data)
        run_defaults={"backbone": "vit-mini", "hidden_dim": None},
    )

    def __init__(
        self,
        backbone: str | nn.Module = "vit-tiny",
        image_size: int = 32,
        in_channels: int = 3,
        mask_ratio: float = 0.75,
        decoder_width: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        norm_pix_loss: bool = True,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        augment=None,
        augment_kwargs=None,
    ):
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0 < mask_ratio < 1:
            raise MethodError(f"mae: mask_ratio must lie in (0, 1), got {mask_ratio!r}")
        for name, value in (("decoder_width", decoder_width), ("decoder_depth", decoder_depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MethodError(f"mae: {name} must be a positive int, got {value!r}")
        if isinstance(backbone, str) and not backbone.startswith("vit-"):
            raise MethodError(
                f"mae: backbone must be a ViT (vit-mini, vit-tiny, vit-small or a pyssl.models.ViT), got {backbone!r}"
            )
        try:
            super().__init__(backbone, image_size, in_channels, mean, std, augment, augment_kwargs)
        except ModelError as e:
            raise MethodError(f"mae: {e}") from None
        if not isinstance(self.backbone, ViT):
            raise MethodError(
                f"mae: backbone must be a ViT (vit-mini, vit-tiny, vit-small or a pyssl.models.ViT), got "
                f"{type(self.backbone).__name__}"
            )
        vit = self.backbone
        if vit.image_size != image_size or vit.in_channels != in_channels:
            raise MethodError(
                f"mae: the ViT is built for {vit.in_channels}x{vit.image_size}x{vit.image_size} images, "
                f"the method for image_size {image_size}, in_channels {in_channels}"
            )
        self.num_patches, self.patch_size = vit.num_patches, vit.patch_size
        self.num_keep = round((1 - mask_ratio) * self.num_patches)
        if not 1 <= self.num_keep < self.num_patches:
            raise MethodError(
                f"mae: mask_ratio {mask_ratio} keeps {self.num_keep} of the {self.num_patches} patches; "
                f"at least one must be kept and one masked"
            )
        self.mask_ratio, self.norm_pix_loss = float(mask_ratio), bool(norm_pix_loss)
        try:
            blocks = [TransformerBlock(decoder_width, decoder_heads) for _ in range(decoder_depth)]
            pos = sincos_pos_embed_2d(decoder_width, vit.grid)
        except ModelError as e:
            raise MethodError(f"mae: decoder_width/decoder_heads: {e}") from None
        self.decoder_embed = nn.Linear(vit.width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.register_buffer("decoder_pos_embed", pos, persistent=False)
        self.decoder_blocks = nn.ModuleList(blocks)
        self.decoder_norm = nn.LayerNorm(decoder_width, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_width, self.patch_size**2 * in_channels)
        init_transformer_weights(nn.ModuleList([self.decoder_embed, self.decoder_blocks, self.decoder_norm]))
        init_transformer_weights(self.decoder_pred)
        nn.init.normal_(self.mask_token, std=0.02)

    def augment_defaults(self, image_size: int) -> dict:
        # MAE's augmentation: RandomResizedCrop(scale 0.2..1) and a horizontal flip only
        return {**simclr_augment_defaults(image_size, scale=(0.2, 1.0)), "p_jitter": 0.0, "p_gray": 0.0, "p_blur": 0.0}

    def random_masking(self, batch_size: int, device=None, generator: torch.Generator | None = None):
        """Per image, a random subset of the patches: ``(keep_index, restore_index, mask)``.
        ``keep_index`` (B, num_keep): the visible patches, in a random order; ``restore_index``
        (B, L): the inverse of the shuffle (visible first, then masked) the decoder undoes;
        ``mask`` (B, L): 1.0 where a patch is masked, 0.0 where it is visible."""
        noise = torch.rand(batch_size, self.num_patches, device=device, generator=generator)
        shuffle = noise.argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        mask = torch.ones(batch_size, self.num_patches, device=device)
        mask[:, : self.num_keep] = 0.0
        return shuffle[:, : self.num_keep], restore, torch.gather(mask, 1, restore)

    def decode(self, latent: Tensor, restore_index: Tensor) -> Tensor:
        """Encoded (class token + visible) tokens (B, 1 + num_keep, width) -> the predicted pixels
        of every patch (B, L, patch_size ** 2 * C), in row-major patch order."""
        x = self.decoder_embed(latent)
        b, n = x.shape[0], self.num_patches
        masked = self.mask_token.to(x.dtype).expand(b, n - self.num_keep, -1)
        tokens = torch.cat([x[:, 1:], masked], dim=1)  # shuffled order: visible, then masked
        tokens = torch.gather(tokens, 1, restore_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        tokens = tokens + self.decoder_pos_embed.to(tokens.dtype)
        h = torch.cat([x[:, :1], tokens], dim=1)
        for block in self.decoder_blocks:
            h = block(h)
        return self.decoder_pred(self.decoder_norm(h))[:, 1:]

    def target(self, x: Tensor) -> Tensor:
        """The pixels the decoder predicts, (B, L, patch_size ** 2 * C), from the normalised view."""
        patches = patchify(x.float(), self.patch_size)
        return normalized_patches(patches) if self.norm_pix_loss else patches

    def reconstruct(self, x: Tensor, masking=None):
        """``(pred, target, mask)`` of normalised images ``x``; ``masking`` (from
        :meth:`random_masking`) is drawn when not given."""
        keep, restore, mask = masking if masking is not None else self.random_masking(x.shape[0], x.device)
        pred = self.decode(self.backbone.forward_tokens(x, keep), restore)
        return pred, self.target(x), mask

    def training_step(self, batch) -> StepOutput:
        x = self.augment(images_of(batch))
        pred, target, mask = self.reconstruct(x)
        loss = masked_patch_loss(pred, target, mask)
        with torch.no_grad():
            baseline = masked_patch_loss(torch.zeros_like(target), target, mask)
            visible = masked_patch_loss(pred.detach(), target, 1.0 - mask)
        return self.output(loss, mean_baseline=baseline, visible_mse=visible)
