"""Batched, on-device transforms of the self-prediction pretext tasks.

Every function here works on a whole batch ``(N, C, H, W)`` with index arithmetic
(one gather per call), so it runs wherever the batch lives and never loops over images.
Random choices take an optional ``generator`` so tests can replay them.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import torch
from torch import Tensor


def _check_images(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a Tensor of images, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected images of shape (N, C, H, W), got {tuple(x.shape)}")


# --------------------------------------------------------------------------- rotations


@functools.lru_cache(maxsize=32)
def _rotation_index(size: int, device: torch.device) -> Tensor:
    # Flat source index of every output pixel under 0/90/180/270 degree counter-clockwise
    # rotation (torch.rot90 convention): row k is the k-th rotation.
    base = torch.arange(size * size, device=device).view(size, size)
    return torch.stack([torch.rot90(base, k, dims=(0, 1)).reshape(-1) for k in range(4)])


def rotate_all4(x: Tensor) -> tuple[Tensor, Tensor]:
    """All four rotations of every image, in one gather.

    Returns ``(rotated, labels)``: ``rotated`` is ``(4N, C, H, W)`` ordered rotation-major
    (rows ``kN..(k+1)N`` are rotated by ``k * 90`` degrees counter-clockwise, as
    ``torch.rot90(x, k, dims=(2, 3))``), ``labels`` is ``(4N,)`` with ``k``.
    """
    _check_images("rotate_all4", x)
    n, c, h, w = x.shape
    if h != w:
        raise ValueError(f"rotate_all4: rotation by 90 degrees needs square images, got {h}x{w}")
    index = _rotation_index(h, x.device)  # (4, H*W)
    rotated = x.reshape(n, c, h * w)[:, :, index]  # (N, C, 4, H*W): the one gather
    rotated = rotated.permute(2, 0, 1, 3).reshape(4 * n, c, h, w)
    labels = torch.arange(4, device=x.device).repeat_interleave(n)
    return rotated, labels


# --------------------------------------------------------------------------- patch grids


def grid_geometry(size: int, patch: int | None, gap: int, jitter: int, *, task: str, grid: int = 3) -> int:
    """Validate a ``grid x grid`` layout of patches with gaps and jitter; return the patch size.

    Each of the ``grid`` cells along a side is ``size // grid`` pixels; a patch sits inside
    its cell with at least ``gap`` pixels between neighbouring patches plus up to
    ``jitter`` pixels of random shift. Raises ``ValueError`` naming the image size and the
    smallest one that fits when the images are too small.
    """
    min_patch = 2
    if gap < 0 or jitter < 0:
        raise ValueError(f"{task}: gap and jitter must be >= 0, got gap={gap}, jitter={jitter}")
    min_size = grid * (min_patch + gap + 2 * jitter)
    cell = size // grid
    if patch is None:
        patch = cell - gap - 2 * jitter
    if patch < min_patch or patch + gap + 2 * jitter > cell:
        need = grid * (max(patch, min_patch) + gap + 2 * jitter)
        raise ValueError(
            f"{task}: images of {size}x{size} are too small for a {grid}x{grid} grid of "
            f"{max(patch, min_patch)}-pixel patches with gap={gap} and jitter={jitter}; "
            f"the minimum image size is {max(need, min_size)}x{max(need, min_size)}"
        )
    return patch


def _patch_index(size: int, patch: int, origins: Tensor) -> Tensor:
    # origins: (..., 2) top-left (row, col) -> flat pixel indices (..., patch*patch).
    r = torch.arange(patch, device=origins.device)
    rows = origins[..., 0, None, None] + r[:, None]
    cols = origins[..., 1, None, None] + r[None, :]
    return (rows * size + cols).flatten(-2)


def grid_origins(
    n: int,
    size: int,
    patch: int,
    gap: int,
    jitter: int,
    grid: int = 3,
    *,
    device=None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Top-left corners ``(N, grid*grid, 2)`` of the patches, jittered per image and patch.

    The whole grid is also shifted at random inside the image when the cells leave room.
    """
    cell = size // grid
    # Centre the patch in its cell: that leaves gap/2 + jitter on each side, so neighbouring
    # patches stay at least `gap` pixels apart after jitter.
    margin = (cell - patch) // 2
    idx = torch.arange(grid, device=device)
    base = torch.stack(torch.meshgrid(idx, idx, indexing="ij"), dim=-1).reshape(-1, 2) * cell + margin
    slack = size - grid * cell
    shift = torch.randint(0, slack + 1, (n, 1, 2), device=device, generator=generator) if slack else 0
    jit = torch.randint(-jitter, jitter + 1, (n, grid * grid, 2), device=device, generator=generator) if jitter else 0
    return (base + shift + jit).expand(n, grid * grid, 2).clamp(0, size - patch)


