"""DINO (Caron et al., 2021): a student matches its momentum teacher's centred, sharpened
distribution over K prototypes, across global and local crops (multi-crop)."""

from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor, nn

from pyssl.augment import MultiViewAugment, SimCLRAugment
from pyssl.losses import DINOLoss
from pyssl.methods.base import MethodError, StepOutput, images_of, simclr_augment_defaults, two_views
from pyssl.methods.momentum_method import MomentumMethod
from pyssl.methods.registry import register
from pyssl.methods.spec import MethodSpec
from pyssl.models import DINOProjectionHead


def _entropy(logits: Tensor, temperature: float) -> Tensor:
    """Mean over rows of the entropy of softmax(logits / temperature), in nats."""
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


#: The fewest image pixels a local crop covers by default (an 8 x 8 patch).
MIN_LOCAL_PIXELS = 64


def default_local_scale(image_size: int) -> tuple[float, float]:
    """The local crops' default area fraction: the paper's (0.05, 0.4) where its smallest crop
    covers at least :data:`MIN_LOCAL_PIXELS` of the image (from 36 px up), else (a, 2a) with
    a = 64 / image_size^2, so that a crop still shows a part of an object rather than a few
    interpolated pixels: (0.25, 0.5) on the 16-px digits, (0.0625, 0.4) at 32 px.

    On the digits (10 epochs, seed 0) the paper's range gave a 10 %-label probe of 91.3 % and an
    entropy rising towards log K; (0.25, 0.5) gave 93.7 % with the entropies falling.
    """
    low = max(0.05, MIN_LOCAL_PIXELS / image_size**2)
    return low, min(1.0, max(0.4, 2 * low))


