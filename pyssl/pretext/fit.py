"""A minimal training loop for quick checks of the pretext methods.

The full trainer lives in :mod:`pyssl.train`; this keeps the pretext tests a few seconds long
(random batches, Adam, no schedule, no checkpoints).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def quick_fit(
    method: nn.Module, data: Tensor, steps: int = 50, batch_size: int = 64, lr: float = 2e-3, seed: int = 0
) -> list[dict[str, float]]:
    """``steps`` Adam steps of ``method.training_step`` on random batches of ``data``; the metrics per step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=lr)
    method.train()
    history = []
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen).to(data.device)
        loss = method.training_step(data[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(dict(method.last_metrics))
    return history
