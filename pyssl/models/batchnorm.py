"""BatchNorm over sub-batches (MoCo's Shuffle-BN on one device)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyssl.models.errors import ModelError


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm that, in training mode, normalises each of ``splits`` equal contiguous chunks of
    the batch with that chunk's own mean and variance.

    Why: in data-parallel training without SyncBatchNorm every device normalises its own shard,
    and MoCo's Shuffle-BN relies on that (a key is normalised among other samples than its
    query). This layer reproduces the per-device statistics of ``splits`` devices in a single
    process, like the SplitBatchNorm of the MoCo CIFAR-10 demo, so that Shuffle-BN can be used
    (and tested) on one device.

    Running statistics: each chunk updates its own copy of ``running_mean`` / ``running_var``
    (with its unbiased variance and the usual momentum), and the buffers become the mean
    of the copies, as in the demo. So they estimate per-chunk statistics, which are what the
    network is trained under, rather than whole-batch ones. Eval mode is a plain BatchNorm with
    the running statistics. Parameter and buffer names are those of ``nn.BatchNorm*d``: state
    dicts move freely between the two (e.g. a backbone trained with splits evaluated without).
    Inputs of any rank >= 2, (N, C, ...), as ``nn.BatchNorm1d/2d/3d``.
    """

    def __init__(
        self,
        num_features: int,
        splits: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
            raise ModelError(f"SplitBatchNorm: splits must be a positive int, got {splits!r}")
        self.splits = splits

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SplitBatchNorm: expected an input of shape (N, C, ...), got {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, splits={self.splits}"

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.splits == 1:
            return super().forward(x)
        self._check_input_dim(x)
        if x.shape[0] % self.splits:
            raise ValueError(
                f"SplitBatchNorm: a batch of {x.shape[0]} is not divisible into {self.splits} equal splits"
            )
        update_running = self.track_running_stats and self.running_mean is not None
        factor = 0.0 if self.momentum is None else self.momentum
        if update_running and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        outputs, means, variances = [], [], []
        for chunk in x.chunk(self.splits):  # contiguous views: no copy of the input
            mean = self.running_mean.clone() if update_running else None
            var = self.running_var.clone() if update_running else None
            outputs.append(F.batch_norm(chunk, mean, var, self.weight, self.bias, True, factor, self.eps))
            means.append(mean)
            variances.append(var)
        if update_running:
            with torch.no_grad():
                self.running_mean.copy_(torch.stack(means).mean(0))
                self.running_var.copy_(torch.stack(variances).mean(0))
        return torch.cat(outputs)

    @classmethod
    def convert(cls, module: nn.Module, splits: int) -> nn.Module:
        """Replaces every ``nn.BatchNorm1d/2d/3d`` in ``module`` by a :class:`SplitBatchNorm` that
        shares its parameters and buffers (in place below the root; returns ``module``, or the new
        layer when ``module`` itself is one). Subclasses of those (e.g. timm's BatchNormAct2d,
        whose forward does more than normalise) and other normalisation layers are left alone."""
        if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            split = cls(
                module.num_features, splits, module.eps, module.momentum, module.affine, module.track_running_stats
            )
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                setattr(split, name, getattr(module, name))
            split.train(module.training)
            return split
        for name, child in module.named_children():
            converted = cls.convert(child, splits)
            if converted is not child:
                setattr(module, name, converted)
        return module
