"""What every self-prediction method shares: the pretext ``Method`` base and its helpers.

The methods follow the contract of :class:`pyssl.methods.Method`: a ``backbone`` (evaluated
downstream on ``method.normalize(images)``), ``training_step(batch) -> StepOutput`` on a batch of
uint8 (or float [0, 1]) images, ``set_progress(step, max_steps)`` and ``spec``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from pyssl.methods.base import Method, MethodError, StepOutput, images_of, make_backbone
from pyssl.methods.spec import MethodSpec

__all__ = [
    "PretextMethod",
    "MethodError",
    "pretext_spec",
    "accuracy",
    "own_encoder_only",
    "as_method_error",
    "make_backbone",
    "images_of",
]


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


def accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """The fraction of rows whose arg-max is the target, as a 0-dim tensor (no device sync)."""
    return (logits.argmax(dim=1) == target).float().mean()


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


class PretextMethod(Method):
    """Base of the self-prediction tasks: subclasses build ``backbone`` (and their heads) and
    implement :meth:`pretext_loss`; ``"small"`` names the pretext conv encoder (16-32-64 channels,
    one conv per stage, fast on a CPU).

    ``training_step(batch)`` returns the loss and that batch's pretext metrics (accuracy,
    reconstruction error, ...) as tensors; :attr:`last_metrics` reads them as numbers.

    ``spec``: AdamW (these tasks are classification or regression heads on small nets) and run
    defaults over the data set's, which are tuned for the contrastive methods (SGD learning rates,
    projection widths, augmentation). A subclass changes ``default_data`` with
    :func:`pretext_spec`.
    """

    spec: ClassVar[MethodSpec] = pretext_spec("digits")

    def __init__(self, image_size: int | None = None, in_channels: int = 3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
            raise MethodError(f"image_size must be a positive int, got {image_size!r}")
        if in_channels not in (1, 3):
            raise MethodError(f"in_channels must be 1 or 3, got {in_channels!r}")
        super().__init__(backbone=None, image_size=image_size, in_channels=in_channels, mean=mean, std=std)

    def check_images(self, images: Tensor) -> None:
        """Raise ``ValueError`` when the pretext task cannot apply to these images."""
        if images.dim() != 4:
            raise ValueError(f"{type(self).__name__}: expected images (B, C, H, W), got {tuple(images.shape)}")

    def pretext_loss(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def _checked(self, batch: Any) -> Tensor:
        images = images_of(batch)
        try:
            self.check_images(images)
        except MethodError:
            raise
        except ValueError as e:  # the CLI reports MethodError as one line
            raise MethodError(str(e)) from None
        return images

    def training_step(self, batch: Any) -> StepOutput:
        loss, metrics = self.pretext_loss(self._checked(batch))
        return self.output(loss, **metrics)

    @torch.no_grad()
    def pretext_metrics(self, batch: Any) -> dict[str, float]:
        """Pretext metrics of a batch in eval mode (no parameter or statistics update), as numbers."""
        was_training = self.training
        self.eval()
        try:
            loss, metrics = self.pretext_loss(self._checked(batch))
            values = {name: float(value) for name, value in metrics.items()}
            values["loss"] = float(loss)
        finally:
            self.train(was_training)
        return values
