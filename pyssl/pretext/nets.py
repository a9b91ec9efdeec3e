"""Small networks shared by the pretext methods: a conv encoder, a decoder, input adapters.

Sized for 8x8..64x64 images on a CPU: a handful of 3x3 conv + BatchNorm + ReLU stages.
Encoders return pooled ``(N, D)`` features (``feature_dim``) or, with ``pool=False``, the
last feature map, which decoders and dense heads use.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# ConvEncoder lives with the backbones (it is the "small" one); it is still importable from here.
from pyssl.models.backbones import ConvEncoder as ConvEncoder
from pyssl.models.backbones import conv_bn_relu
from pyssl.models.staged import StagedEncoder as StagedEncoder
from pyssl.pretext.lab import rgb_to_lab


class ConvDecoder(nn.Module):
    """Upsampling stages that mirror :class:`ConvEncoder` back to full resolution."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        widths: tuple[int, ...] = (64, 32),
        final_act: nn.Module | None = None,
    ):
        super().__init__()
        layers, cin = [], in_channels
        for w in widths:
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), conv_bn_relu(cin, w)]
            cin = w
        layers.append(nn.Conv2d(cin, out_channels, 3, padding=1))
        if final_act is not None:
            layers.append(final_act)
        self.net = nn.Sequential(*layers)

    def forward(self, f: Tensor) -> Tensor:
        return self.net(f)


class DenseHead(nn.Module):
    """Per-pixel prediction at the encoder's resolution: 3x3 conv-BN-ReLU then a 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(conv_bn_relu(in_channels, hidden), nn.Conv2d(hidden, out_channels, 1))

    def forward(self, f: Tensor) -> Tensor:
        return self.net(f)


def mlp(din: int, dhidden: int, dout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(din, dhidden), nn.BatchNorm1d(dhidden), nn.ReLU(inplace=True), nn.Linear(dhidden, dout)
    )


def to_float_images(x: Tensor) -> Tensor:
    """uint8 0..255 -> float 0..1; float images pass through."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a Tensor of images, got {type(x).__name__}")
    if x.dim() == 3:  # (N, H, W) grey
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        return x.to(torch.float32) / 255.0
    return x


def to_rgb(x: Tensor) -> Tensor:
    """Float images in [0, 1] with 1 or 3 channels -> 3 channels (grey is repeated)."""
    x = to_float_images(x)
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 image channels, got {x.shape[1]}")
    return x


def normalized_lab(x: Tensor) -> Tensor:
    """Images -> Lab scaled to about [-1, 1]: L/50 - 1, a/110, b/110."""
    lab = rgb_to_lab(to_rgb(x))
    scale = lab.new_tensor([1 / 50.0, 1 / 110.0, 1 / 110.0]).view(1, 3, 1, 1)
    shift = lab.new_tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    return lab * scale - shift


class LabChannels(nn.Module):
    """Input adapter: images (uint8 or float [0, 1], grey or RGB) -> selected normalised Lab channels.

    ``channels="L"`` gives lightness only, ``"ab"`` the two colour channels, ``"Lab"`` all three.
    """

    _SLICES = {"L": slice(0, 1), "ab": slice(1, 3), "Lab": slice(0, 3)}

    def __init__(self, channels: str = "L"):
        super().__init__()
        if channels not in self._SLICES:
            raise ValueError(f"channels must be one of {sorted(self._SLICES)}, got {channels!r}")
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        return normalized_lab(x)[:, self._SLICES[self.channels]]

    def extra_repr(self) -> str:
        return f"channels={self.channels!r}"


class FloatImages(nn.Module):
    """Input adapter: uint8 or float [0, 1] images -> ``channels`` channels centred at 0 (x - 0.5).

    Grey input is repeated to 3 channels and RGB input is reduced to its luma for 1 channel,
    so a method built for either kind of data runs on both.
    """

    def __init__(self, channels: int = 3):
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        x = to_float_images(x)
        if x.shape[1] != self.channels:
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            elif x.shape[1] == 3:
                x = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
            else:
                raise ValueError(f"expected 1 or 3 image channels, got {x.shape[1]}")
        return x - 0.5

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class Backbone(nn.Module):
    """``adapter`` then ``encoder``: what evaluation calls on raw images. Exposes ``feature_dim``."""

    def __init__(self, adapter: nn.Module, encoder: nn.Module, feature_dim: int):
        super().__init__()
        self.adapter = adapter
        self.encoder = encoder
        self.feature_dim = self.out_dim = feature_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(self.adapter(x))


class FirstFrame(nn.Module):
    """Input adapter for videos stored as ``(N, T * 3, H, W)`` images: keep the first frame."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :3] if x.dim() == 4 and x.shape[1] > 3 and x.shape[1] % 3 == 0 else x


class ConcatBackbone(nn.Module):
    """Features of several backbones on the same images, concatenated (split-brain)."""

    def __init__(self, *backbones: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList(backbones)
        self.feature_dim = self.out_dim = sum(b.feature_dim for b in backbones)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([b(x) for b in self.parts], dim=1)
