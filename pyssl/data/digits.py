"""The embedded default: scikit-learn's bundled handwritten digits (no download)."""

from __future__ import annotations

import numpy as np
import torch

from pyssl.data.dataset import DataError, ImageDataset, _convert_channels, _resize_uint8


def load_digits(
    split: str = "train", size: int = 16, channels: int = 3, test_fraction: float = 0.3, seed: int = 0
) -> ImageDataset:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), upsampled to ``size``.

    ``split``: "train", "test" (a fixed class-stratified ``test_fraction`` split) or "all".
    """
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as e:  # pragma: no cover
        raise DataError("the digits data set needs scikit-learn (pip install scikit-learn)") from e
    d = _sk_digits()
    images = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    images = _convert_channels(_resize_uint8(images, size), channels)
    if split != "all":
        if split not in ("train", "test"):
            raise DataError(f"digits: split must be train, test or all, got {split!r}")
        g = torch.Generator().manual_seed(seed)
        test_mask = torch.zeros(len(labels), dtype=torch.bool)
        for c in range(10):
            idx = (labels == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            test_mask[idx[: round(len(idx) * test_fraction)]] = True
        keep = test_mask if split == "test" else ~test_mask
        images, labels = images[keep], labels[keep]
    return ImageDataset(images.contiguous(), labels, [str(i) for i in range(10)], "digits")
