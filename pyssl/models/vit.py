"""A small Vision Transformer (Dosovitskiy et al., 2021) with the hooks MAE needs.

Registered sizes, beside their defaults (``ViT(image_size, in_channels, patch_size, width, depth,
heads)`` builds any other):

=============  =====  =====  =====  ===================================================
name           width  depth  heads  what for
=============  =====  =====  =====  ===================================================
``vit-mini``   64     4      4      CPU-sized: MAE's default on the 16-px digits
``vit-tiny``   192    12     3      ViT-Ti (DeiT, timm's ``vit_tiny``): MAE's constructor default
``vit-small``  384    12     6      ViT-S
=============  =====  =====  =====  ===================================================

The patch is 4 up to 64 px (CIFAR practice; a 16-px digit is a 4 x 4 grid of patches) and 16 above
(the ImageNet ViT-*/16); the MLP is 4 x wide. On the digits (MAE, batch 128, one CPU thread, a
64 x 1 decoder) a 192-wide 6-block ViT's step took 4 x as long as vit-mini's (155 against 38 ms)
and its features did not beat its random init after 40 epochs; vit-mini's did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyssl.models.errors import ModelError
from pyssl.models.registry import register_backbone


def default_patch_size(image_size: int) -> int:
    """4 up to 64 px (a 16-px image: 4 x 4 patches), 16 above (ImageNet's ViT-*/16)."""
    return 4 if image_size <= 64 else 16


def sincos_pos_embed_2d(width: int, grid: int) -> Tensor:
    """The fixed 2-D sin-cos position embedding of MAE (float32, ``(grid * grid, width)``, patches
    in row-major order): half the channels encode the row, half the column, each as
    ``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = 10000 ** (-k / (width / 4))``."""
    if width % 4:
        raise ModelError(f"ViT: the sin-cos position embedding needs a width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def encode(p: Tensor) -> Tensor:
        angles = p.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    # MAE's order: the column (w) half first, then the row (h) half
    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, S, S) -> (B, L, patch_size ** 2 * C): the patches in row-major order (the order of
    :meth:`ViT.embed_patches`), each flattened as (row, column, channel), as in MAE."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ModelError(f"patchify: image {h}x{w} is not a multiple of the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, channels: int) -> Tensor:
    """The inverse of :func:`patchify` for square images."""
    b, n, _ = patches.shape
    g, p = int(round(n**0.5)), patch_size
    if g * g != n:
        raise ModelError(f"unpatchify: {n} patches do not make a square grid")
    x = patches.reshape(b, g, g, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, g * p, g * p)


class TransformerBlock(nn.Module):
    """A pre-norm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` (GELU MLP of
    ``mlp_ratio * width``); attention through ``F.scaled_dot_product_attention``.

    Shape: (B, N, width) -> (B, N, width).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if not isinstance(heads, int) or heads < 1 or width % heads:
            raise ModelError(f"TransformerBlock: width {width} must be divisible by heads, got heads={heads!r}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, d / heads)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


def init_transformer_weights(module: nn.Module) -> None:
    """MAE's initialisation: Xavier-uniform linear layers with zero bias, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ViT(nn.Module):
    """Vision Transformer: conv patch embedding, fixed 2-D sin-cos position embedding, a class
    token, ``depth`` pre-norm :class:`TransformerBlock` and a final LayerNorm.

    ``forward(x)`` returns the class token, ``(B, width)`` (``out_dim = width``), so kNN and the
    linear probe see it as any other backbone's features. :meth:`forward_tokens` returns the whole
    sequence and can drop patches before the blocks (MAE's encoder sees only the visible ones).

    Args:
        image_size: the (square) input side; must be a multiple of ``patch_size``.
        in_channels: image channels.
        patch_size: patch side (default :func:`default_patch_size`).
        width, depth, heads, mlp_ratio: the transformer (ViT-Ti: 192, 12, 3, 4).
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        patch_size: int | None = None,
        width: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        patch_size = default_patch_size(image_size) if patch_size is None else patch_size
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ModelError(f"ViT: patch_size must be a positive int, got {patch_size!r}")
        if not isinstance(image_size, int) or image_size < patch_size or image_size % patch_size:
            raise ModelError(
                f"ViT: image_size {image_size!r} must be a multiple of the patch size {patch_size} "
                f"(choose another image_size or patch_size)"
            )
        if not isinstance(depth, int) or depth < 1:
            raise ModelError(f"ViT: depth must be a positive int, got {depth!r}")
        self.image_size, self.in_channels, self.patch_size = image_size, in_channels, patch_size
        self.grid = image_size // patch_size
        self.num_patches = self.grid * self.grid
        self.width = self.out_dim = width
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        # fixed, so not saved: it is a function of width and grid
        self.register_buffer("pos_embed", sincos_pos_embed_2d(width, self.grid), persistent=False)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        init_transformer_weights(self)
        w = self.patch_embed.weight.data  # as a linear layer on the flattened patch (MAE)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def embed_patches(self, x: Tensor) -> Tensor:
        """Images (B, C, S, S) -> patch tokens with their position embedding, (B, L, width),
        patches in row-major order."""
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != (self.image_size,) * 2:
            raise ModelError(
                f"ViT: expected images (B, {self.in_channels}, {self.image_size}, {self.image_size}), "
                f"got {tuple(x.shape)}"
            )
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        return tokens + self.pos_embed.to(tokens.dtype)

    def forward_tokens(self, x: Tensor, keep_index: Tensor | None = None) -> Tensor:
        """The normalised output sequence ``(B, 1 + n, width)``: the class token, then the patch
        tokens. With ``keep_index`` (B, n) of patch indices (row-major, ``0 <= i < num_patches``)
        only those patches, in that order, enter the blocks (n = ``num_patches`` without it)."""
        tokens = self.embed_patches(x)
        if keep_index is not None:
            if keep_index.dim() != 2 or keep_index.shape[0] != tokens.shape[0]:
                raise ModelError(
                    f"ViT: keep_index must be (B, n) with B = {tokens.shape[0]}, got {tuple(keep_index.shape)}"
                )
            tokens = torch.gather(tokens, 1, keep_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        cls = self.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        h = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_tokens(x)[:, 0]

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, patch_size={self.patch_size}, num_patches={self.num_patches}"


def _no_stem(name: str, stem) -> None:
    if stem is not None:
        raise ModelError(f"backbone {name!r} has no stem option (got stem={stem!r})")


@register_backbone("vit-mini")
def vit_mini(in_channels=3, image_size=32, stem=None):
    _no_stem("vit-mini", stem)
    return ViT(image_size, in_channels, width=64, depth=4, heads=4)


@register_backbone("vit-tiny")
def vit_tiny(in_channels=3, image_size=32, stem=None):
    _no_stem("vit-tiny", stem)
    return ViT(image_size, in_channels, width=192, depth=12, heads=3)


@register_backbone("vit-small")
def vit_small(in_channels=3, image_size=32, stem=None):
    _no_stem("vit-small", stem)
    return ViT(image_size, in_channels, width=384, depth=12, heads=6)


__all__ = [
    "ViT",
    "TransformerBlock",
    "patchify",
    "unpatchify",
    "sincos_pos_embed_2d",
    "default_patch_size",
    "init_transformer_weights",
]
