"""MoCo v1 (He et al., 2019) and v2 (Chen et al., 2020): a momentum key encoder and a queue."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pyssl import distributed
from pyssl.losses import MoCoLoss
from pyssl.methods.base import MethodError, StepOutput, images_of, simclr_augment_defaults, two_views
from pyssl.methods.momentum_method import MomentumMethod
from pyssl.methods.registry import register
from pyssl.methods.spec import MethodSpec
from pyssl.models import ProjectionHead, SplitBatchNorm


@register("mocov2", version=2)
@register("moco", version=1)
class MoCo(MomentumMethod):
    """MoCo.

    The query encoder (``backbone`` + ``projection_head``) is trained; the key encoder is its
    exponential moving average (updated before the keys of each step are computed, as in the
    paper).  Keys leave through ``MoCoLoss``, which holds the queue of negatives as buffers (so
    checkpoints carry it) and enqueues each step's keys after the loss.

    v1: linear head, temperature 0.07, crops of 20-100 %, strong colour jitter, no blur.
    v2: MLP head (no BN), temperature 0.2, SimCLR-style jitter and blur (blur only above 64 px).

    Shuffle-BN (paper, section 3.3): BatchNorm statistics are shared by the samples they are
    computed over, so if a query and its positive key were normalised over the same sub-batch,
    the encoders could match them through those statistics instead of through the image (the
    paper's model then "cheats": a low pretext loss, a worse representation). With several BatchNorm
    groups, either several processes (each normalises its own shard) or ``bn_splits > 1`` in
    one, the keys are computed on a random reassignment of the samples to the groups and put
    back in order afterwards, so that a key is normalised among other samples than its query.
    Distributed, the key views of all ranks are gathered, permuted with one permutation shared
    by the ranks, sharded, encoded and gathered back (:func:`pyssl.distributed.shuffle_batch`).
    For the same reason MoCo opts out of the trainer's default SyncBatchNorm (whose global
    statistics would undo the shuffle) while ``shuffle_bn`` is on; an explicit ``sync_bn``
    (``--sync-bn on``) still converts. Distributed, every rank enqueues the keys of all ranks, so the queues stay
    identical.

    Args:
        momentum: key-encoder momentum ``m``; with ``momentum_end`` it follows a cosine ramp
            from ``momentum`` to ``momentum_end`` over training (BYOL-style).
        queue_size: negatives kept; should be a multiple of the batch size.
        shuffle_bn: shuffle the key views across BatchNorm groups. On by default; it only acts
            when there is more than one group (several processes, or ``bn_splits > 1``), so a
            single process with ``bn_splits=1`` computes exactly what it would without it.
            ``False`` is the paper's ablation (the model can cheat through BatchNorm).
        bn_splits: emulate this many devices in one process (the MoCo CIFAR demo's
            SplitBatchNorm): during training every BatchNorm of the query and key encoders
            normalises each of ``bn_splits`` equal chunks of the batch with the chunk's own
            statistics (see :class:`pyssl.models.SplitBatchNorm`); eval mode is unchanged. The
            batch (per process) must be divisible by it. 1 (default): off. Distributed, each
            rank splits its shard and the keys are shuffled over all ranks' chunks.
    """

    spec = MethodSpec(teachers=(("backbone_momentum", "backbone"), ("projection_head_momentum", "projection_head")))

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        version: int = 2,
        image_size: int = 32,
        in_channels: int = 3,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        temperature: float | None = None,
        queue_size: int = 65536,
        momentum: float = 0.99,
        momentum_end: float | None = None,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        augment=None,
        augment_kwargs=None,
        shuffle_bn: bool = True,
        bn_splits: int = 1,
    ):
        if version not in (1, 2):
            raise MethodError(f"MoCo: version must be 1 or 2, got {version!r}")
        if not isinstance(shuffle_bn, bool):
            raise MethodError(f"MoCo: shuffle_bn must be True or False, got {shuffle_bn!r}")
        if isinstance(bn_splits, bool) or not isinstance(bn_splits, int) or bn_splits < 1:
            raise MethodError(f"MoCo: bn_splits must be a positive int, got {bn_splits!r}")
        self.shuffle_bn, self.bn_splits = shuffle_bn, bn_splits
        self.version = version
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
        if not isinstance(queue_size, int) or queue_size < 1:
            raise MethodError(f"MoCo: queue_size must be a positive int, got {queue_size!r}")
        d = self.backbone.out_dim
        if version == 1:
            self.projection_head = ProjectionHead(d, out_dim=out_dim, num_layers=1)
        else:
            self.projection_head = ProjectionHead(d, hidden_dim, out_dim, 2, batch_norm=False)
        if bn_splits > 1:  # before the copy: the key encoder gets the same split layers
            self.backbone = SplitBatchNorm.convert(self.backbone, bn_splits)
            self.projection_head = SplitBatchNorm.convert(self.projection_head, bn_splits)
        self.build_teachers()
        if temperature is None:
            temperature = 0.07 if version == 1 else 0.2
        # Inert in a single process; under torch.distributed every rank enqueues all ranks' keys.
        self.criterion = MoCoLoss(temperature=temperature, queue_size=queue_size, dim=out_dim, gather_distributed=True)

    def augment_defaults(self, image_size: int) -> dict:
        if self.version == 1:
            return {"scale": (0.2, 1.0), "jitter": (0.4, 0.4, 0.4, 0.4), "p_jitter": 1.0, "p_gray": 0.2, "p_blur": 0.0}
        return simclr_augment_defaults(image_size, scale=(0.2, 1.0))

    @property
    def sync_bn_by_default(self) -> bool:
        """Read by the trainer: whether it converts BatchNorm to SyncBatchNorm when the user
        leaves ``sync_bn`` unset. Not with Shuffle-BN: SyncBatchNorm normalises with the whole
        global batch's statistics, which would undo the shuffle."""
        return not self.shuffle_bn

    @classmethod
    def run_defaults_for(cls, train_set, batch_size: int) -> dict:
        # a queue much larger than the data set would hold stale copies of each image
        queue = batch_size
        while queue * 2 <= min(4096, len(train_set) // 2):
            queue *= 2
        return {"queue_size": queue}

    def shuffles_keys(self) -> bool:
        """Whether this step's keys are computed on shuffled views: Shuffle-BN on and more than
        one BatchNorm group (with one group the shuffle changes nothing but the summation order)."""
        return self.shuffle_bn and (self.bn_splits > 1 or distributed.is_distributed())

    def forward(self, x: Tensor) -> Tensor:
        return self.projection_head(self.backbone(x))

    @torch.no_grad()
    def _keys(self, x: Tensor) -> Tensor:
        self.update_teachers()
        if not self.shuffles_keys():
            return self.projection_head_momentum(self.backbone_momentum(x))
        shuffled, permutation = distributed.shuffle_batch(x)
        return distributed.unshuffle_batch(self.projection_head_momentum(self.backbone_momentum(shuffled)), permutation)

    def training_step(self, batch) -> StepOutput:
        x = images_of(batch)
        if x.shape[0] % self.bn_splits:
            raise MethodError(
                f"MoCo: a batch of {x.shape[0]} images (per process) is not divisible by "
                f"bn_splits={self.bn_splits}: every BatchNorm normalises bn_splits equal chunks of it"
            )
        vq, vk = two_views(self.augment, x)
        q = self(vq)
        k = self._keys(vk)
        return self.output(self.criterion(q, k))