def extract_patches(x: Tensor, origins: Tensor, patch: int) -> Tensor:
    """Gather square patches: ``x (N, C, S, S)``, ``origins (N, P, 2)`` -> ``(N, P, C, p, p)``."""
    _check_images("extract_patches", x)
    n, c, h, w = x.shape
    index = _patch_index(w, patch, origins)  # (N, P, p*p)
    flat = x.reshape(n, c, h * w)
    p = origins.shape[1]
    gathered = torch.gather(flat.unsqueeze(1).expand(n, p, c, h * w), 3, index.unsqueeze(2).expand(n, p, c, -1))
    return gathered.reshape(n, p, c, patch, patch)


def sliding_grid(size: int, patch: int, stride: int, min_grid: int, *, task: str) -> int:
    """Validate overlapping ``patch``-pixel patches every ``stride`` pixels; return the grid side G.

    G = ``(size - patch) // stride + 1`` patches fit along each side. Raises ``ValueError``
    naming the image size and the smallest one that fits when fewer than ``min_grid`` do.
    """
    if patch < 2 or stride < 1:
        raise ValueError(f"{task}: patch size must be >= 2 and stride >= 1, got patch={patch}, stride={stride}")
    need = patch + (min_grid - 1) * stride
    if size < need:
        raise ValueError(
            f"{task}: images of {size}x{size} are too small for a {min_grid}x{min_grid} grid of "
            f"{patch}-pixel patches at stride {stride}; the minimum image size is {need}x{need}"
        )
    return _patches_per_side(size, patch, stride)


def _patches_per_side(size: int, patch: int, stride: int) -> int:
    return (size - patch) // stride + 1


def sliding_origins(n: int, size: int, patch: int, stride: int, *, device=None) -> Tensor:
    """Top-left corners ``(N, G*G, 2)`` (row-major) of the overlapping patches of
    :func:`sliding_grid`, centred in the image when the stride leaves pixels over."""
    grid = _patches_per_side(size, patch, stride)
    margin = (size - patch - (grid - 1) * stride) // 2
    idx = torch.arange(grid, device=device) * stride + margin
    base = torch.stack(torch.meshgrid(idx, idx, indexing="ij"), dim=-1).reshape(-1, 2)
    return base.expand(n, grid * grid, 2)


# --------------------------------------------------------------------------- chromatic aberration

# Lenses focus green differently from red and blue, so a patch's colour fringes tell where in
# the frame it was (Doersch et al., 2015): the fringes lie along this green-magenta axis.
_GREEN_MAGENTA = (-1.0, 2.0, -1.0)


def project_out_green_magenta(x: Tensor) -> Tensor:
    """RGB images ``(N, 3, H, W)`` with the green-magenta component of every pixel removed.

    Doersch et al.'s "projection": ``x - (a . x) a`` with ``a = (-1, 2, -1) / sqrt(6)``.
    Grey levels (``a`` is orthogonal to ``(1, 1, 1)``) and the red-blue axis are kept.
    """
    _check_images("project_out_green_magenta", x)
    if x.shape[1] != 3:
        raise ValueError(f"project_out_green_magenta: expected RGB images (3 channels), got {x.shape[1]}")
    a = x.new_tensor(_GREEN_MAGENTA) / 6**0.5
    return x - torch.einsum("nchw,c->nhw", x, a)[:, None] * a.view(1, 3, 1, 1)


