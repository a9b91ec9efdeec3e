"""Data-parallel training over ``torch.distributed``: process-group set-up from torchrun's
environment, a differentiable all-gather for the contrastive losses, MoCo's batch shuffle
(Shuffle-BN) and bucketed gradient averaging for the trainer.

Everything here is a no-op (or returns the single-process answer) when no process group of
more than one rank is initialised, so callers need no ``if distributed`` of their own.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

# Gradients are averaged in flat buckets of about this size: one collective per bucket rather
# than per tensor (launch latency dominates for the many small bias/norm tensors), without
# a second copy of all gradients at once.
BUCKET_BYTES = 32 * 1024 * 1024

# Set by torchrun (and by ``pyssl train --nproc``) for every worker.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that writes files and prints progress."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(device_type: str = "cpu") -> torch.device:
    """Initialises the default process group from torchrun's environment variables and returns
    this process's device: ``cuda:LOCAL_RANK`` (NCCL backend) or ``cpu`` (Gloo backend).

    Without those variables (a plain single process) nothing is initialised and the device is
    returned as is. Calling it again once the group exists only returns the device.
    """
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"init_from_env: device_type must be 'cpu' or 'cuda', got {device_type!r}")
    if not launched_by_torchrun():
        return torch.device(device_type)
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"init_from_env: environment variable(s) {', '.join(missing)} not set "
            "(launch with torchrun or pyssl train --nproc)"
        )
    if not dist.is_available():
        raise RuntimeError("init_from_env: this PyTorch build has no torch.distributed")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("init_from_env: device_type 'cuda' requested but CUDA is not available")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"init_from_env: LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} "
                "CUDA device(s) are visible"
            )
        device = torch.device("cuda", local_rank)
        # NCCL picks the communicator's device from the current device: set it before init.
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="env://")
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ---- differentiable all-gather ---------------------------------------------------------------


def _all_gather(x: Tensor) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.rows = x.shape[0]
        return _all_gather(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Each rank back-propagates its own loss through the gathered batch, and only this
        # rank's rows reach this rank's parameters. Summing the incoming gradients over ranks
        # before taking our slice collects every rank's loss's dependence on our rows, so after
        # the trainer *averages* parameter gradients over ranks the result is the gradient of
        # the mean of the per-rank losses. When every rank computes the same global-batch loss
        # L, that mean is L itself: the sum gives world_size * dL/d(our rows), the average
        # divides the world_size back out, and the step equals the single-process one over the
        # whole batch. Returning the slice alone would leave the gradient world_size times too
        # small (each rank would only account for 1/world_size of L's dependence).
        grad = grad.clone(memory_format=torch.contiguous_format)  # never reduce autograd's buffer in place
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gathers ``x`` along dim 0 in rank order (every rank must pass the same shape);
    differentiable, see ``_GatherWithGrad.backward`` for the gradient's convention. Returns
    ``x`` itself outside a process group of more than one rank."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather(x: Tensor) -> Tensor:
    """All-gather along dim 0 in rank order, without gradient (e.g. keys to enqueue)."""
    return _all_gather(x) if is_distributed() else x


# ---- MoCo's batch shuffle ----------------------------------------------------------------------


@torch.no_grad()
def shared_permutation(n: int, device: torch.device | str = "cpu") -> Tensor:
    """A random permutation of ``range(n)`` (int64, on ``device``), the same on every rank.

    Rank 0 draws it from its global RNG (the CPU one, or ``device``'s) and broadcasts it. Not
    identically seeded generators on all ranks: the ranks' global RNGs differ on purpose (each
    draws its own augmentations), and a generator of its own would need its state kept in step
    and checkpointed for an exact resume, whereas rank 0's global RNG already is. The broadcast
    is n integers, little next to the images that the shuffle gathers anyway.
    """
    if not is_distributed():
        return torch.randperm(n, device=device)
    if dist.get_rank() == 0:
        permutation = torch.randperm(n, device=device)
    else:  # left undrawn: the other ranks' RNG streams stay as they would be without the shuffle
        permutation = torch.empty(n, dtype=torch.long, device=device)
    dist.broadcast(permutation, 0)
    return permutation


@torch.no_grad()
def shuffle_batch(x: Tensor) -> tuple[Tensor, Tensor]:
    """Shuffle-BN's first half (MoCo, He et al. 2019, section 3.3): gathers ``x`` of all ranks
    (in rank order; every rank must pass the same shape), permutes that global batch with
    :func:`shared_permutation` and returns this rank's shard of the permuted batch (the shape
    of ``x``), with the permutation for :func:`unshuffle_batch`. In a single process: ``x``
    permuted. No gradient."""
    rows = x.shape[0]
    everything = gather(x)
    permutation = shared_permutation(everything.shape[0], x.device)
    own = permutation[rank() * rows : (rank() + 1) * rows]
    return everything[own], permutation


@torch.no_grad()
def unshuffle_batch(y: Tensor, permutation: Tensor) -> Tensor:
    """Undoes :func:`shuffle_batch` on ``y``, this rank's outputs for its shard of the permuted
    batch (row ``j`` of the gathered ``y`` belongs to sample ``permutation[j]``): returns the
    rows of this rank's own samples, in their original order. No gradient."""
    rows = y.shape[0]
    everything = gather(y)
    position_of_sample = torch.argsort(permutation)  # the inverse permutation
    return everything[position_of_sample[rank() * rows : (rank() + 1) * rows]]


