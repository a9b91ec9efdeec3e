"""Barlow Twins and VICReg, forward + backward at the papers' projector width: pyssl vs eager
PyTorch vs lightly.

    python benchmarks/bench_noncontrastive.py [--device cuda] [--quick] [--out FILE]

Two random (n, d) float32 views that require grad; one step is the loss and its backward.
pyssl forms the Frobenius terms from N x N Gram matrices when d > n (see
pyssl.losses.noncontrastive); eager is pyssl.reference's formula, in the input dtype (the d x d
cross-correlation or covariance and a boolean off-diagonal mask); lightly runs its own modules
with the same arguments. Time is the median of repeated steps; memory is the peak extra memory of
the first step (CPU: each candidate in its own subprocess, peak-RSS growth; CUDA:
``torch.cuda.max_memory_allocated``), both measured by benchmarks/harness.py. Ratios are against
pyssl, from the same run.
"""

import os
import sys

# This CPU is shared with other jobs: OpenMP threads that spin while idle take the core from
# the threads doing the work (see bench_metric.py). Set before torch loads, inherited by the
# per-candidate subprocesses.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import embedding_pair, run_benchmark  # noqa: E402

LAMBDA_BT = 5e-3  # Barlow Twins' off-diagonal weight (the paper's, lightly's default)


def _step(loss_fn, config, device):
    z_a, z_b = embedding_pair(config, device)

    def step():
        z_a.grad = z_b.grad = None
        loss_fn(z_a, z_b).backward()

    return step


def pyssl_candidate(config, device):
    from pyssl import losses

    loss_fn = losses.BarlowTwinsLoss(LAMBDA_BT) if config["loss"] == "barlow_twins" else losses.VICRegLoss()
    return _step(loss_fn, config, device)


def eager_candidate(config, device):
    from pyssl import reference

    if config["loss"] == "barlow_twins":
        return _step(lambda z_a, z_b: reference.barlow_twins(z_a, z_b, LAMBDA_BT), config, device)
    return _step(reference.vicreg, config, device)


def lightly_candidate(config, device):
    from lightly import loss

    loss_fn = loss.BarlowTwinsLoss(LAMBDA_BT) if config["loss"] == "barlow_twins" else loss.VICRegLoss()
    return _step(loss_fn, config, device)


CANDIDATES = {"pyssl": pyssl_candidate, "eager": eager_candidate, "lightly": lightly_candidate}

if __name__ == "__main__":
    # an OOM of the d x d candidates on a GPU is a result, not a crash (the harness records it)
    run_benchmark(__file__, CANDIDATES, [{"loss": loss, "n": 256, "d": 8192} for loss in ("barlow_twins", "vicreg")])
