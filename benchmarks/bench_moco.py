"""MoCo queue loss, forward + backward + enqueue: pyssl's fused kernel vs eager PyTorch vs lightly.

    python benchmarks/bench_moco.py [--device cuda] [--quick]

Eager is what a user writes by hand (as MoCo's reference code does): normalise, positive
logits, one (N x K) matmul against the queue, cat, cross-entropy, then the ring-buffer write.
lightly is ``NTXentLoss(memory_bank_size=(K, d))``. Keys come from a momentum encoder, so they
do not require grad.
"""

import os
import sys

# This CPU is shared with other jobs: OpenMP threads that spin while idle take the core from
# the threads doing the work and make every candidate's timing erratic. Waiting passively
# (set before torch loads, inherited by the harness's per-candidate subprocesses) applies to
# all candidates alike; pass OMP_WAIT_POLICY explicitly to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import run_benchmark  # noqa: E402


def _inputs(config, device):
    dtype = getattr(torch, config.get("dtype", "float32"))
    n, d = config["n"], config["d"]
    query = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    key = torch.randn(n, d, device=device, dtype=dtype)
    return query, key


def _step(loss_fn, query, key):
    def step():
        query.grad = None
        loss_fn(query, key).backward()

    return step


def pyssl_candidate(config, device):
    import pyssl

    queue_dtype = getattr(torch, config.get("queue_dtype", "float32"))
    loss_fn = pyssl.losses.MoCoLoss(config["temperature"], config["k"], config["d"], queue_dtype=queue_dtype).to(device)
    return _step(loss_fn, *_inputs(config, device))


def eager_candidate(config, device):
    from pyssl import reference

    temperature, k = config["temperature"], config["k"]
    queue_dtype = getattr(torch, config.get("queue_dtype", "float32"))
    queue = F.normalize(torch.randn(k, config["d"], device=device), dim=1).to(queue_dtype)
    ptr = [0]

    def moco(query, key):
        # the queue is read as it was before this step's enqueue (MoCo's reference clones it)
        loss = reference.moco(query, key, queue.clone(), temperature).float()
        with torch.no_grad():
            kn = F.normalize(key, dim=1)
            count = min(kn.shape[0], k - ptr[0])
            queue[ptr[0] : ptr[0] + count] = kn[:count].to(queue.dtype)
            ptr[0] = (ptr[0] + count) % k
        return loss

    return _step(moco, *_inputs(config, device))


def lightly_candidate(config, device):
    from lightly.loss import NTXentLoss

    loss_fn = NTXentLoss(temperature=config["temperature"], memory_bank_size=(config["k"], config["d"])).to(device)
    return _step(loss_fn, *_inputs(config, device))


CANDIDATES = {"pyssl": pyssl_candidate, "eager": eager_candidate, "lightly": lightly_candidate}

if __name__ == "__main__":
    on_cuda = "--device" in sys.argv and "cuda" in sys.argv[sys.argv.index("--device") + 1]
    configs = [
        {"n": 256, "k": 65536, "d": 128, "temperature": 0.2, "dtype": "float32"},
        {"n": 256, "k": 16384, "d": 128, "temperature": 0.2, "dtype": "float32"},
    ]
    if on_cuda:
        configs.append({"n": 1024, "k": 65536, "d": 256, "temperature": 0.2, "dtype": "bfloat16"})
        # bf16 query and queue: the tensor-core sweep (moco_mma.cuh; PYSSL_MOCO_KERNELS=simt for the
        # SIMT sweep on the same sizes), MoCo's usual N, K and d.
        for n, d in ((256, 128), (1024, 256)):
            configs.append(
                {"n": n, "k": 65536, "d": d, "temperature": 0.2, "dtype": "bfloat16", "queue_dtype": "bfloat16"}
            )
    run_benchmark(__file__, CANDIDATES, configs)