def mean_over_ranks(value: Tensor) -> Tensor:
    """The mean of a tensor over ranks (a new tensor; ``value`` is not modified)."""
    value = value.detach().clone()
    if is_distributed():
        # Gloo has no ReduceOp.AVG: sum, then divide.
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


# ---- bucketed collectives ---------------------------------------------------------------------


def _buckets(tensors: Iterable[Tensor]) -> list[list[Tensor]]:
    """Groups tensors by (device, dtype), each group cut into runs of at most BUCKET_BYTES
    (a single larger tensor gets a bucket of its own)."""
    groups: dict[tuple, list[list[Tensor]]] = {}
    sizes: dict[tuple, int] = {}
    for t in tensors:
        key = (t.device, t.dtype)
        nbytes = t.numel() * t.element_size()
        if key not in groups or sizes[key] + nbytes > BUCKET_BYTES:
            groups.setdefault(key, []).append([])
            sizes[key] = 0
        groups[key][-1].append(t)
        sizes[key] += nbytes
    return [bucket for runs in groups.values() for bucket in runs if bucket]


def _apply_flat(tensors: Iterable[Tensor], collective: Callable[[Tensor], None]) -> None:
    """Runs ``collective`` in place on one flat copy per bucket and writes the results back."""
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        collective(flat)
        for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
            t.copy_(part.view_as(t))


@torch.no_grad()
def all_reduce_gradients(params: Iterable[Tensor]) -> None:
    """Replaces each parameter's ``.grad`` with its mean over ranks. Parameters without a
    gradient are skipped (every rank must have gradients for the same parameters)."""
    if not is_distributed():
        return
    grads = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise ValueError("all_reduce_gradients: sparse gradients are not supported")
        grads.append(p.grad)
    size = dist.get_world_size()

    def average(flat: Tensor) -> None:
        dist.all_reduce(flat)
        flat /= size

    _apply_flat(grads, average)


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copies rank ``src``'s parameters and buffers into every rank's ``module``, so all ranks
    start from one initialisation (and, for MoCo, one queue)."""
    if not is_distributed():
        return
    tensors = [t.data for t in (*module.parameters(), *module.buffers())]
    _apply_flat(tensors, lambda flat: dist.broadcast(flat, src))


@torch.no_grad()
def parameter_digest(module: torch.nn.Module) -> str:
    """A SHA-1 over the module's parameters (names, dtypes, shapes and values): equal on all
    ranks exactly when the ranks hold bitwise the same weights. Buffers are left out: BatchNorm
    running statistics are per rank unless SyncBatchNorm is used."""
    h = hashlib.sha1()
    for name, p in module.named_parameters():
        h.update(f"{name}:{p.dtype}:{tuple(p.shape)};".encode())
        h.update(p.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "is_main_process",
    "init_from_env",
    "shutdown",
    "barrier",
    "gather_with_grad",
    "gather",
    "mean_over_ranks",
    "all_reduce_gradients",
    "broadcast_module",
    "all_gather_objects",
    "launched_by_torchrun",
    "parameter_digest",
    "shared_permutation",
    "shuffle_batch",
    "unshuffle_batch",
]