@register("dino")
class DINO(MomentumMethod):
    r"""DINO.

    The student (``backbone`` -> ``projection_head``, a :class:`pyssl.models.DINOProjectionHead`:
    MLP ``hidden_dim`` -> ``bottleneck_dim``, L2 normalisation, a weight-normalised layer of K =
    ``out_dim`` prototypes) sees two global crops at ``image_size`` and ``n_local`` local crops at
    ``local_size``; the teacher (``backbone_momentum`` -> ``projection_head_momentum``, its
    exponential moving average, no gradient) sees only the global crops. The loss
    (:class:`pyssl.losses.DINOLoss`) is the cross-entropy

    .. math::
        L = \frac{1}{B\,n} \sum_{s} \sum_{t \ne s} \sum_b
            -\operatorname{softmax}\!\Big(\frac{y_{t,b} - c}{\tau_t}\Big) \cdot
            \log \operatorname{softmax}\!\Big(\frac{x_{s,b}}{\tau_s}\Big)

    over teacher views :math:`t` (the 2 global crops) and student views :math:`s` (all
    :math:`2 + n_\mathrm{local}`), :math:`n` the number of pairs; the centre :math:`c` is an EMA
    (``center_momentum``) of the teacher outputs' batch mean (averaged over the processes under
    torch.distributed), and it and the sharp :math:`\tau_t` keep the teacher from collapsing
    to one prototype or to the uniform distribution.

    Schedules, driven by the trainer's ``set_progress(step, max_steps)``: the teacher momentum
    follows the cosine ramp ``momentum`` -> ``momentum_end`` to 1 (the paper starts at 0.996 for
    runs of 100+ epochs of ImageNet, over 100,000 steps; the digits' 40 epochs are 360 steps, and
    as for BYOL 0.99 is the default); the teacher temperature rises linearly from
    ``warmup_teacher_temp`` to ``teacher_temp`` over the first ``warmup_teacher_temp_epochs``
    epochs (the paper's code defaults to 0.04 throughout, as here; its longer ViT runs warm up to
    0.07 over 30 epochs), and the prototypes get no gradient in the first ``freeze_last_layer``
    epochs (the paper's 1), with the epoch ``step // steps_per_epoch``. :mod:`pyssl.config` sets
    ``steps_per_epoch`` from the data and the batch; a method built by hand without it knows no
    epoch: the teacher temperature is then ``teacher_temp`` and the prototypes are never frozen.

    Augmentation (one fused call per resolution: the two global crops, then all local ones):
    the paper's, colour jitter 0.4/0.4/0.2/0.1 with p = 0.8, grey with p = 0.2, flips; global
    crops of ``scale`` (0.4, 1) (``augment_kwargs`` may change it and the settings of every
    crop), the second one solarized with p = 0.2; local crops of ``local_scale``, by default
    :func:`default_local_scale`: the paper's (0.05, 0.4), raised on small images.
    Above 64 px the first global crop is always blurred, the second with p = 0.1 and the local
    ones with p = 0.5; on smaller images (the papers' CIFAR setting) nothing is.

    K: the paper's 65,536 prototypes suit ImageNet's 1.28 M images (its ablation finds little
    change from 16,384 up). The embedded digits have 1,258 training images in 10 classes, so
    the default is K = 2,048, more prototypes than images already and 32x less last layer to
    compute on a CPU; pass ``out_dim=65536`` on real data.

    The head normalises its hidden layers (``head_batch_norm``; the paper's ViT head has no
    BatchNorm): a small convnet's pooled ReLU features share a large common part, and without
    it every image lands near the same point of the bottleneck, the centred teacher is all but
    uniform and the student follows it there (measured on the digits: the loss and both
    entropies reach log K within 50 steps, and the features stay level with random init's).

    Args:
        hidden_dim, bottleneck_dim, out_dim: the head's widths and K (the paper: 2,048, 256,
            65,536).
        head_batch_norm: BatchNorm after the head's hidden layers.
        n_local: local crops per image (the paper: 6 to 10; 0: two global crops only).
        local_size: the local crops' side (default ``image_size // 2``; the paper: 96 of 224).
        local_scale: the local crops' area fraction (default :func:`default_local_scale`).
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, student_temp,
            center_momentum: the loss's (see :class:`pyssl.losses.DINOLoss`).
        freeze_last_layer: epochs at the start with no gradient to the prototypes.
        steps_per_epoch: optimiser steps per epoch, for the epoch-based schedules.
        momentum, momentum_end: the teacher's momentum schedule (see :class:`MomentumMethod`).
        augment, local_augment: callables replacing the global and the local crops'
            augmentation (uint8 or [0, 1] images -> normalised views).

    Metrics: ``teacher_entropy`` and ``student_entropy`` (mean per-image entropy of the
    teacher's centred, sharpened distribution and of the student's, in nats: ``log K`` is the
    uniform collapse, 0 one-hot), ``teacher_temp`` and ``momentum``.
    """

    spec = MethodSpec(
        teachers=(("backbone_momentum", "backbone"), ("projection_head_momentum", "projection_head")),
        # AdamW as in the paper (5e-4 per 256 images; weight decay 0.04, held constant here where the
        # paper ramps it to 0.4); 1e-3 at each data set's default batch, measured on the digits
        train_defaults={"optimizer": "adamw", "lr": 2.5e-4, "weight_decay": 0.04, "momentum": 0.9},
        run_defaults={"lr": {"*": 1e-3}},
    )

    @classmethod
    def run_defaults_for(cls, train_set, batch_size: int) -> dict:
        # the trainer's: every process steps through the same global batches
        return {"steps_per_epoch": max(1, len(train_set) // batch_size)}

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        image_size: int = 32,
        in_channels: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        out_dim: int = 2048,
        head_batch_norm: bool = True,
        n_local: int = 6,
        local_size: int | None = None,
        local_scale=None,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        freeze_last_layer: int = 1,
        steps_per_epoch: int | None = None,
        momentum: float = 0.99,
        momentum_end: float | None = 1.0,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        augment=None,
        augment_kwargs=None,
        local_augment=None,
    ):
        name = type(self).__name__
        for key, value, low in (
            ("n_local", n_local, 0),
            ("freeze_last_layer", freeze_last_layer, 0),
            ("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise MethodError(f"{name}: {key} must be an int >= {low}, got {value!r}")
        if steps_per_epoch is not None and (
            isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1
        ):
            raise MethodError(f"{name}: steps_per_epoch must be a positive int or None, got {steps_per_epoch!r}")
        super().__init__(
            backbone,
            image_size,
            in_channels,
            mean,
            std,
            augment,
            augment_kwargs,
            momentum=momentum,
            momentum_end=momentum_end,
        )
        if local_scale is None:  # image_size is valid once the base has built the backbone
            local_scale = default_local_scale(image_size)
        if not (
            isinstance(local_scale, (tuple, list))
            and len(local_scale) == 2
            and all(isinstance(v, Real) and not isinstance(v, bool) for v in local_scale)
            and 0 < local_scale[0] <= local_scale[1] <= 1
        ):
            raise MethodError(f"{name}: local_scale must be a pair 0 < min <= max <= 1, got {local_scale!r}")
        local_size = image_size // 2 if local_size is None else local_size
        if isinstance(local_size, bool) or not isinstance(local_size, int) or local_size < 4:
            raise MethodError(f"{name}: local_size must be an int >= 4, got {local_size!r}")
        self.n_local, self.local_size, self.steps_per_epoch = n_local, local_size, steps_per_epoch
        self.freeze_last_layer = freeze_last_layer
        if n_local and local_size != image_size:
            self._check_backbone_takes(local_size)
        user = dict(augment_kwargs or {})
        common = {**self.augment_defaults(image_size), **user}
        blur = image_size > 64
        if augment is None:  # the paper's asymmetric pair of global crops, in one fused call
            first = {**common, "p_blur": 1.0 if blur else 0.0, **user}
            second = {**common, "p_blur": 0.1 if blur else 0.0, "p_solarize": 0.2, **user}
            self.augment = MultiViewAugment(
                [SimCLRAugment(image_size, mean=self.mean, std=self.std, **kw) for kw in (first, second)]
            )
        if local_augment is None:
            local = {**common, "p_blur": 0.5 if blur else 0.0, **user, "scale": tuple(local_scale)}
            local_augment = SimCLRAugment(local_size, mean=self.mean, std=self.std, **local)
        self.local_augment = local_augment
        self.projection_head = DINOProjectionHead(
            self.backbone.out_dim, hidden_dim, bottleneck_dim, out_dim, batch_norm=head_batch_norm
        )
        self.build_teachers()
        self.criterion = DINOLoss(
            out_dim,
            warmup_teacher_temp=warmup_teacher_temp,
            teacher_temp=teacher_temp,
            warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
            student_temp=student_temp,
            center_momentum=center_momentum,
        )

    def _check_backbone_takes(self, size: int) -> None:
        """A backbone of one input size (a ViT with fixed positions) cannot encode the local
        crops: say so now rather than at the first step."""
        was = self.backbone.training
        self.backbone.eval()
        try:
            with torch.no_grad():
                self.backbone(torch.zeros(2, self.in_channels, size, size))
        except (RuntimeError, ValueError) as e:
            raise MethodError(
                f"{type(self).__name__}: the backbone cannot encode local crops of {size} px "
                f"({str(e).splitlines()[0][:160]}); set local_size={self.image_size} or n_local=0"
            ) from None
        finally:
            self.backbone.train(was)

    def augment_defaults(self, image_size: int) -> dict:
        return simclr_augment_defaults(image_size, scale=(0.4, 1.0), jitter=(0.4, 0.4, 0.2, 0.1))

    @property
    def epoch(self) -> int | None:
        """The current epoch (from ``set_progress``), or None without ``steps_per_epoch``."""
        return None if self.steps_per_epoch is None else self.step // self.steps_per_epoch

    def forward(self, x: Tensor) -> Tensor:
        """The student's outputs over the prototypes, (B, ``out_dim``)."""
        return self.projection_head(self.backbone(x))

    def views(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(the 2 global views at ``image_size``, the ``n_local`` local views at ``local_size``)."""
        if isinstance(self.augment, MultiViewAugment):
            global_views = list(self.augment(images))
        else:
            global_views = list(two_views(self.augment, images))
        if self.n_local == 0:
            local_views = []
        elif hasattr(self.local_augment, "views"):
            local_views = list(self.local_augment.views(images, self.n_local))
        else:
            local_views = [self.local_augment(images) for _ in range(self.n_local)]
        return global_views, local_views

    @torch.no_grad()
    def teacher_outputs(self, global_views: list[Tensor]) -> list[Tensor]:
        self.update_teachers()
        out = self.projection_head_momentum(self.backbone_momentum(torch.cat(global_views)))
        return list(out.chunk(len(global_views)))

    def student_outputs(self, global_views: list[Tensor], local_views: list[Tensor]) -> list[Tensor]:
        # one backbone pass per resolution (BatchNorm sees each as one batch), one head pass for all
        features = [self.backbone(torch.cat(global_views))]
        if local_views:
            features.append(self.backbone(torch.cat(local_views)))
        epoch = self.epoch
        frozen = epoch is not None and epoch < self.freeze_last_layer
        out = self.projection_head(torch.cat(features), freeze_prototypes=frozen)
        return list(out.chunk(len(global_views) + len(local_views)))

    def training_step(self, batch) -> StepOutput:
        global_views, local_views = self.views(images_of(batch))
        student = self.student_outputs(global_views, local_views)
        teacher = self.teacher_outputs(global_views)
        epoch = self.epoch
        with torch.no_grad():  # before the loss moves the centre: the distribution the loss uses
            temperature = self.criterion.teacher_temperature(epoch)
            centred = torch.cat(teacher) - self.criterion.center.reshape(1, -1).to(teacher[0].dtype)
            teacher_entropy = _entropy(centred, temperature)
            student_entropy = _entropy(torch.cat(student).detach(), self.criterion.student_temp)
        loss = self.criterion(teacher, student, epoch=epoch)
        return self.output(
            loss,
            teacher_entropy=teacher_entropy,
            student_entropy=student_entropy,
            teacher_temp=torch.tensor(temperature),
            momentum=torch.tensor(self.current_momentum()),
        )
