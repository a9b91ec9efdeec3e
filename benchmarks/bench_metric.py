"""Metric-learning losses, forward + backward: pyssl vs eager PyTorch vs pytorch-metric-learning.

    python benchmarks/bench_metric.py [--device cuda] [--quick]

One config per loss (``config["loss"]``), on a labelled batch of ``n`` random embeddings in
``classes`` classes. Eager is what a user writes by hand: ``torch.cdist``, masks, and for the
triplet loss over all triplets the (n x n x n) broadcast; the lifted structure loss as the
paper writes it (a log of a sum of exps). pytorch-metric-learning runs its own classes with the
arguments that give the same loss as pyssl's (see pyssl.losses.metric); it has no soft nearest
neighbour loss, so that row is its NCALoss set up to compute the same value. Its triplet and
lifted structure losses list every triplet or (positive pair, negative pair) combination, so
those configs are kept small enough for it (and eager) to fit in memory.
"""

import os
import sys

# This CPU is shared with other jobs: OpenMP threads that spin while idle take the core from
# the threads doing the work and make every candidate's timing erratic. Waiting passively
# (set before torch loads, inherited by the harness's per-candidate subprocesses) applies to
# all candidates alike; pass OMP_WAIT_POLICY explicitly to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import run_benchmark  # noqa: E402

MARGIN = 0.05  # triplet margin (pytorch-metric-learning's default)
TEMPERATURE = 4.0  # soft nearest neighbours


def _inputs(config, device):
    dtype = getattr(torch, config.get("dtype", "float32"))
    embeddings = torch.randn(config["n"], config["d"], device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, config["classes"], (config["n"],), device=device)
    return embeddings, labels


def _step(loss_fn, embeddings, labels):
    def step():
        embeddings.grad = None
        loss_fn(embeddings, labels).backward()

    return step


def pyssl_candidate(config, device):
    from pyssl import losses

    loss_fn = {
        "triplet_all": lambda: losses.TripletLoss(MARGIN),
        "triplet_batch_hard": lambda: losses.TripletLoss(MARGIN, mining="batch_hard"),
        "contrastive": lambda: losses.ContrastiveLoss(squared_hinge=False),
        "lifted_structure": lambda: losses.LiftedStructureLoss(),
        "soft_nearest_neighbors": lambda: losses.SoftNearestNeighborsLoss(TEMPERATURE),
    }[config["loss"]]()
    return _step(loss_fn, *_inputs(config, device))


# ---- eager: what a user writes by hand ---------------------------------------------------------


def _pair_masks(labels):
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def _nonzero_mean(losses):
    return losses.sum() / (losses > 0).sum().clamp_min(1)


def eager_triplet_all(embeddings, labels):
    x = F.normalize(embeddings, dim=1)
    dist = torch.cdist(x, x)
    positive, negative = _pair_masks(labels)
    valid = positive[:, :, None] & negative[:, None, :]
    return _nonzero_mean(F.relu(dist[:, :, None] - dist[:, None, :] + MARGIN) * valid)


def eager_triplet_batch_hard(embeddings, labels):
    x = F.normalize(embeddings, dim=1)
    dist = torch.cdist(x, x)
    positive, negative = _pair_masks(labels)
    hardest_positive = dist.masked_fill(~positive, float("-inf")).max(dim=1).values
    hardest_negative = dist.masked_fill(~negative, float("inf")).min(dim=1).values
    has_triplet = positive.any(1) & negative.any(1)
    return _nonzero_mean(F.relu(hardest_positive - hardest_negative + MARGIN)[has_triplet])


def eager_contrastive(embeddings, labels):
    x = F.normalize(embeddings, dim=1)
    dist = torch.cdist(x, x)
    positive, negative = _pair_masks(labels)
    return _nonzero_mean(dist[positive]) + _nonzero_mean(F.relu(1.0 - dist[negative]))


def eager_lifted_structure(embeddings, labels):
    x = F.normalize(embeddings, dim=1)
    dist = torch.cdist(x, x)
    positive, negative = _pair_masks(labels)
    negative_sums = (torch.exp(1.0 - dist) * negative).sum(1)
    pair_terms = torch.log(negative_sums[:, None] + negative_sums[None, :]) + dist
    return F.relu(pair_terms[positive]).square().sum() / (2 * positive.sum())


def eager_soft_nearest_neighbors(embeddings, labels):
    positive, negative = _pair_masks(labels)
    similarity = torch.exp(-torch.cdist(embeddings, embeddings).square() / TEMPERATURE)
    same_class = (similarity * positive).sum(1)
    everyone = (similarity * (positive | negative)).sum(1)
    has_positive = positive.any(1)
    return -torch.log(same_class[has_positive] / everyone[has_positive]).mean()


def eager_candidate(config, device):
    return _step(globals()[f"eager_{config['loss']}"], *_inputs(config, device))


# ---- pytorch-metric-learning -------------------------------------------------------------------


def pml_candidate(config, device):
    from pytorch_metric_learning import distances, losses, miners

    kind = config["loss"]
    if kind == "triplet_batch_hard":
        miner, loss = miners.BatchHardMiner(), losses.TripletMarginLoss(MARGIN)
        return _step(lambda x, y: loss(x, y, miner(x, y)), *_inputs(config, device))
    loss_fn = {
        "triplet_all": lambda: losses.TripletMarginLoss(MARGIN),
        "contrastive": lambda: losses.ContrastiveLoss(),
        "lifted_structure": lambda: losses.LiftedStructureLoss(),
        "soft_nearest_neighbors": lambda: losses.NCALoss(
            softmax_scale=1 / TEMPERATURE, distance=distances.LpDistance(power=2, normalize_embeddings=False)
        ),
    }[kind]()
    return _step(loss_fn, *_inputs(config, device))


CANDIDATES = {"pyssl": pyssl_candidate, "eager": eager_candidate, "pytorch_metric_learning": pml_candidate}

if __name__ == "__main__":
    configs = [
        {"loss": "triplet_all", "n": 512, "d": 128, "classes": 10},
        {"loss": "triplet_batch_hard", "n": 4096, "d": 128, "classes": 100},
        {"loss": "contrastive", "n": 4096, "d": 128, "classes": 100},
        {"loss": "lifted_structure", "n": 256, "d": 128, "classes": 32},
        {"loss": "soft_nearest_neighbors", "n": 4096, "d": 128, "classes": 100},
    ]
    run_benchmark(__file__, CANDIDATES, configs)
