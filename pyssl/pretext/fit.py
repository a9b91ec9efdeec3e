"""A minimal training loop and linear probe for quick checks of the pretext methods.

The full trainer and evaluation live in :mod:`pyssl.train` and :mod:`pyssl.eval`; these
two helpers keep the pretext tests self-contained and a few seconds long.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def quick_fit(method: nn.Module, data: Tensor, steps: int = 50, batch_size: int = 64, lr: float = 2e-3,
              seed: int = 0) -> list[dict[str, float]]:
    """``steps`` Adam steps of ``method.training_step`` on random batches of ``data``; the metrics per step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=lr)
    method.train()
    history = []
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen).to(data.device)
        loss = method.training_step(data[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(dict(method.last_metrics))
    return history


@torch.no_grad()
def embed(method: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Frozen features ``method.backbone(method.normalize(images))`` in eval mode."""
    backbone = method.backbone
    was_training = backbone.training
    backbone.eval()
    try:
        return torch.cat([backbone(method.normalize(images[i : i + batch_size])).flatten(1).float().cpu()
                          for i in range(0, images.shape[0], batch_size)])
    finally:
        backbone.train(was_training)


def linear_probe_accuracy(method: nn.Module, images: Tensor, labels: Tensor, train_fraction: float = 0.5,
                          seed: int = 0) -> float:
    """Test accuracy of a logistic regression on standardised frozen features (fixed split)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    feats = embed(method, images).numpy()
    y = labels.cpu().numpy()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).numpy()
    cut = int(train_fraction * len(y))
    tr, te = perm[:cut], perm[cut:]
    scaler = StandardScaler().fit(feats[tr])
    clf = LogisticRegression(max_iter=300, C=0.1).fit(scaler.transform(feats[tr]), y[tr])
    return float(clf.score(scaler.transform(feats[te]), y[te]))
