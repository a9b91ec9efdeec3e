"""MoCo v1 (He et al., 2019) and v2 (Chen et al., 2020): a momentum key encoder and a queue."""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from pyssl.methods import register
from pyssl.losses import MoCoLoss
from pyssl.methods.base import Method, MethodError, images_of, two_views
from pyssl.momentum import cosine_schedule, update_momentum
from pyssl.models import ProjectionHead


@register("mocov2", version=2)
@register("moco", version=1)
class MoCo(Method):
    """MoCo.

    The query encoder (``backbone`` + ``projection_head``) is trained; the key encoder is its
    exponential moving average (updated before the keys of each step are computed, as in the
    paper).  Keys leave through ``MoCoLoss``, which holds the queue of negatives as buffers (so
    checkpoints carry it) and enqueues each step's keys after the loss.

    v1: linear head, temperature 0.07, crops of 20-100 %, strong colour jitter, no blur.
    v2: MLP head (no BN), temperature 0.2, SimCLR-style jitter and blur (blur only above 64 px).

    Args:
        momentum: key-encoder momentum ``m``; with ``momentum_end`` it follows a cosine ramp
            from ``momentum`` to ``momentum_end`` over training (BYOL-style).
        queue_size: negatives kept; should be a multiple of the batch size.

    Shuffle-BN is omitted (on one device it is a no-op); with several processes on CUDA the
    trainer converts BatchNorm to SyncBatchNorm by default instead. Distributed, every rank
    enqueues the keys of all ranks, so the queues stay identical.
    """

    train_defaults = {"optimizer": "sgd", "lr": 0.06, "weight_decay": 5e-4, "momentum": 0.9}

    def __init__(self, backbone: str | nn.Module = "resnet18", version: int = 2, image_size: int = 32,
                 in_channels: int = 3, hidden_dim: int = 2048, out_dim: int = 128,
                 temperature: float | None = None, queue_size: int = 65536, momentum: float = 0.99,
                 momentum_end: float | None = None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                 augment=None, augment_kwargs=None):
        if version not in (1, 2):
            raise MethodError(f"MoCo: version must be 1 or 2, got {version!r}")
        self.version = version
        super().__init__(backbone, image_size, in_channels, mean, std, augment, augment_kwargs)
        if not 0.0 <= momentum <= 1.0 or (momentum_end is not None and not 0.0 <= momentum_end <= 1.0):
            raise MethodError(f"MoCo: momentum must lie in [0, 1], got {momentum}, {momentum_end}")
        if not isinstance(queue_size, int) or queue_size < 1:
            raise MethodError(f"MoCo: queue_size must be a positive int, got {queue_size!r}")
        d = self.backbone.out_dim
        if version == 1:
            self.projection_head = ProjectionHead(d, out_dim=out_dim, num_layers=1)
        else:
            self.projection_head = ProjectionHead(d, hidden_dim, out_dim, 2, batch_norm=False)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        for p in (*self.backbone_momentum.parameters(), *self.projection_head_momentum.parameters()):
            p.requires_grad_(False)
        if temperature is None:
            temperature = 0.07 if version == 1 else 0.2
        # Inert in a single process; under torch.distributed every rank enqueues all ranks' keys.
        self.criterion = MoCoLoss(temperature=temperature, queue_size=queue_size, dim=out_dim, gather_distributed=True)
        self.momentum, self.momentum_end = momentum, momentum_end

    def augment_defaults(self, image_size: int) -> dict:
        if self.version == 1:
            return {"scale": (0.2, 1.0), "jitter": (0.4, 0.4, 0.4, 0.4), "p_jitter": 1.0, "p_gray": 0.2,
                    "p_blur": 0.0}
        return {"scale": (0.2, 1.0), "jitter": (0.4, 0.4, 0.4, 0.1), "p_jitter": 0.8, "p_gray": 0.2,
                "p_blur": 0.5 if image_size > 64 else 0.0}

    def current_momentum(self) -> float:
        if self.momentum_end is None:
            return self.momentum
        return cosine_schedule(self.step, self.max_steps, self.momentum, self.momentum_end)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection_head(self.backbone(x))

    @torch.no_grad()
    def _keys(self, x: Tensor) -> Tensor:
        m = self.current_momentum()
        update_momentum(self.backbone_momentum, self.backbone, m)
        update_momentum(self.projection_head_momentum, self.projection_head, m)
        return self.projection_head_momentum(self.backbone_momentum(x))

    def training_step(self, batch) -> Tensor:
        vq, vk = two_views(self.augment, images_of(batch))
        q = self(vq)
        k = self._keys(vk)
        return self.criterion(q, k)
