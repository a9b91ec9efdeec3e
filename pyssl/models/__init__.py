"""Backbones and heads.

Backbones map images (B, C, H, W) to flat features (B, ``out_dim``).  The small ResNets and the
ConvNet here are sized for 8x8 to 96x96 images: up to 64x64 they use the CIFAR stem (3x3 conv,
stride 1, no max-pool); above it the ImageNet stem (7x7 stride 2 + max-pool).  Any torchvision
(``tv:resnet50``) or timm (``timm:vit_tiny_patch16_224``) model also works when installed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ModelError(ValueError):
    """Unknown backbone name or impossible head configuration."""


class StagedEncoder:
    """Mixin of the encoders built as a sequence of stages in one ``nn.Sequential``: each records,
    while it is built, the index of every stage's last layer in ``_stage_ends``, so that a stage's
    output can be named for :func:`pyssl.eval.extract_features` (``layer=``)."""

    _stage_container: str  # attribute name of the nn.Sequential holding the stages
    _stage_ends: list[int]

    @property
    def num_stages(self) -> int:
        return len(self._stage_ends)

    def stage_name(self, stage: int) -> str:
        """Name (within this module) of the last layer of ``stage`` (negative counts from the end)."""
        n = self.num_stages
        if not -n <= stage < n:
            raise ValueError(f"{type(self).__name__}: stage must be in [{-n}, {n}), got {stage}")
        return f"{self._stage_container}.{self._stage_ends[stage]}"


# ---- ResNet --------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(StagedEncoder, nn.Module):
    """ResNet of basic blocks.  ``stem="cifar"``: 3x3 conv stride 1, no max-pool (the CIFAR
    variant of SimCLR/MoCo papers); ``stem="imagenet"``: 7x7 conv stride 2 + 3x3 max-pool."""

    def __init__(self, layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), in_channels: int = 3, stem: str = "cifar"):
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ModelError(f"ResNet: stem must be 'cifar' or 'imagenet', got {stem!r}")
        w0 = widths[0]
        if stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=True)
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, w0, 7, 2, 3, bias=False),
                nn.BatchNorm2d(w0),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        blocks, cin = [], w0
        self._stage_container, self._stage_ends = "layers", []
        for i, (n, w) in enumerate(zip(layers, widths)):
            for j in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
            self._stage_ends.append(len(blocks) - 1)
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.layers(self.stem(x))).flatten(1)


class ConvNet(StagedEncoder, nn.Module):
    """A small VGG-like encoder: ``len(widths)`` stages of conv-BN-ReLU, each halving the image
    (the last stage pools globally).  Fast on a CPU; the demo's default."""

    def __init__(self, widths=(32, 64, 128), in_channels: int = 3):
        super().__init__()
        stages, cin = [], in_channels
        self._stage_container, self._stage_ends = "features", []
        for i, w in enumerate(widths):
            stages += [nn.Conv2d(cin, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            stages += [nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                stages.append(nn.MaxPool2d(2))
            self._stage_ends.append(len(stages) - 1)  # a stage ends at its max-pool (the last at its ReLU)
            cin = w
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = cin

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.features(x)).flatten(1)


def _resnet(layers, widths):
    def make(in_channels=3, image_size=32, stem=None):
        return ResNet(layers, widths, in_channels, stem or ("cifar" if image_size <= 64 else "imagenet"))

    return make


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": _resnet((2, 2, 2, 2), (64, 128, 256, 512)),
    "resnet34": _resnet((3, 4, 6, 3), (64, 128, 256, 512)),
    "resnet10-small": _resnet((1, 1, 1, 1), (32, 64, 128, 256)),
    "resnet-tiny": _resnet((1, 1, 1), (16, 32, 64)),
    "convnet": lambda in_channels=3, image_size=32, stem=None: ConvNet((32, 64, 128), in_channels),
    "convnet-small": lambda in_channels=3, image_size=32, stem=None: ConvNet((16, 32, 64), in_channels),
    # The pretext methods' default: one conv per stage (16-32-64), so other methods can be
    # compared with them on the same network.
    "small": lambda in_channels=3, image_size=32, stem=None: _pretext_encoder(in_channels),
}


def _pretext_encoder(in_channels: int) -> nn.Module:
    from pyssl.pretext.nets import ConvEncoder  # pretext.nets imports this module

    return ConvEncoder(in_channels, (16, 32, 64))


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


# ---- BatchNorm over sub-batches ------------------------------------------------------------------


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


# ---- heads ---------------------------------------------------------------------------------------


class ProjectionHead(nn.Sequential):
    """Linear layers with BN/ReLU between them, and optionally BN (no affine) after the last.

    ``num_layers=1`` is MoCo v1's linear head; ``num_layers=2`` without BN is MoCo v2's MLP head;
    with BN it is SimCLR's (v2) head."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        num_layers: int = 2,
        batch_norm: bool = True,
        last_bn: bool = False,
    ):
        if num_layers < 1:
            raise ModelError(f"ProjectionHead: num_layers must be >= 1, got {num_layers}")
        layers, d = [], in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(d, hidden_dim, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            d = hidden_dim
        layers.append(nn.Linear(d, out_dim))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)
        self.out_dim = out_dim


def linear_head(in_dim: int, out_dim: int = 128) -> ProjectionHead:
    """MoCo v1: one linear layer."""
    return ProjectionHead(in_dim, out_dim=out_dim, num_layers=1)


def mlp_head(in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, batch_norm: bool = False) -> ProjectionHead:
    """MoCo v2 (``batch_norm=False``) / SimCLR (``batch_norm=True``): Linear-(BN)-ReLU-Linear."""
    return ProjectionHead(in_dim, hidden_dim, out_dim, 2, batch_norm)


class PredictionHead(ProjectionHead):
    """BYOL/SimSiam predictor: Linear-BN-ReLU-Linear on the projection."""

    def __init__(self, in_dim: int = 256, hidden_dim: int = 4096, out_dim: int = 256):
        super().__init__(in_dim, hidden_dim, out_dim, num_layers=2, batch_norm=True)


from pyssl.models.text import TextTransformer  # noqa: E402  (CLIP's text tower)

__all__ = [
    "ResNet",
    "ConvNet",
    "BasicBlock",
    "BACKBONES",
    "build_backbone",
    "ProjectionHead",
    "PredictionHead",
    "linear_head",
    "mlp_head",
    "SplitBatchNorm",
    "ModelError",
    "TextTransformer",
]
