"""Batches of indices over an in-memory data set."""

from __future__ import annotations

import torch


def batches(num_items: int, batch_size: int, epoch: int, seed: int, drop_last: bool = True):
    """Index batches of one epoch: a permutation fixed by (seed, epoch), so a resumed run sees
    the same order and can skip the batches it already trained on."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_items, generator=g)
    stop = num_items - num_items % batch_size if drop_last else num_items
    return [perm[i : i + batch_size] for i in range(0, stop, batch_size)]
