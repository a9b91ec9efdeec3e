"""The SimCLR / MoCo v2 / BYOL augmentation pipeline as one fused op per batch.

Per-image random parameters are drawn on the images' device (one ``torch.rand`` call, so a
seeded ``generator`` reproduces them on that device), then ``torch.ops.pyssl.augment_fused``
applies crop -> flip -> colour jitter -> grayscale -> blur -> solarize -> normalise. uint8 input
is scaled to [0, 1] when read and the whole chain runs in float32 without re-quantising, so
the output equals the composition of :mod:`pyssl.augment.functional` ops applied to
``images / 255`` with the same parameters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor, nn

from pyssl import ops
from pyssl.augment import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before the central fallback
# Columns of the one uniform draw per image: crop (area, log-ratio, top, left) x attempts, then
# flip, jitter-applied, 4 jitter factors, 4 order keys, gray, blur-applied, sigma, solarize.
_FLIP = 4 * _CROP_ATTEMPTS
_JITTER = _FLIP + 1
_FACTORS = _JITTER + 1
_ORDER = _FACTORS + 4
_GRAY = _ORDER + 4
_BLUR = _GRAY + 1
_SIGMA = _BLUR + 1
_SOLARIZE = _SIGMA + 1
_UNIFORM_COLUMNS = _SOLARIZE + 1


@dataclasses.dataclass
class AugmentParams:
    """The per-image parameters one fused call applies (N output images).

    Attributes:
        source_index: (N,) int64, the input image each output image is made from.
        crop_boxes: (N, 4) int64, (top, left, height, width) in input pixels.
        flip: (N,) bool, mirror left-right.
        jitter_factors: (N, 4) float32, brightness, contrast, saturation, hue; identity
            (1, 1, 1, 0) where colour jitter is not applied.
        jitter_order: (N, 4) int64, the order the four jitter ops run in (0 brightness,
            1 contrast, 2 saturation, 3 hue).
        gray: (N,) bool, convert to grayscale (kept as C channels).
        blur_sigma: (N,) float32, Gaussian blur sigma; 0: no blur.
        blur_kernel_size: (N,) int64, odd kernel size (1 where there is no blur).
        solarize_threshold: (N,) float32, invert values >= threshold (in [0, 1] units);
            +inf: no solarization.
    """

    source_index: Tensor
    crop_boxes: Tensor
    flip: Tensor
    jitter_factors: Tensor
    jitter_order: Tensor
    gray: Tensor
    blur_sigma: Tensor
    blur_kernel_size: Tensor
    solarize_threshold: Tensor

    def __len__(self) -> int:
        return self.source_index.shape[0]

    @staticmethod
    def cat(parts: Sequence[AugmentParams]) -> AugmentParams:
        return AugmentParams(
            *(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(AugmentParams))
        )

    def split(self, n: int) -> list[AugmentParams]:
        """n equal parts (the views of :meth:`SimCLRAugment.views`)."""
        fields = [getattr(self, f.name).chunk(n) for f in dataclasses.fields(AugmentParams)]
        return [AugmentParams(*part) for part in zip(*fields)]

    def to(self, device) -> AugmentParams:
        return AugmentParams(*(getattr(self, f.name).to(device) for f in dataclasses.fields(AugmentParams)))


def _pair(op: str, name: str, value, low: float = -math.inf, high: float = math.inf) -> tuple[float, float]:
    if isinstance(value, Real) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, Real) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"{op}: {name} must be a pair (min, max) of numbers, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not (low <= lo <= hi <= high):
        raise ValueError(f"{op}: {name} must satisfy {low} <= min <= max <= {high}, got {value!r}")
    return lo, hi


def _probability(op: str, name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, Real) or not (0.0 <= float(p) <= 1.0):
        raise ValueError(f"{op}: {name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _odd_kernel(size: int) -> int:
    """SimCLR's blur kernel: 10% of the image side, made odd."""
    k = max(int(0.1 * size), 1)
    return k if k % 2 == 1 else k + 1


