"""The registry of backbones: ``@register_backbone("name")`` on a factory, ``build_backbone("name")``.

A factory takes ``in_channels``, ``image_size`` and ``stem`` (None: the one that suits the image
size) and returns a module with an ``out_dim`` attribute (feature width).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from pyssl.models.errors import ModelError

BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable:
    """Decorator of a backbone factory: ``build_backbone(name, ...)`` calls it."""

    def deco(factory):
        if name in BACKBONES:
            raise ModelError(f"backbone {name!r} is already registered")
        BACKBONES[name] = factory
        return factory

    return deco


class _ExternalBackbone(nn.Module):
    """A torchvision/timm classifier with its classification layer removed."""

    def __init__(self, model: nn.Module, out_dim: int):
        super().__init__()
        self.model, self.out_dim = model, out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).flatten(1)


def build_backbone(name: str, in_channels: int = 3, image_size: int = 32, stem: str | None = None) -> nn.Module:
    """A backbone by name: one of :data:`BACKBONES`, ``tv:NAME`` (torchvision) or ``timm:NAME``.
    The result has an ``out_dim`` attribute (feature width)."""
    if name in BACKBONES:
        return BACKBONES[name](in_channels=in_channels, image_size=image_size, stem=stem)
    lib, _, model_name = name.partition(":")
    if lib == "tv":
        try:
            import torchvision
        except ImportError:
            raise ModelError(f"backbone {name!r} needs torchvision (pip install torchvision)") from None
        try:
            model = torchvision.models.get_model(model_name, weights=None)
        except Exception as e:
            raise ModelError(f"torchvision has no model {model_name!r}: {e}") from None
        for attr in ("fc", "classifier", "head", "heads"):
            if hasattr(model, attr):
                setattr(model, attr, nn.Identity())
        with torch.no_grad():
            model.eval()
            out_dim = model(torch.zeros(1, 3, max(image_size, 32), max(image_size, 32))).flatten(1).shape[1]
            model.train()
        return _ExternalBackbone(model, out_dim)
    if lib == "timm":
        try:
            import timm
        except ImportError:
            raise ModelError(f"backbone {name!r} needs timm (pip install timm)") from None
        try:
            model = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_channels)
        except Exception as e:
            raise ModelError(f"timm has no model {model_name!r}: {e}") from None
        return _ExternalBackbone(model, model.num_features)
    raise ModelError(f"unknown backbone {name!r} (choose from {', '.join(BACKBONES)}, tv:NAME or timm:NAME)")
