"""Batched sRGB <-> CIE Lab conversion and the quantised ab colour space of colorization.

Pure PyTorch, any float dtype, any device, channel dimension ``dim`` (default -3, so NCHW
and CHW both work). Constants are CIE's: D65 white point, 2 degree observer, the sRGB
companding curve, and the Lab non-linearity with its linear segment below
:math:`(6/29)^3`. Float64 inputs give float64 outputs; lower precisions compute in float32.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

# sRGB primaries -> XYZ (D65), the same matrix scikit-image uses.
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_D65_WHITE = (0.95047, 1.0, 1.08883)
_DELTA = 6.0 / 29.0

#: Range of the ab channels that sRGB colours reach (about [-86, 98] x [-108, 95]).
AB_RANGE = 110.0


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check(name: str, x: Tensor, dim: int) -> int:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{name}: expected a tensor with a channel dimension, got a scalar")
    d = dim % x.dim()
    if x.shape[d] != 3:
        raise ValueError(f"{name}: expected 3 channels in dimension {dim}, got shape {tuple(x.shape)}")
    return d


def _matmul_channels(x: Tensor, matrix: Tensor, d: int) -> Tensor:
    # Contract the channel dimension with a 3x3 matrix without moving it.
    return torch.tensordot(x.movedim(d, -1), matrix.t(), dims=1).movedim(-1, d)


def _channel_shape(x: Tensor, d: int) -> list[int]:
    shape = [1] * x.dim()
    shape[d] = 3
    return shape


def rgb_to_lab(rgb: Tensor, dim: int = -3) -> Tensor:
    """sRGB in [0, 1] -> CIE Lab (L in [0, 100], a and b roughly in [-110, 110]).

    Integer (uint8) input is read as 0..255.
    """
    d = _check("rgb_to_lab", rgb, dim)
    if not rgb.is_floating_point():
        rgb = rgb.to(torch.float32) / 255.0
    out_dtype = rgb.dtype
    x = rgb.to(_work_dtype(rgb))
    linear = torch.where(x > 0.04045, ((x.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4, x / 12.92)
    m = torch.tensor(_XYZ_FROM_RGB, dtype=x.dtype, device=x.device)
    white = torch.tensor(_D65_WHITE, dtype=x.dtype, device=x.device).view(_channel_shape(x, d))
    t = _matmul_channels(linear, m, d) / white
    f = torch.where(
        t > _DELTA**3,
        t.clamp_min(_DELTA**3) ** (1.0 / 3.0),
        t / (3 * _DELTA**2) + 4.0 / 29.0,
    )
    fx, fy, fz = f.unbind(d)
    lab = torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=d)
    return lab.to(out_dtype)


def lab_to_rgb(lab: Tensor, dim: int = -3, clip: bool = True) -> Tensor:
    """CIE Lab -> sRGB in [0, 1] (clipped to the gamut unless ``clip=False``)."""
    d = _check("lab_to_rgb", lab, dim)
    if not lab.is_floating_point():
        raise TypeError(f"lab_to_rgb: expected a floating tensor, got {lab.dtype}")
    out_dtype = lab.dtype
    x = lab.to(_work_dtype(lab))
    lightness, a, b = x.unbind(d)
    fy = (lightness + 16.0) / 116.0
    f = torch.stack((fy + a / 500.0, fy, fy - b / 200.0), dim=d)
    t = torch.where(f > _DELTA, f**3, 3 * _DELTA**2 * (f - 4.0 / 29.0))
    white = torch.tensor(_D65_WHITE, dtype=x.dtype, device=x.device).view(_channel_shape(x, d))
    xyz = (t * white).clamp_min(0.0)
    m_inv = torch.linalg.inv(torch.tensor(_XYZ_FROM_RGB, dtype=torch.float64)).to(x.dtype).to(x.device)
    linear = _matmul_channels(xyz, m_inv, d)
    rgb = torch.where(
        linear > 0.0031308,
        1.055 * linear.clamp_min(0.0031308) ** (1.0 / 2.4) - 0.055,
        12.92 * linear,
    )
    if clip:
        rgb = rgb.clamp(0.0, 1.0)
    return rgb.to(out_dtype)


@functools.lru_cache(maxsize=8)
def _in_gamut_bins(grid: float, samples: int = 64) -> tuple[tuple[float, float], ...]:
    # A bin is in gamut when some sRGB colour falls in it; sample the RGB cube densely.
    axis = torch.linspace(0.0, 1.0, samples, dtype=torch.float64)
    cube = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=0).reshape(3, -1)
    ab = rgb_to_lab(cube, dim=0)[1:]
    cells = torch.round(ab / grid).to(torch.int64)
    unique = torch.unique(cells, dim=1)
    return tuple((float(i) * grid, float(j) * grid) for i, j in unique.t().tolist())


class ABQuantizer:
    """The in-gamut ab bins of Zhang et al. (2016): a square grid of spacing ``grid``.

    ``centers`` is ``(Q, 2)``; with ``grid=10`` Q is about 300 (313 in the paper, whose
    gamut test differs slightly). :meth:`encode` maps ab values to the nearest bin,
    :meth:`soft_encode` spreads each value over its ``k`` nearest bins with a Gaussian of
    width ``sigma``, :meth:`decode` takes the annealed mean of a distribution over bins.
    """

    def __init__(self, grid: float = 10.0):
        if not grid > 0:
            raise ValueError(f"ABQuantizer: grid must be > 0, got {grid}")
        self.grid = float(grid)
        self.centers = torch.tensor(_in_gamut_bins(self.grid), dtype=torch.float32)
        # Look-up table on a 10x finer grid: fine cell -> nearest in-gamut bin; the chosen bin is
        # at most grid / 10 * sqrt(2) farther from a value than the truly nearest one.
        self._step = self.grid / 10
        half = int(round((AB_RANGE + self.grid) / self._step))
        self._half = half
        cells = torch.arange(-half, half + 1, dtype=torch.float32) * self._step
        grid_ab = torch.stack(torch.meshgrid(cells, cells, indexing="ij"), dim=-1).reshape(-1, 2)
        self._lut = torch.cdist(grid_ab, self.centers).argmin(dim=1).reshape(2 * half + 1, 2 * half + 1)
        self._kernels: dict[tuple[float, torch.device], Tensor] = {}

    @property
    def num_bins(self) -> int:
        return self.centers.shape[0]

    def encode(self, ab: Tensor, dim: int = -3) -> Tensor:
        """ab ``(..., 2, ...)`` -> nearest bin index (the channel dimension removed), int64."""
        if ab.shape[dim] != 2:
            raise ValueError(f"ABQuantizer.encode: expected 2 channels in dimension {dim}, got {tuple(ab.shape)}")
        cell = torch.round(ab / self._step).to(torch.int64).clamp(-self._half, self._half) + self._half
        ia, ib = cell.unbind(dim)
        lut = self._lut.to(ab.device)
        return lut[ia, ib]

    def soft_encode(self, ab: Tensor, k: int = 5, sigma: float = 5.0, dim: int = -3) -> Tensor:
        """Soft targets ``(..., Q, ...)``: Gaussian weights on the ``k`` nearest bins."""
        x = ab.movedim(dim, -1)
        centers = self.centers.to(device=ab.device, dtype=ab.dtype)
        dist2 = ((x.unsqueeze(-2) - centers) ** 2).sum(-1)
        near, idx = dist2.topk(k, dim=-1, largest=False)
        w = torch.softmax(-near / (2 * sigma**2), dim=-1)
        out = torch.zeros(*x.shape[:-1], self.num_bins, dtype=ab.dtype, device=ab.device)
        out.scatter_(-1, idx, w)
        return out.movedim(-1, dim)

    def rebalance_weights(self, counts: Tensor, lam: float = 0.5, sigma: float = 5.0) -> Tensor:
        """Zhang et al.'s class-rebalancing weight of every bin, ``(Q,)``.

        ``counts`` (``(Q,)``, how often each bin was the true colour) gives the empirical
        distribution, smoothed with a Gaussian of width ``sigma`` over the bin centres; the
        weight is ``1 / ((1 - lam) * p + lam / Q)``, scaled so its expectation under ``p``
        is 1 (the loss keeps its size). ``lam = 1`` weighs every bin alike; small ``lam`` comes
        near full inverse-frequency weighting (``lam > 0`` keeps unseen bins finite). Without counts yet, every weight is 1.
        """
        if counts.shape != (self.num_bins,):
            raise ValueError(f"rebalance_weights: counts must have shape ({self.num_bins},), got {tuple(counts.shape)}")
        if not 0.0 < lam <= 1.0 or not sigma > 0:
            raise ValueError(f"rebalance_weights: need 0 < lam <= 1 and sigma > 0, got lam={lam}, sigma={sigma}")
        total = counts.sum()
        if total <= 0:
            return torch.ones_like(counts, dtype=torch.float32)
        p = (counts.double() / total) @ self._smoothing_kernel(float(sigma), counts.device)
        w = 1.0 / ((1 - lam) * p + lam / self.num_bins)
        return (w / (p * w).sum()).float()

    def _smoothing_kernel(self, sigma: float, device: torch.device) -> Tensor:
        # Fixed by the bins and sigma: built once, not at every training step that rebalances.
        key = (sigma, device)
        if key not in self._kernels:
            centers = self.centers.to(device=device, dtype=torch.float64)
            kernel = torch.exp(-(torch.cdist(centers, centers) ** 2) / (2 * sigma**2))
            self._kernels[key] = kernel / kernel.sum(dim=1, keepdim=True)  # each bin's mass spreads over its neighbours
        return self._kernels[key]

    def decode(self, logits: Tensor, temperature: float = 0.38, dim: int = -3) -> Tensor:
        """Annealed mean of the bin distribution: logits ``(..., Q, ...)`` -> ab ``(..., 2, ...)``."""
        p = torch.softmax(logits.movedim(dim, -1).float() / temperature, dim=-1)
        return (p @ self.centers.to(p.device)).movedim(-1, dim)
