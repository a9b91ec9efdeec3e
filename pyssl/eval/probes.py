"""Classifiers trained on an encoder with a fraction of the labels: linear probe and fine-tuning."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyssl.eval.features import extract_features


def balanced_subset(labels: Tensor, fraction: float, seed: int = 0) -> Tensor:
    """Indices of ``round(fraction * n_c)`` (at least 1) random images of every class ``c``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    picked = []
    for c in labels.unique():
        if c < 0:
            continue
        idx = (labels == c).nonzero().flatten()
        n = max(1, round(fraction * len(idx)))
        picked.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(picked).sort().values


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    weight_decay: float = 1e-3,
    max_iter: int = 300,
    num_classes: int | None = None,
) -> float:
    """Test accuracy of an L2-regularised multinomial logistic regression on frozen features."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    x = train_features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(x[0])
    x = (x - mean) / std
    xt = (test_features.double().to(x.device) - mean) / std
    y = train_labels.to(x.device)
    with torch.enable_grad():
        w = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
        b = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x @ w + b, y) + weight_decay * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        return ((xt @ w + b).argmax(1) == test_labels.to(x.device)).double().mean().item()


def _random_shift(x: Tensor, pad: int, g: torch.Generator) -> Tensor:
    if pad == 0:
        return x
    dx, dy = torch.randint(-pad, pad + 1, (2,), generator=g).tolist()
    return torch.roll(F.pad(x, (pad,) * 4, mode="replicate"), (dy, dx), (2, 3))[..., pad:-pad, pad:-pad]


def fine_tune(
    encoder: nn.Module,
    transform: Callable[[Tensor], Tensor],
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    num_classes: int,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    shift: int = 2,
    flip: bool = False,
    seed: int = 0,
) -> float:
    """Test accuracy after training a copy of ``encoder`` plus a linear layer end to end (AdamW,
    cosine schedule, random shifts of up to ``shift`` pixels) on the given labelled images."""
    g = torch.Generator().manual_seed(seed)
    enc = copy.deepcopy(encoder).train()
    param = next(enc.parameters(), None)
    device = param.device if param is not None else train_images.device  # images may be on the host
    with torch.no_grad():
        enc.eval()
        dim = enc(transform(train_images[:2].to(device))).flatten(1).shape[1]
        enc.train()
    head = nn.Linear(dim, num_classes).to(device)
    params = list(enc.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    n = len(train_images)
    bs = min(batch_size, n)
    for _ in range(steps):
        idx = torch.randint(0, n, (bs,), generator=g).to(train_images.device)
        x = transform(train_images[idx].to(device))
        x = _random_shift(x, shift, g)
        if flip and bool(torch.randint(0, 2, (1,), generator=g)):
            x = x.flip(3)
        if bs == 1:  # BatchNorm needs two samples
            x = torch.cat([x, x])
            idx = torch.cat([idx, idx])
        loss = F.cross_entropy(head(enc(x).flatten(1)), train_labels[idx.to(train_labels.device)].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    enc.eval()
    with torch.no_grad():
        feats = extract_features(enc, test_images, transform)
        return (head(feats).argmax(1) == test_labels.to(device)).float().mean().item()
