"""SwAV (Caron et al., 2020): online clustering by Sinkhorn-Knopp codes, predicted across crops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyssl.augment import SimCLRAugment
from pyssl.losses import SwaVLoss
from pyssl.methods.base import Method, MethodError, StepOutput, images_of, make_augment, simclr_augment_defaults
from pyssl.methods.registry import register
from pyssl.methods.spec import MethodSpec
from pyssl.models import ProjectionHead, SwaVPrototypes

# The paper's multi-crop: 224 px crops of 14-100 % of the image, 96 px crops of 5-14 %.
_HIGH_RES_SCALE = (0.14, 1.0)
_LOW_RES_SCALE = (0.05, 0.14)
_LOW_RES_SIDE = 96 / 224
# Images smaller than this get no low-resolution crops in a run (see SwAV.run_defaults_for).
_SMALLEST_FOR_LOW_RES = 32


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MethodError(f"swav: {name} must be an int >= {minimum}, got {value!r}")
    return value


def _views(augment, x: Tensor, n: int) -> list[Tensor]:
    """``n`` augmented views of ``x``: one fused call for a :class:`SimCLRAugment`."""
    if n == 0:
        return []
    if hasattr(augment, "views"):
        return list(augment.views(x, n))
    return [augment(x) for _ in range(n)]


@register("swav")
class SwAV(Method):
    r"""SwAV.

    Every crop goes through ``backbone`` (one batch per resolution) -> ``projection_head``
    (Linear-BN-ReLU-Linear, the paper's 2,048 -> 128; one batch of all crops, as the paper's
    code) -> L2 normalisation -> ``prototypes`` (:class:`pyssl.models.SwaVPrototypes`,
    ``n_prototypes`` unit vectors), giving each crop's cosine scores against the prototypes. The
    codes of the ``n_high_res`` full-size crops come from Sinkhorn-Knopp over the batch (every
    prototype used equally, which is what keeps the clustering from collapsing), and every other
    crop predicts them by a softmax of its scores at ``temperature``
    (:class:`pyssl.losses.SwaVLoss`). The prototypes are renormalised before every step and get
    no gradient for the first ``freeze_prototypes_steps`` steps (the paper: the first epoch; a
    run through :mod:`pyssl.config` sets one epoch of steps).

    Multi-crop: ``n_high_res`` crops at ``image_size`` (scale ``augment_kwargs["scale"]``, the
    paper's 14-100 % by default) and ``n_low_res`` crops at ``low_res_size`` (default
    ``image_size * 96 / 224``, the paper's ratio) of the smaller areas ``low_res_scale`` (default:
    the paper's 5-14 % band, scaled to end where the high-resolution scale starts), each
    resolution made by one fused augmentation call and encoded as one batch. The low-resolution
    crops share every other augmentation setting with the high-resolution ones.

    Queue (off by default; the paper's remedy for batches far smaller than its 4,096): with
    ``queue_size > 0`` the normalised projections of each high-resolution crop are kept, newest
    first, in a queue of that many rows per crop (buffers, so checkpoints carry them); from step
    ``queue_start_step`` on, once a queue is full, its current prototype scores join that crop's
    batch in Sinkhorn (more rows to spread the prototypes over; only the batch's codes are used).
    Each process keeps its own queue, as in the paper.

    ``prototypes_used`` in the metrics is a collapse monitor: the fraction of prototypes that are
    the best match of at least one high-resolution crop in the step.

    Args:
        hidden_dim, out_dim: projection widths (the paper: 2,048 and 128).
        n_prototypes: K (the paper's 3,000 on ImageNet).
        temperature, sinkhorn_iterations, sinkhorn_epsilon: the loss's (the paper's 0.1, 3, 0.05).
        n_high_res, n_low_res: crops per image at each resolution (2 and 4 here; the paper's best
            2 + 6).
        low_res_size, low_res_scale: the small crops' side and area range (see above).
        freeze_prototypes_steps: steps without gradient for the prototypes.
        queue_size, queue_start_step: the queue (see above); 0: no queue.
        gather_distributed: Sinkhorn over the batches of all processes (inert in one).
        low_res_augment: the small crops' augmentation when ``augment`` is given (a callable
            of the images; default: built from the settings).
    """

    spec = MethodSpec()

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        image_size: int = 32,
        in_channels: int = 3,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        n_prototypes: int = 3000,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        sinkhorn_epsilon: float = 0.05,
        n_high_res: int = 2,
        n_low_res: int = 4,
        low_res_size: int | None = None,
        low_res_scale=None,
        freeze_prototypes_steps: int = 0,
        queue_size: int = 0,
        queue_start_step: int = 0,
        gather_distributed: bool = True,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        augment=None,
        augment_kwargs=None,
        low_res_augment=None,
    ):
        self.n_high_res = _positive_int("n_high_res", n_high_res)
        self.n_low_res = _positive_int("n_low_res", n_low_res, 0)
        if self.n_high_res + self.n_low_res < 2:
            raise MethodError("swav: needs at least two crops per image (n_high_res + n_low_res >= 2)")
        self.freeze_prototypes_steps = _positive_int("freeze_prototypes_steps", freeze_prototypes_steps, 0)
        self.queue_size = _positive_int("queue_size", queue_size, 0)
        self.queue_start_step = _positive_int("queue_start_step", queue_start_step, 0)
        super().__init__(backbone, image_size, in_channels, mean, std, augment, augment_kwargs)
        _positive_int("out_dim", out_dim)
        self.projection_head = ProjectionHead(self.backbone.out_dim, hidden_dim, out_dim, 2, batch_norm=True)
        self.prototypes = SwaVPrototypes(out_dim, _positive_int("n_prototypes", n_prototypes), freeze_prototypes_steps)
        self.criterion = SwaVLoss(temperature, sinkhorn_iterations, sinkhorn_epsilon, gather_distributed)

        self.low_res_size = low_res_size
        if self.n_low_res and low_res_augment is None:
            if low_res_size is None:
                low_res_size = max(4, round(image_size * _LOW_RES_SIDE))
            self.low_res_size = _positive_int("low_res_size", low_res_size, 4)
            if augment is None:
                kw = {**self.augment_defaults(image_size), **(augment_kwargs or {})}
            else:  # only the small crops are built here: the paper's settings
                kw = self.augment_defaults(image_size)
            if low_res_scale is None:
                start = (self.augment.scale if isinstance(self.augment, SimCLRAugment) else _HIGH_RES_SCALE)[0]
                low_res_scale = (start * _LOW_RES_SCALE[0] / _LOW_RES_SCALE[1], start)
            low_res_augment = make_augment(self.low_res_size, self.mean, self.std, **{**kw, "scale": low_res_scale})
        self.low_res_augment = low_res_augment

        # Each high-resolution crop's past projections, newest first; the count is kept as a
        # buffer for checkpoints and mirrored in Python, so that no step reads the device.
        self.register_buffer("queue", torch.zeros(self.n_high_res, self.queue_size, out_dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self._queue_filled = 0
        self.register_load_state_dict_post_hook(_mirror_queue_filled)

    def augment_defaults(self, image_size: int) -> dict:
        # BYOL's colour jitter, as Barlow Twins and VICReg here: with the paper's stronger (0.8,
        # 0.8, 0.8, 0.2), short runs on the digits (128 prototypes, two crops) flattened the
        # codes to uniform, the loss stuck at log K, where this jitter learned
        return simclr_augment_defaults(image_size, scale=_HIGH_RES_SCALE, jitter=(0.4, 0.4, 0.2, 0.1))

    @classmethod
    def run_defaults_for(cls, train_set, batch_size: int) -> dict:
        defaults = {
            "freeze_prototypes_steps": max(1, len(train_set) // batch_size),  # the paper's first epoch
            # the paper's 3,000 prototypes were for 1.28 million images; a small data set gets at
            # most one per 4 images (the digits: 314)
            "n_prototypes": max(10, min(3000, len(train_set) // 4)),
        }
        if min(train_set.images.shape[-2:]) < _SMALLEST_FOR_LOW_RES:
            # 40 epochs on the 16 px digits: with 4 crops of 7 px, kNN 88.5 % (below the random-init
            # encoder's 91.8 %) and the loss near log K; with none, 95.4 % (3,000 prototypes)
            defaults["n_low_res"] = 0
        return defaults

    def forward(self, x: Tensor) -> Tensor:
        """The normalised projections of ``x``."""
        return F.normalize(self.projection_head(self.backbone(x)), dim=1)

    def queue_in_use(self) -> bool:
        """Whether this step's codes are computed with the queue."""
        return self.queue_size > 0 and self.step >= self.queue_start_step and self._queue_filled >= self.queue_size

    @torch.no_grad()
    def _enqueue(self, projections: list[Tensor]) -> None:
        rows = min(projections[0].shape[0], self.queue_size)
        for i, z in enumerate(projections):
            self.queue[i] = torch.cat([z[:rows].to(self.queue.dtype), self.queue[i, : self.queue_size - rows]])
        self._queue_filled = min(self.queue_size, self._queue_filled + rows)
        self.queue_filled.fill_(self._queue_filled)

    def training_step(self, batch) -> StepOutput:
        x = images_of(batch)
        self.prototypes.normalize()
        # The backbone sees each resolution as one batch, the projection head all crops at once
        # (one set of BatchNorm statistics for all of them, as the paper's code).
        features = [self.backbone(torch.cat(_views(self.augment, x, self.n_high_res)))]
        if self.n_low_res:
            features.append(self.backbone(torch.cat(_views(self.low_res_augment, x, self.n_low_res))))
        z = F.normalize(self.projection_head(torch.cat(features)), dim=1)
        scores = self.prototypes(z, self.step).chunk(self.n_high_res + self.n_low_res)
        scores_high, scores_low = scores[: self.n_high_res], scores[self.n_high_res :]
        z_high = z[: self.n_high_res * x.shape[0]]
        queue_outputs = None
        if self.queue_size:
            if self.queue_in_use():
                with torch.no_grad():
                    queue_outputs = [self.prototypes(q, self.step) for q in self.queue]
            self._enqueue(list(z_high.detach().chunk(self.n_high_res)))
        loss = self.criterion(list(scores_high), list(scores_low), queue_outputs)
        with torch.no_grad():
            best = torch.cat(scores_high).argmax(1)
            used = torch.zeros(self.prototypes.n_prototypes[0], device=best.device).index_fill_(0, best, 1.0).mean()
        return self.output(loss, prototypes_used=used)


def _mirror_queue_filled(module: SwAV, incompatible_keys) -> None:
    # a checkpoint's queue count, read once at load time rather than in every step
    module._queue_filled = int(module.queue_filled)
