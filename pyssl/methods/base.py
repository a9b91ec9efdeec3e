"""Common parts of the methods: backbone construction, augmentation, progress hooks."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from pyssl.augment import SimCLRAugment
from pyssl.methods.spec import MethodSpec
from pyssl.models import build_backbone


class MethodError(ValueError):
    """Bad method configuration (unknown name or option, impossible sizes)."""


def make_augment(image_size: int, mean, std, **kwargs):
    """The batched augmentation (``pyssl.augment.SimCLRAugment``) with the given settings."""
    return SimCLRAugment(image_size, mean=tuple(mean), std=tuple(std), **kwargs)


def images_of(batch) -> Tensor:
    """A batch is an image tensor or an (images, labels, ...) tuple."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise MethodError(f"training_step expects images (B, C, H, W), got {getattr(x, 'shape', type(x))}")
    return x


def two_views(augment, x: Tensor) -> tuple[Tensor, Tensor]:
    if hasattr(augment, "views"):
        v0, v1 = augment.views(x, 2)
    else:
        v0, v1 = augment(x), augment(x)
    return v0, v1


class Method(nn.Module):
    """Base class: ``backbone``, ``augment``, ``training_step``; ``set_progress`` is called by the
    trainer before each step (for schedules such as the momentum of the key encoder).

    ``spec`` (:class:`~pyssl.methods.spec.MethodSpec`) declares what the trainer and the run
    configuration need to know: default data, inputs, optimiser, run defaults, SyncBN policy.
    """

    spec: ClassVar[MethodSpec] = MethodSpec()

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

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        image_size: int = 32,
        in_channels: int = 3,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        augment=None,
        augment_kwargs: dict | None = None,
    ):
        super().__init__()
        if not isinstance(image_size, int) or image_size < 4:
            raise MethodError(f"image_size must be an int >= 4, got {image_size!r}")
        self.image_size, self.in_channels = image_size, in_channels
        self.mean, self.std = tuple(mean)[:in_channels], tuple(std)[:in_channels]
        self.backbone = build_backbone(backbone, in_channels, image_size) if isinstance(backbone, str) else backbone
        if not hasattr(self.backbone, "out_dim"):
            with torch.no_grad():
                was = self.backbone.training
                self.backbone.eval()
                self.backbone.out_dim = (
                    self.backbone(torch.zeros(1, in_channels, image_size, image_size)).flatten(1).shape[1]
                )
                self.backbone.train(was)
        if augment is None:
            kw = {**self.augment_defaults(image_size), **(augment_kwargs or {})}
            augment = make_augment(image_size, self.mean, self.std, **kw)
        self.augment = augment
        self.step, self.max_steps = 0, 1

    def augment_defaults(self, image_size: int) -> dict:
        return {}

    def set_progress(self, step: int, max_steps: int) -> None:
        self.step, self.max_steps = step, max_steps

    def training_step(self, batch) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def normalize(self, images: Tensor) -> Tensor:
        """uint8/[0,1] images -> the normalised float input of the backbone (no augmentation)."""
        x = images.float() / 255.0 if not images.is_floating_point() else images.float()
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std
