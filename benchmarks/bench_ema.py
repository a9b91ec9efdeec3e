"""Momentum EMA over a model's parameter list: pyssl's one-pass op vs eager PyTorch vs lightly.

    python benchmarks/bench_ema.py [--device cuda] [--quick]

Eager is the common hand-written loop (``e.mul_(m).add_(p, alpha=1 - m)`` per parameter);
lightly's ``update_momentum`` is two ``torch._foreach_*`` calls. Models are torchvision's
ResNet-50 and ViT-B/16 with random init, float32.
"""

import os
import sys

# This CPU is shared with other jobs: OpenMP threads that spin while idle take the core from
# the threads doing the work and make every candidate's timing erratic. Waiting passively
# (set before torch loads, inherited by the harness's per-candidate subprocesses) applies to
# all candidates alike; pass OMP_WAIT_POLICY explicitly to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import run_benchmark  # noqa: E402

MOMENTUM = 0.996


def _models(config, device):
    import torchvision

    make = getattr(torchvision.models, config["model"])
    torch.manual_seed(0)
    model = make().to(device)
    ema_model = make().to(device)
    ema_model.load_state_dict(model.state_dict())
    for p in ema_model.parameters():
        p.requires_grad_(False)
    return ema_model, model


def pyssl_candidate(config, device):
    from pyssl.momentum import update_momentum

    ema_model, model = _models(config, device)
    return lambda: update_momentum(ema_model, model, MOMENTUM)


def eager_candidate(config, device):
    ema_model, model = _models(config, device)

    @torch.no_grad()
    def step():
        for e, p in zip(ema_model.parameters(), model.parameters()):
            e.mul_(MOMENTUM).add_(p, alpha=1 - MOMENTUM)

    return step


def lightly_candidate(config, device):
    from lightly.models.utils import update_momentum

    ema_model, model = _models(config, device)
    return torch.no_grad()(lambda: update_momentum(model, ema_model, MOMENTUM))


CANDIDATES = {"pyssl": pyssl_candidate, "eager": eager_candidate, "lightly": lightly_candidate}

if __name__ == "__main__":
    run_benchmark(__file__, CANDIDATES, [{"model": "resnet50"}, {"model": "vit_b_16"}])
