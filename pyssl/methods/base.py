"""The method contract: one ``Method`` base, ``StepOutput``, and the helpers every method shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from pyssl.augment import SimCLRAugment
from pyssl.methods.spec import MethodSpec
from pyssl.models import build_backbone


class MethodError(ValueError):
    """Bad method configuration (unknown name or option, impossible sizes)."""


@dataclass(frozen=True)
class StepOutput:
    """What ``training_step`` returns: the loss to minimise, and the step's metrics as detached
    0-dim tensors. The trainer reads the metrics with the losses, in its one batched copy to the
    host every few steps; nothing in a step waits for the device."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def make_augment(image_size: int, mean, std, **kwargs):
    """The batched augmentation (``pyssl.augment.SimCLRAugment``) with the given settings."""
    return SimCLRAugment(image_size, mean=tuple(mean), std=tuple(std), **kwargs)


def simclr_augment_defaults(image_size: int, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.4, 0.1)) -> dict:
    """SimCLR's augmentation, which the two-view methods vary: crop ``scale``, colour ``jitter``
    (brightness, contrast, saturation, hue) with p = 0.8, grey with p = 0.2, and blur with p = 0.5
    only above 64 px (the papers' CIFAR setting leaves it out)."""
    return {
        "scale": scale,
        "jitter": jitter,
        "p_jitter": 0.8,
        "p_gray": 0.2,
        "p_blur": 0.5 if image_size > 64 else 0.0,
    }


def images_of(batch) -> Tensor:
    """The images of a batch: a (B, C, H, W) tensor, or the first item of an ``(images, labels, ...)``
    tuple."""
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise MethodError(
            f"training_step expects images (B, C, H, W) or an (images, labels) tuple, got "
            f"{tuple(x.shape) if isinstance(x, Tensor) else type(batch).__name__}"
        )
    return x


def two_views(augment, x: Tensor) -> tuple[Tensor, Tensor]:
    if hasattr(augment, "views"):
        v0, v1 = augment.views(x, 2)
    else:
        v0, v1 = augment(x), augment(x)
    return v0, v1


def make_backbone(backbone: str | nn.Module, in_channels: int, image_size: int) -> nn.Module:
    """A backbone by name (:func:`pyssl.models.build_backbone`) or a module used as is; the result
    has ``out_dim`` (its feature width, measured on one input when the module does not say)."""
    if isinstance(backbone, nn.Module):
        module = backbone
    elif isinstance(backbone, str):
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


class Method(nn.Module):
    """The base of every method.

    A method has a ``backbone`` (the encoder evaluated downstream, on ``normalize(images)``) and
    ``training_step(batch) -> StepOutput``; ``set_progress(step, max_steps)`` is called by the
    trainer before each step (for schedules such as a teacher's momentum). ``spec``
    (:class:`~pyssl.methods.spec.MethodSpec`) declares what the trainer and the run configuration
    need: default data, inputs, optimiser, run defaults, SyncBN policy, momentum teachers.

    With a ``backbone`` (a name or a module) the base builds it and the default two-view
    augmentation (``augment_defaults`` changes its settings); with ``backbone=None`` the subclass
    builds its own encoders (the pretext tasks do).
    """

    spec: ClassVar[MethodSpec] = MethodSpec()

    def __init__(
        self,
        backbone: str | nn.Module | None = "resnet18",
        image_size: int | None = 32,
        in_channels: int = 3,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        augment=None,
        augment_kwargs: dict | None = None,
    ):
        super().__init__()
        self.image_size, self.in_channels = image_size, in_channels
        self.mean = tuple(float(m) for m in mean)[:in_channels]
        self.std = tuple(float(s) for s in std)[:in_channels]
        self.step, self.max_steps = 0, 1
        self._last_metrics: dict[str, Tensor] = {}
        if backbone is None:
            return
        if not isinstance(image_size, int) or image_size < 4:
            raise MethodError(f"image_size must be an int >= 4, got {image_size!r}")
        self.backbone = make_backbone(backbone, in_channels, image_size)
        if augment is None:
            kw = {**self.augment_defaults(image_size), **(augment_kwargs or {})}
            augment = make_augment(image_size, self.mean, self.std, **kw)
        self.augment = augment

    @property
    def sync_bn_by_default(self) -> bool:
        """Whether the trainer converts BatchNorm to SyncBatchNorm when distributed on CUDA and the
        user left ``sync_bn`` unset (:func:`pyssl.train.use_sync_bn`); MoCo with Shuffle-BN says no."""
        return type(self).spec.sync_bn

    @classmethod
    def run_defaults_for(cls, train_set, batch_size: int) -> dict:
        """Constructor settings derived from the training data (:mod:`pyssl.config` applies them
        under the user's): e.g. MoCo sizes its queue to the data set, CLIP its text tower to the
        captions' tokens."""
        return {}

    def augment_defaults(self, image_size: int) -> dict:
        return {}

    def set_progress(self, step: int, max_steps: int) -> None:
        self.step, self.max_steps = step, max_steps

    def training_step(self, batch) -> StepOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def output(self, loss: Tensor, **metrics: Tensor) -> StepOutput:
        """The StepOutput of a step (``loss`` is among its metrics); also kept for
        :attr:`last_metrics`."""
        found = {"loss": loss.detach()}
        for name, value in metrics.items():
            found[name] = value.detach() if isinstance(value, Tensor) else torch.tensor(float(value))
        self._last_metrics = found
        return StepOutput(loss, found)

    @property
    def last_metrics(self) -> dict[str, float]:
        """The metrics of the last training step, as numbers (reading them waits for the device)."""
        return {name: float(value) for name, value in self._last_metrics.items()}

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
        """uint8/[0,1] images -> the normalised float input of the backbone (no augmentation)."""
        x = self.to_float(images)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std