def drop_colour_channels(x: Tensor, noise: float = 0.01, *, generator: torch.Generator | None = None) -> Tensor:
    """Doersch et al.'s "colour dropping": every image keeps one random channel; the other
    channels become Gaussian noise with ``noise`` times the kept channel's standard deviation
    (around its mean), so no cross-channel fringe survives. ``(N, C, H, W)`` -> same shape.
    """
    _check_images("drop_colour_channels", x)
    n, c = x.shape[:2]
    keep = torch.randint(0, c, (n,), device=x.device, generator=generator)
    kept = x[torch.arange(n, device=x.device), keep][:, None]  # (N, 1, H, W)
    mean = kept.mean(dim=(2, 3), keepdim=True)
    std = kept.std(dim=(2, 3), keepdim=True, unbiased=False)
    z = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    filler = mean + noise * std * z
    is_kept = torch.arange(c, device=x.device)[None, :] == keep[:, None]
    return torch.where(is_kept[:, :, None, None], x, filler)


# --------------------------------------------------------------------------- jigsaw permutations


@functools.lru_cache(maxsize=16)
def maximal_hamming_permutations(num_permutations: int, num_tiles: int = 9, seed: int = 0) -> Tensor:
    """``P`` permutations of ``num_tiles`` tiles chosen greedily for maximal Hamming distance.

    Noroozi & Favaro's algorithm: start from a random permutation, then repeatedly add the
    permutation whose minimum Hamming distance to the ones chosen so far is largest (ties
    broken at random). Deterministic for a given seed. Returns ``(P, num_tiles)`` int64.
    """
    total = 1
    for k in range(2, num_tiles + 1):
        total *= k
    if not 1 <= num_permutations <= total:
        raise ValueError(f"num_permutations must be in [1, {total}] for {num_tiles} tiles, got {num_permutations}")
    rng = np.random.default_rng(seed)
    perms = np.array(list(itertools.permutations(range(num_tiles))), dtype=np.uint8)
    chosen = [int(rng.integers(total))]
    min_dist = (perms != perms[chosen[0]]).sum(1).astype(np.int16)
    for _ in range(num_permutations - 1):
        best = np.flatnonzero(min_dist == min_dist.max())
        pick = int(best[rng.integers(len(best))])
        chosen.append(pick)
        np.minimum(min_dist, (perms != perms[pick]).sum(1), out=min_dist)
    return torch.from_numpy(perms[chosen].astype(np.int64))


def min_pairwise_hamming(perms: Tensor) -> int:
    d = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    d.fill_diagonal_(perms.shape[1] + 1)
    return int(d.min())


# --------------------------------------------------------------------------- inpainting masks


def region_masks(
    n: int,
    size: int,
    mode: str = "center",
    fraction: float = 0.5,
    *,
    device=None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Boolean masks ``(N, 1, S, S)``, True where pixels are dropped.

    ``"center"``: the central square of side ``fraction * S`` (Pathak et al.'s central
    region); ``"random"``: a square of that side at a random position per image.
    """
    if mode not in ("center", "random"):
        raise ValueError(f"mask mode must be 'center' or 'random', got {mode!r}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"mask fraction must be in (0, 1), got {fraction}")
    side = max(1, int(round(fraction * size)))
    if mode == "center":
        top = torch.full((n, 2), (size - side) // 2, device=device)
    else:
        top = torch.randint(0, size - side + 1, (n, 2), device=device, generator=generator)
    r = torch.arange(size, device=device)
    rows = (r >= top[:, 0, None]) & (r < top[:, 0, None] + side)
    cols = (r >= top[:, 1, None]) & (r < top[:, 1, None] + side)
    return (rows[:, :, None] & cols[:, None, :]).unsqueeze(1)
