"""Embedded colour data: photo crops, colour-rendered digits, synthetic videos. No downloads.

The two colour photographs scikit-learn ships (``sklearn.datasets.load_sample_images``:
a temple in China and a flower, 427x640) give natural colour statistics and textures;
scikit-learn's 8x8 digits give labels. Everything is generated deterministically from a
seed as uint8 tensors, on the requested device, with batched ``grid_sample`` (no
per-image Python loops over pixels).

* :func:`photo_crops`: random scaled, flipped crops of the photographs (no labels).
* :func:`colour_digits`: every digit upsampled to ``size``, drawn in a colour whose hue
  depends on the class (plus jitter) over a dimmed photo crop. Predicting a digit's colour
  from its lightness therefore needs recognising the digit, which is what makes this a
  useful toy target for colorization-style pretext tasks; the labels are the digit classes.
* :func:`synthetic_videos`: textured coloured shapes moving over a panning photo
  background, with per-pixel object ids for label/mask propagation.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pyssl.data.captions import COLOUR_HUES, digit_captions, tokenize
from pyssl.data.dataset import DataError, ImageDataset


@functools.lru_cache(maxsize=1)
def _photos_cpu() -> Tensor:
    from sklearn.datasets import load_sample_images

    images = load_sample_images().images  # two (427, 640, 3) uint8 arrays
    return torch.stack([torch.from_numpy(im.copy()) for im in images]).permute(0, 3, 1, 2).contiguous()


def sample_photos(device=None) -> Tensor:
    """The two bundled photographs as ``(2, 3, 427, 640)`` uint8."""
    return _photos_cpu().to(device)


def _affine_crops(photos: Tensor, which: Tensor, theta: Tensor, size: int) -> Tensor:
    # One grid_sample per photo (two photos) covers all crops.
    grid = F.affine_grid(theta, [theta.shape[0], 3, size, size], align_corners=False)
    out = torch.empty(theta.shape[0], 3, size, size, device=photos.device)
    src = photos.float() / 255.0
    for p in range(src.shape[0]):
        sel = which == p
        if sel.any():
            out[sel] = F.grid_sample(
                src[p : p + 1].expand(int(sel.sum()), -1, -1, -1),
                grid[sel],
                mode="bilinear",
                padding_mode="reflection",
                align_corners=False,
            )
    return out


def _crop_thetas(
    n: int, size: int, min_scale: float, max_scale: float, gen: torch.Generator, device, pan: Tensor | None = None
):
    # Affine maps from output to photo coordinates ([-1, 1] normalised): crop side is
    # `scale * size` photo pixels, random centre, random horizontal flip.
    h, w = 427, 640
    scale = min_scale * (max_scale / min_scale) ** torch.rand(n, generator=gen)
    sx = scale * size / w
    sy = scale * size / h
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sx)
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sy)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = sx * flip
    theta[:, 1, 1] = sy
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    which = torch.randint(0, 2, (n,), generator=gen)
    return theta.to(device), which.to(device), (sx, sy)


def _check_size(name: str, size: int, minimum: int = 8) -> None:
    if not isinstance(size, int) or size < minimum:
        raise ValueError(f"{name}: size must be an int >= {minimum}, got {size!r}")


def photo_crops(
    n: int = 2048, size: int = 32, seed: int = 0, min_scale: float = 1.0, max_scale: float = 4.0, device=None
) -> Tensor:
    """``n`` random crops of the photographs, resized to ``size`` x ``size``: uint8 ``(n, 3, S, S)``.

    A crop covers ``scale * size`` photo pixels with ``scale`` log-uniform in
    ``[min_scale, max_scale]``, at a random place, flipped horizontally half the time.
    """
    _check_size("photo_crops", size)
    gen = torch.Generator().manual_seed(seed)
    theta, which, _ = _crop_thetas(n, size, min_scale, max_scale, gen, device)
    crops = _affine_crops(sample_photos(device), which, theta, size)
    return (crops * 255).round().clamp(0, 255).to(torch.uint8)


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    # h, s, v in [0, 1], shape (N,) -> (N, 3)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=-1)
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


@functools.lru_cache(maxsize=1)
def _digits_cpu() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.from_numpy(d.images).float() / 16.0, torch.from_numpy(d.target).long()


def _render_digits(size: int, gen: torch.Generator, hue_of) -> tuple[Tensor, Tensor, Tensor]:
    # The scikit-learn digits painted in the hue ``hue_of(labels)`` picks (drawing from ``gen``),
    # over dimmed photo crops: (images uint8, labels, photo index of each background).
    digits, labels = _digits_cpu()
    n = digits.shape[0]
    alpha = F.interpolate(digits[:, None], size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    # Random shift of up to size/8 pixels, so position is not fixed.
    shift = size // 8
    if shift:
        dx = torch.randint(-shift, shift + 1, (n,), generator=gen)
        dy = torch.randint(-shift, shift + 1, (n,), generator=gen)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = 1
        theta[:, 1, 1] = 1
        theta[:, 0, 2] = -2 * dx.float() / size
        theta[:, 1, 2] = -2 * dy.float() / size
        grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
        alpha = F.grid_sample(alpha, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    hue = hue_of(labels)
    sat = 0.65 + 0.35 * torch.rand(n, generator=gen)
    val = 0.85 + 0.15 * torch.rand(n, generator=gen)
    fg = _hsv_to_rgb(hue, sat, val)[:, :, None, None]
    theta, which, _ = _crop_thetas(n, size, 1.0, 4.0, gen, "cpu")
    bg = _affine_crops(sample_photos("cpu"), which, theta, size)
    bg = 0.2 + 0.45 * bg
    img = alpha * fg + (1 - alpha) * bg
    images = (img * 255).round().clamp(0, 255).to(torch.uint8)
    return images, labels, which


def colour_digits(size: int = 32, seed: int = 0, device=None) -> tuple[Tensor, Tensor]:
    """All 1797 scikit-learn digits rendered in colour: ``(images uint8 (N, 3, S, S), labels (N,))``.

    The digit (bilinearly upsampled from 8x8) is painted in a bright colour whose hue is
    ``class / 10`` plus Gaussian jitter (sd 0.03), over a photo crop dimmed to the middle
    of the range, and the result is shifted by a few pixels at random.
    """
    _check_size("colour_digits", size)
    gen = torch.Generator().manual_seed(seed)
    images, labels, _ = _render_digits(
        size, gen, lambda labels: (labels.float() / 10 + 0.03 * torch.randn(len(labels), generator=gen)) % 1.0
    )
    return images.to(device), labels.to(device)


def captioned_digits(size: int = 32, seed: int = 0, device=None) -> tuple[Tensor, Tensor, list[str], dict[str, Tensor]]:
    """Image-text pairs: all 1797 digits, each painted in one of eight named colours (chosen
    independently of the class, hue jitter sd 0.015) over a crop of one of the two photographs,
    with a caption naming the digit and sometimes its colour and background
    (:func:`pyssl.data.captions.digit_captions`).

    Returns ``(images uint8 (N, 3, S, S), labels (N,), captions, {"colour": (N,), "background": (N,)})``;
    the attribute tensors index :data:`~pyssl.data.captions.COLOUR_NAMES` and
    :data:`~pyssl.data.captions.BACKGROUND_NAMES`.
    """

    _check_size("captioned_digits", size)
    gen = torch.Generator().manual_seed(seed)
    colours = torch.empty(0, dtype=torch.long)

    def hue_of(labels: Tensor) -> Tensor:
        nonlocal colours
        colours = torch.randint(0, len(COLOUR_HUES), (len(labels),), generator=gen)
        return (torch.tensor(COLOUR_HUES)[colours] + 0.015 * torch.randn(len(labels), generator=gen)) % 1.0

    images, labels, which = _render_digits(size, gen, hue_of)
    captions = digit_captions(labels, colours, which, gen)
    attributes = {"colour": colours.to(device), "background": which.to(device)}
    return images.to(device), labels.to(device), captions, attributes


def synthetic_videos(
    n: int = 256,
    frames: int = 4,
    size: int = 32,
    num_shapes: int = 3,
    max_speed: float = 2.0,
    seed: int = 0,
    device=None,
) -> tuple[Tensor, Tensor]:
    """Videos of textured coloured shapes moving over a panning photo background.

    Returns ``(videos uint8 (n, T, 3, S, S), masks int64 (n, T, S, S))``; mask 0 is the
    background and ``k = 1..num_shapes`` the k-th shape (later shapes are drawn on top).
    Each shape is a disc, square or diamond of random radius, with a random saturated
    colour and a stripe texture that moves with it, at a constant velocity of up to
    ``max_speed`` pixels per frame (bouncing off the borders); the background pans by up to
    one pixel per frame.
    """
    _check_size("synthetic_videos", size)
    if frames < 2:
        raise ValueError(f"synthetic_videos: frames must be >= 2, got {frames}")
    if num_shapes < 1:
        raise ValueError(f"synthetic_videos: num_shapes must be >= 1, got {num_shapes}")
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(frames, dtype=torch.float32)
    # Background: one photo crop per video, translated by pan * t pixels.
    theta, which, (sx, sy) = _crop_thetas(n, size, 1.5, 3.0, gen, "cpu")
    pan = torch.rand(n, 2, generator=gen) * 2 - 1
    theta_t = theta[:, None].repeat(1, frames, 1, 1)
    theta_t[:, :, 0, 2] += (pan[:, None, 0] * t * 2 / size) * sx[:, None]
    theta_t[:, :, 1, 2] += (pan[:, None, 1] * t * 2 / size) * sy[:, None]
    bg = _affine_crops(sample_photos("cpu"), which.repeat_interleave(frames), theta_t.reshape(-1, 2, 3), size)
    video = bg.reshape(n, frames, 3, size, size)
    masks = torch.zeros(n, frames, size, size, dtype=torch.int64)

    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = coords[:, None], coords[None, :]
    rmin, rmax = size / 10, size / 5
    for k in range(num_shapes):
        radius = rmin + (rmax - rmin) * torch.rand(n, generator=gen)
        start = radius[:, None] + torch.rand(n, 2, generator=gen) * (size - 2 * radius[:, None])
        angle = torch.rand(n, generator=gen) * 2 * math.pi
        speed = max_speed * (0.5 + 0.5 * torch.rand(n, generator=gen))
        vel = torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1) * speed[:, None]
        # Reflect positions off the borders: fold the straight-line path into [r, S - r].
        lo, span = radius[:, None, None], (size - 2 * radius)[:, None, None]
        raw = start[:, None] + vel[:, None] * t[None, :, None] - lo  # (n, T, 2)
        period = 2 * span
        folded = torch.remainder(raw, period)
        pos = lo + torch.where(folded > span, period - folded, folded)
        dy = yy[None, None] - pos[:, :, 0, None, None]  # (n, T, S, S)
        dx = xx[None, None] - pos[:, :, 1, None, None]
        kind = torch.randint(0, 3, (n,), generator=gen)[:, None, None, None]
        r = radius[:, None, None, None]
        inside = torch.where(
            kind == 0,
            dy**2 + dx**2 <= r**2,
            torch.where(kind == 1, torch.maximum(dy.abs(), dx.abs()) <= r * 0.85, dy.abs() + dx.abs() <= r * 1.2),
        )
        colour = _hsv_to_rgb(
            torch.rand(n, generator=gen),
            0.6 + 0.4 * torch.rand(n, generator=gen),
            0.5 + 0.5 * torch.rand(n, generator=gen),
        )
        phase = torch.rand(n, generator=gen) * 2 * math.pi
        orient = torch.rand(n, generator=gen) * math.pi
        stripes = torch.sin(
            (dy * torch.cos(orient)[:, None, None, None] + dx * torch.sin(orient)[:, None, None, None]) * 1.6
            + phase[:, None, None, None]
        )
        shade = 0.7 + 0.3 * stripes  # (n, T, S, S), moves with the shape
        fill = colour[:, None, :, None, None] * shade[:, :, None]
        video = torch.where(inside[:, :, None], fill, video)
        masks = torch.where(inside, k + 1, masks)
    videos = (video * 255).round().clamp(0, 255).to(torch.uint8)
    return videos.to(device), masks.to(device)


# ---- as ImageDataset (what the trainer, the CLI and the evaluation take) --------------------------


def _stratified_test_mask(labels: Tensor, test_fraction: float, seed: int) -> Tensor:
    # The same class-stratified split as pyssl.data.load_digits.
    g = torch.Generator().manual_seed(seed)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(int(labels.max()) + 1):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_mask[idx[: round(len(idx) * test_fraction)]] = True
    return test_mask


def _digits_split(name: str, split: str, size: int, test_fraction: float, seed: int, render):
    # The rendered digits (``render(size) -> (images, labels, texts or None)``) as an ImageDataset,
    # split like ``load_digits``; shared by the colour and the captioned digits.

    if split not in ("train", "test", "all"):
        raise DataError(f"{name}: split must be train, test or all, got {split!r}")
    if not isinstance(size, int) or size < 8:
        raise DataError(f"{name}: size must be an int >= 8, got {size!r}")
    images, labels, texts = render(size)
    if split != "all":
        test = _stratified_test_mask(labels, test_fraction, seed)
        keep = test if split == "test" else ~test
        images, labels = images[keep], labels[keep]
        texts = texts[keep] if texts is not None else None
    return ImageDataset(images.contiguous(), labels, [str(i) for i in range(10)], name, texts)


def load_colour_digits(split: str = "train", size: int = 32, test_fraction: float = 0.3, seed: int = 0):
    """:func:`colour_digits` as a :class:`pyssl.data.ImageDataset` (split like ``load_digits``)."""
    return _digits_split("colour_digits", split, size, test_fraction, seed, lambda s: (*colour_digits(s), None))


def load_captioned_digits(split: str = "train", size: int = 32, test_fraction: float = 0.3, seed: int = 0):
    """:func:`captioned_digits` as a :class:`pyssl.data.ImageDataset` whose ``texts`` are the
    tokenised captions (split like ``load_colour_digits``)."""

    def render(s: int):
        images, labels, captions, _ = captioned_digits(s)
        return images, labels, tokenize(captions)

    return _digits_split("captioned_digits", split, size, test_fraction, seed, render)


def load_videos(
    split: str = "train", size: int = 32, frames: int = 4, num_videos: int | None = None, with_masks: bool = False
):
    """:func:`synthetic_videos` stored as images ``(N, frames * 3, S, S)`` (frame-major) with labels -1.

    ``train`` has 1024 videos (seed 0), ``test`` 256 (seed 1). ``with_masks=True`` also
    returns the object masks ``(N, frames, S, S)`` for :func:`pyssl.eval.propagation.propagate_masks`.
    """

    if split not in ("train", "test"):
        raise DataError(f"videos: split must be train or test, got {split!r}")
    if not isinstance(size, int) or size < 8:
        raise DataError(f"videos: size must be an int >= 8, got {size!r}")
    n = num_videos or (1024 if split == "train" else 256)
    videos, masks = synthetic_videos(n, frames=frames, size=size, seed=0 if split == "train" else 1)
    ds = ImageDataset(videos.flatten(1, 2).contiguous(), torch.full((n,), -1, dtype=torch.long), [], "videos")
    return (ds, masks) if with_masks else ds


def load_colour_data(kind: str, image_size: int | None = None):
    """(train, test) for the embedded colour data sets: ``colour_digits``, ``captioned_digits`` or ``videos``."""
    size = image_size or 32
    if kind == "colour_digits":
        return load_colour_digits("train", size), load_colour_digits("test", size)
    if kind == "captioned_digits":
        return load_captioned_digits("train", size), load_captioned_digits("test", size)
    if kind == "videos":
        return load_videos("train", size), load_videos("test", size)

    raise DataError(f"unknown colour data set {kind!r} (colour_digits, captioned_digits or videos)")


COLOUR_KINDS = ("colour_digits", "captioned_digits", "videos")