class SimCLRAugment(nn.Module):
    r"""Random augmentation of a batch of images in one fused kernel (two passes over the output).

    For each image: a random resized crop (area fraction ``scale``, aspect ratio ``ratio``,
    torchvision's RandomResizedCrop sampling, bilinear without antialias) to ``size``, a
    horizontal flip with probability ``p_flip``, with probability ``p_jitter`` colour jitter
    (brightness, contrast, saturation factors uniform in ``[max(0, 1 - j), 1 + j]``, hue shift
    uniform in ``[-j_hue, j_hue]``, applied in a random order like torchvision's ColorJitter, or
    the fixed order brightness, contrast, saturation, hue with ``jitter_order="fixed"``),
    grayscale with probability ``p_gray``, Gaussian blur with probability ``p_blur`` (sigma
    uniform in ``sigma``; kernel size ``blur_kernel_size`` or ``2 ceil(3 sigma) + 1``; reflect
    padding), solarization (threshold in [0, 1] units) with probability ``p_solarize`` and
    normalisation by ``mean`` / ``std`` (``None``: none).

    Args:
        size: output size, an int or (height, width).
        scale, ratio: RandomResizedCrop's area-fraction and aspect-ratio ranges.
        jitter: (brightness, contrast, saturation, hue) strengths; 0 disables one.
        dtype: output dtype, float32, float16 or bfloat16.
        channels_last: return channels-last (NHWC memory) tensors.

    Shape:
        - images: (B, C, H, W), C in {1, 3}, uint8 (0..255) or floating (0..1), any size.
        - output: (B, C, size[0], size[1]) of ``dtype``.

    Example:
        >>> aug = SimCLRAugment.simclr(224)
        >>> view0, view1 = aug.views(images_uint8)  # two views, one launch
    """

    def __init__(
        self,
        size,
        scale=(0.08, 1.0),
        jitter=(0.4, 0.4, 0.4, 0.1),
        p_jitter: float = 0.8,
        p_gray: float = 0.2,
        p_blur: float = 0.5,
        sigma=(0.1, 2.0),
        p_solarize: float = 0.0,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        *,
        ratio=(3.0 / 4.0, 4.0 / 3.0),
        p_flip: float = 0.5,
        blur_kernel_size: int | None = None,
        solarize_threshold: float = 0.5,
        jitter_order: str = "random",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ):
        super().__init__()
        op = type(self).__name__
        self.size = F._check_size(op, size)
        self.scale = _pair(op, "scale", scale, 0.0, math.inf)
        if self.scale[1] <= 0:
            raise ValueError(f"{op}: scale must allow a positive area, got {scale!r}")
        self.ratio = _pair(op, "ratio", ratio, 0.0, math.inf)
        if self.ratio[0] <= 0:
            raise ValueError(f"{op}: ratio must be > 0, got {ratio!r}")
        if not isinstance(jitter, (tuple, list)) or len(jitter) != 4:
            raise ValueError(f"{op}: jitter must be (brightness, contrast, saturation, hue), got {jitter!r}")
        for name, value in zip(("brightness", "contrast", "saturation", "hue"), jitter):
            if isinstance(value, bool) or not isinstance(value, Real) or not value >= 0:
                raise ValueError(f"{op}: jitter {name} must be a number >= 0, got {value!r}")
        if jitter[3] > 0.5:
            raise ValueError(f"{op}: jitter hue must be <= 0.5, got {jitter[3]}")
        self.jitter = tuple(float(v) for v in jitter)
        self.p_jitter = _probability(op, "p_jitter", p_jitter)
        self.p_gray = _probability(op, "p_gray", p_gray)
        self.p_blur = _probability(op, "p_blur", p_blur)
        self.p_solarize = _probability(op, "p_solarize", p_solarize)
        self.p_flip = _probability(op, "p_flip", p_flip)
        self.sigma = _pair(op, "sigma", sigma, 0.0, math.inf)
        if self.p_blur > 0 and self.sigma[0] <= 0:
            raise ValueError(f"{op}: sigma must be > 0, got {sigma!r}")
        if blur_kernel_size is not None and (
            isinstance(blur_kernel_size, bool)
            or not isinstance(blur_kernel_size, int)
            or blur_kernel_size < 1
            or blur_kernel_size % 2 == 0
            or blur_kernel_size > F.MAX_KERNEL_SIZE
        ):
            raise ValueError(
                f"{op}: blur_kernel_size must be an odd int in [1, {F.MAX_KERNEL_SIZE}] or None, got {blur_kernel_size!r}"
            )
        self.blur_kernel_size = blur_kernel_size
        if (
            isinstance(solarize_threshold, bool)
            or not isinstance(solarize_threshold, Real)
            or math.isnan(solarize_threshold)
        ):
            raise ValueError(f"{op}: solarize_threshold must be a number, got {solarize_threshold!r}")
        self.solarize_threshold = float(solarize_threshold)
        if jitter_order not in ("random", "fixed"):
            raise ValueError(f"{op}: jitter_order must be 'random' or 'fixed', got {jitter_order!r}")
        self.jitter_order = jitter_order
        if (mean is None) != (std is None):
            raise ValueError(f"{op}: give both mean and std, or neither")
        if mean is not None:
            mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
            if len(mean) not in (1, 3) or len(mean) != len(std):
                raise ValueError(f"{op}: mean and std need 1 or 3 values each, got {mean} and {std}")
            if any(s == 0 or not math.isfinite(s) for s in std) or not all(map(math.isfinite, mean)):
                raise ValueError(f"{op}: std must be finite and non-zero, mean finite, got {mean} and {std}")
        self.mean, self.std = mean, std
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{op}: dtype must be float32, float16 or bfloat16, got {dtype}")
        self.dtype = dtype
        self.channels_last = bool(channels_last)

    # ---- presets -------------------------------------------------------------------------------

    @classmethod
    def simclr(cls, size, strength: float = 1.0, **overrides) -> SimCLRAugment:
        """SimCLR (Chen et al. 2020): jitter 0.8 s (hue 0.2 s), blur kernel 10% of the side."""
        side = size if isinstance(size, int) else min(size)
        s = strength
        kwargs = dict(
            scale=(0.08, 1.0),
            jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s),
            p_jitter=0.8,
            p_gray=0.2,
            p_blur=0.5,
            sigma=(0.1, 2.0),
            blur_kernel_size=_odd_kernel(side),
        )
        kwargs.update(overrides)
        return cls(size, **kwargs)

    @classmethod
    def mocov2(cls, size, **overrides) -> SimCLRAugment:
        """MoCo v2 (Chen et al. 2020): crop scale (0.2, 1), jitter 0.4/0.4/0.4/0.1, blur sigma
        (0.1, 2) with a +-3 sigma kernel (PIL's radius-sigma blur)."""
        kwargs = dict(
            scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2, p_blur=0.5, sigma=(0.1, 2.0)
        )
        kwargs.update(overrides)
        return cls(size, **kwargs)

    # ---- parameters ----------------------------------------------------------------------------

    def draw_params(
        self, batch: int, height: int, width: int, device=None, generator: torch.Generator | None = None
    ) -> AugmentParams:
        """Draws the parameters of ``batch`` images of ``height`` x ``width`` on ``device``."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        u = torch.rand((batch, _UNIFORM_COLUMNS), generator=generator, device=device)
        a = _CROP_ATTEMPTS
        crop_boxes = ops.augment_draw_crops(u[:, : 4 * a], height, width, self.scale, self.ratio)
        flip = u[:, _FLIP] < self.p_flip

        lo, hi, identity = self._constants("jitter_ranges", device, self._jitter_ranges)
        factors = lo + (hi - lo) * u[:, _FACTORS : _FACTORS + 4]
        jittered = (u[:, _JITTER] < self.p_jitter).unsqueeze(1)
        jitter_factors = torch.where(jittered & (hi > lo), factors, identity)
        if self.jitter_order == "random":
            jitter_order = u[:, _ORDER : _ORDER + 4].argsort(dim=1)
        else:
            jitter_order = torch.arange(4, device=device).expand(batch, 4).contiguous()

        gray = u[:, _GRAY] < self.p_gray
        blurred = u[:, _BLUR] < self.p_blur
        # Clamped: float32 rounding could land one ulp above sigma_max.
        sigma = (self.sigma[0] + (self.sigma[1] - self.sigma[0]) * u[:, _SIGMA]).clamp(self.sigma[0], self.sigma[1])
        blur_sigma = torch.where(blurred, sigma, torch.zeros_like(sigma))
        if self.blur_kernel_size is None:
            ksize = F.kernel_size_for(blur_sigma)
        else:
            ksize = torch.full((batch,), self.blur_kernel_size, dtype=torch.long, device=device)
        blur_kernel_size = torch.where(blurred, ksize, torch.ones_like(ksize))
        solarized = u[:, _SOLARIZE] < self.p_solarize
        solarize_threshold = torch.where(
            solarized, torch.full_like(sigma, self.solarize_threshold), torch.full_like(sigma, math.inf)
        )
        return AugmentParams(
            source_index=torch.arange(batch, device=device),
            crop_boxes=crop_boxes,
            flip=flip,
            jitter_factors=jitter_factors.float().contiguous(),
            jitter_order=jitter_order,
            gray=gray,
            blur_sigma=blur_sigma.float(),
            blur_kernel_size=blur_kernel_size,
            solarize_threshold=solarize_threshold.float(),
        )

    def _constants(self, key, device, make):
        """Small constant tensors, built once per device: creating them on a GPU for every call
        would copy from pageable host memory each time."""
        cache = self.__dict__.setdefault("_constant_cache", {})
        device = torch.device(device)
        if (key, device) not in cache:
            cache[(key, device)] = tuple(t.to(device) for t in make())
        return cache[(key, device)]

    def _jitter_ranges(self):
        b, c, s, h = self.jitter
        lo = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
        hi = torch.tensor([1 + b, 1 + c, 1 + s, h])
        return lo, hi, torch.tensor([1.0, 1.0, 1.0, 0.0])

    def _mean_std(self, channels: int, device) -> tuple[Tensor, Tensor]:
        return self._constants(("mean_std", channels), device, lambda: self._make_mean_std(channels))

    def _make_mean_std(self, channels: int) -> tuple[Tensor, Tensor]:
        device = "cpu"
        if self.mean is None:
            empty = torch.empty(0, device=device)
            return empty, empty
        mean, std = self.mean, self.std
        if len(mean) != channels:
            if len(mean) == 3 and channels == 1 and (mean, std) == (IMAGENET_MEAN, IMAGENET_STD):
                # The default ImageNet statistics seen through the grayscale (luma) weights.
                mean = (sum(w * m for w, m in zip(F.LUMA, mean)),)
                std = (sum(w * s for w, s in zip(F.LUMA, std)),)
            else:
                raise ValueError(
                    f"{type(self).__name__}: mean/std have {len(mean)} values but the images {channels} channels"
                )
        return (
            torch.tensor(mean, dtype=torch.float32, device=device),
            torch.tensor(std, dtype=torch.float32, device=device),
        )

    def kernel_bound(self) -> int:
        """The largest blur kernel this augmentation draws."""
        if self.blur_kernel_size is not None:
            return self.blur_kernel_size
        # The draws are float32 and clamped to float32(sigma_max): the same value gives the bound.
        return int(F.kernel_size_for(torch.tensor([self.sigma[1]], dtype=torch.float32))[0])

    def apply(self, images: Tensor, params: AugmentParams, *, blur_kernel_bound: int = -1) -> Tensor:
        """Applies given parameters (from :meth:`draw_params`) in one fused call.
        ``blur_kernel_bound``: an upper bound on ``params.blur_kernel_size`` where blurred
        (spares the CUDA kernel a device sync to find it; -1: unknown)."""
        F.check_images(type(self).__name__, images)
        mean, std = self._mean_std(images.shape[1], images.device)
        p = params
        if len(p) == 0:
            # No view to make (an empty batch): the fused op wants images; the answer is known.
            layout = torch.channels_last if self.channels_last else torch.contiguous_format
            shape = (0, images.shape[1], self.size[0], self.size[1])
            return torch.empty(shape, dtype=self.dtype, device=images.device, memory_format=layout)
        return ops.augment_fused(
            # Data augmentation: no gradient flows through it.
            images.detach(),
            p.source_index,
            p.crop_boxes,
            p.flip,
            p.jitter_factors,
            p.jitter_order,
            p.gray,
            p.blur_sigma,
            p.blur_kernel_size,
            p.solarize_threshold,
            mean,
            std,
            self.size[0],
            self.size[1],
            self.dtype,
            self.channels_last,
            blur_kernel_bound,
        )

    def forward(self, images: Tensor, generator: torch.Generator | None = None, return_params: bool = False):
        F.check_images(type(self).__name__, images)
        batch, _, height, width = images.shape
        params = self.draw_params(batch, height, width, images.device, generator)
        out = self.apply(images, params, blur_kernel_bound=self.kernel_bound())
        return (out, params) if return_params else out

    def views(self, images: Tensor, n: int = 2, generator: torch.Generator | None = None, return_params: bool = False):
        """``n`` independently augmented views of every image, made in one fused call."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{type(self).__name__}.views: n must be a positive int, got {n!r}")
        return MultiViewAugment([self] * n)(images, generator=generator, return_params=return_params)

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, scale={self.scale}, jitter={self.jitter}, p_jitter={self.p_jitter}, "
            f"p_gray={self.p_gray}, p_blur={self.p_blur}, sigma={self.sigma}, p_solarize={self.p_solarize}, "
            f"jitter_order={self.jitter_order!r}, dtype={self.dtype}"
        )


