"""What every self-prediction method shares: batch unpacking, input normalisation, backbones.

The methods follow the interface of :mod:`pyssl.methods`: an ``nn.Module`` with a
``backbone`` (evaluated downstream on ``method.normalize(images)``), ``training_step(batch)
-> loss`` on a batch of uint8 (or float [0, 1]) images, ``set_progress(step, max_steps)``
and ``spec`` (:class:`~pyssl.methods.spec.MethodSpec`: default data, optimiser, run defaults).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from pyssl.methods.base import MethodError
from pyssl.methods.spec import MethodSpec


def pretext_spec(default_data: str, inputs: str = "images") -> MethodSpec:
    """The spec the pretext methods share, with their own default data."""
    return MethodSpec(
        default_data=default_data,
        inputs=inputs,
        train_defaults={"optimizer": "adamw", "lr": 2e-3, "weight_decay": 1e-4, "momentum": 0.9},
        run_defaults={
            "backbone": "small",
            "batch_size": 128,
            "lr": {"*": 2e-3},
            "warmup_epochs": 0.0,
            "epochs": 20,
            "hidden_dim": None,
            "augment_kwargs": None,
        },
    )


def batch_images(batch: Any) -> Tensor:
    """The images of a batch: a tensor, or the first item of an ``(images, labels, ...)`` tuple."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(
        f"training_step expects images (B, C, H, W) or an (images, labels) tuple, got {type(batch).__name__}"
    )


def accuracy(logits: Tensor, target: Tensor) -> float:
    return float((logits.argmax(dim=1) == target).float().mean())


def own_encoder_only(method: str, backbone) -> None:
    """The colour methods build their own Lab encoders: only ``"small"`` (their default) is accepted."""
    if backbone != "small":
        raise MethodError(
            f"{method} builds its own encoders on Lab channels; backbone must be 'small' "
            f"(set widths= to resize them), got {backbone!r}"
        )


def as_method_error(fn, *args, **kwargs):
    """Run ``fn``; a ``ValueError`` from it becomes a :class:`MethodError` (one line in the CLI)."""
    try:
        return fn(*args, **kwargs)
    except MethodError:
        raise
    except ValueError as e:
        raise MethodError(str(e)) from None


def make_backbone(backbone: str | nn.Module, in_channels: int, image_size: int) -> nn.Module:
    """``"small"``: the pretext conv encoder (16-32-64 channels, one conv per stage, fast on a
    CPU); any other name goes to :func:`pyssl.models.build_backbone`; a module is used as is.
    The result has ``out_dim`` (feature width)."""
    if isinstance(backbone, nn.Module):
        module = backbone
    elif isinstance(backbone, str):
        from pyssl.models import build_backbone

        module = build_backbone(backbone, in_channels, image_size)
    else:
        raise MethodError(f"backbone must be a name or an nn.Module, got {type(backbone).__name__}")
    if not hasattr(module, "out_dim"):
        with torch.no_grad():
            was = module.training
            module.eval()
            module.out_dim = module(torch.zeros(2, in_channels, image_size, image_size)).flatten(1).shape[1]
            module.train(was)
    return module


class PretextMethod(nn.Module):
    """Base class: subclasses set ``backbone`` and implement :meth:`pretext_loss`.

    ``training_step(batch)`` returns the scalar loss and leaves that batch's pretext metrics
    (accuracy, reconstruction error, ...) in ``last_metrics``.

    ``spec``: AdamW (these tasks are classification or regression heads on small nets) and run
    defaults over the data set's, which are tuned for the contrastive methods (SGD learning rates,
    projection widths, augmentation). A subclass changes ``default_data`` with
    :func:`pretext_spec`.
    """

    spec: ClassVar[MethodSpec] = pretext_spec("digits")

    @property
    def sync_bn_by_default(self) -> bool:
        return type(self).spec.sync_bn

    @classmethod
    def run_defaults_for(cls, train_set, batch_size: int) -> dict:
        return {}

    def __init__(self, image_size: int | None = None, in_channels: int = 3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        super().__init__()
        if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
            raise MethodError(f"image_size must be a positive int, got {image_size!r}")
        if in_channels not in (1, 3):
            raise MethodError(f"in_channels must be 1 or 3, got {in_channels!r}")
        self.image_size, self.in_channels = image_size, in_channels
        self.mean = tuple(float(m) for m in mean)[:in_channels]
        self.std = tuple(float(s) for s in std)[:in_channels]
        self.last_metrics: dict[str, float] = {}
        self.step, self.max_steps = 0, 1

    def set_progress(self, step: int, max_steps: int) -> None:
        self.step, self.max_steps = step, max_steps

    def to_float(self, images: Tensor) -> Tensor:
        """uint8 0..255 or float [0, 1] images with 1 or 3 channels -> float [0, 1] with ``in_channels``."""
        if images.dim() != 4:
            raise ValueError(f"{type(self).__name__}: expected images (B, C, H, W), got {tuple(images.shape)}")
        x = images.float() / 255.0 if not images.is_floating_point() else images.float()
        if x.shape[1] != self.in_channels:
            if x.shape[1] == 1 and self.in_channels == 3:
                x = x.expand(-1, 3, -1, -1)
            elif x.shape[1] == 3 and self.in_channels == 1:
                x = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
            else:
                raise ValueError(f"{type(self).__name__}: expected 1 or 3 image channels, got {x.shape[1]}")
        return x

    def normalize(self, images: Tensor) -> Tensor:
        """Images -> the backbone's input: float, ``(x - mean) / std`` per channel."""
        x = self.to_float(images)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def check_images(self, images: Tensor) -> None:
        """Raise ``ValueError`` when the pretext task cannot apply to these images."""
        if images.dim() != 4:
            raise ValueError(f"{type(self).__name__}: expected images (B, C, H, W), got {tuple(images.shape)}")

    def pretext_loss(self, images: Tensor) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def _checked(self, batch: Any) -> Tensor:
        images = batch_images(batch)
        try:
            self.check_images(images)
        except MethodError:
            raise
        except ValueError as e:  # the CLI reports MethodError as one line
            raise MethodError(str(e)) from None
        return images

    def training_step(self, batch: Any) -> Tensor:
        images = self._checked(batch)
        loss, metrics = self.pretext_loss(images)
        metrics["loss"] = float(loss.detach())
        self.last_metrics = metrics
        return loss

    @torch.no_grad()
    def pretext_metrics(self, batch: Any) -> dict[str, float]:
        """Pretext metrics of a batch in eval mode (no parameter or statistics update)."""
        was_training = self.training
        self.eval()
        try:
            images = self._checked(batch)
            loss, metrics = self.pretext_loss(images)
            metrics["loss"] = float(loss)
        finally:
            self.train(was_training)
        return metrics
