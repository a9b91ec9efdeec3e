"""Weighted kNN on cosine similarity (InstDisc's votes ``exp(sim / t)``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    k: int = 200,
    t: float = 0.1,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> Tensor:
    """Predicted labels: the ``k`` most cosine-similar training features vote for their class
    with weight ``exp(similarity / t)``.  ``k`` is clamped to the number of training samples."""
    if k < 1 or t <= 0:
        raise ValueError(f"knn: k must be >= 1 and t > 0, got k={k}, t={t}")
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train_features))
    tr = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(tr.device)
    preds = []
    for i in range(0, len(test_features), chunk):
        te = F.normalize(test_features[i : i + chunk].float().to(tr.device), dim=1)
        sim, idx = (te @ tr.T).topk(k, dim=1)
        votes = torch.zeros(len(te), num_classes, device=tr.device, dtype=sim.dtype)
        votes.scatter_add_(1, labels[idx], (sim / t).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)