class MultiViewAugment(nn.Module):
    """Several (possibly different) augmentations of one batch in a single fused call; returns
    one tensor per augmentation. They must share output size, mean/std, dtype and layout."""

    def __init__(self, augments: Sequence[SimCLRAugment]):
        super().__init__()
        augments = list(augments)
        if not augments or not all(isinstance(a, SimCLRAugment) for a in augments):
            raise ValueError("MultiViewAugment: needs one or more SimCLRAugment")
        first = augments[0]
        for a in augments[1:]:
            if (a.size, a.mean, a.std, a.dtype, a.channels_last) != (
                first.size,
                first.mean,
                first.std,
                first.dtype,
                first.channels_last,
            ):
                raise ValueError(
                    "MultiViewAugment: the augmentations must share size, mean, std, dtype and channels_last"
                )
        self.augments = augments

    def forward(self, images: Tensor, generator: torch.Generator | None = None, return_params: bool = False):
        first = self.augments[0]
        F.check_images(type(self).__name__, images)
        batch, _, height, width = images.shape
        params = AugmentParams.cat(
            [a.draw_params(batch, height, width, images.device, generator) for a in self.augments]
        )
        out = first.apply(images, params, blur_kernel_bound=max(a.kernel_bound() for a in self.augments))
        views = list(out.chunk(len(self.augments)))
        return (views, params.split(len(self.augments))) if return_params else views


def byol_pair(size, **overrides) -> MultiViewAugment:
    """BYOL's asymmetric pair (Grill et al. 2020): both views crop (0.08, 1), flip, jitter
    0.4/0.4/0.2/0.1 with p 0.8, gray 0.2; view 1 always blurred, view 2 blurred with p 0.1 and
    solarized with p 0.2. Blur kernel 10% of the side (23 at 224)."""
    side = size if isinstance(size, int) else min(size)
    common = dict(
        scale=(0.08, 1.0),
        jitter=(0.4, 0.4, 0.2, 0.1),
        p_jitter=0.8,
        p_gray=0.2,
        sigma=(0.1, 2.0),
        blur_kernel_size=_odd_kernel(side),
    )
    common.update(overrides)
    first = SimCLRAugment(size, **{**common, "p_blur": 1.0, "p_solarize": 0.0})
    second = SimCLRAugment(size, **{**common, "p_blur": 0.1, "p_solarize": 0.2})
    return MultiViewAugment([first, second])
