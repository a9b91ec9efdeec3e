"""NT-Xent (SimCLR) loss, forward + backward: pyssl's fused kernel vs eager PyTorch vs lightly.

    python benchmarks/bench_infonce.py [--device cuda] [--quick]

Eager is what a user writes by hand: normalize, one (2N x 2N) matmul, masked cross-entropy.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import embedding_pair, run_benchmark  # noqa: E402


def _step(loss_fn, z0, z1):
    def step():
        z0.grad = z1.grad = None
        loss_fn(z0, z1).backward()

    return step


def pyssl_candidate(config, device):
    import pyssl

    return _step(pyssl.losses.NTXentLoss(config["temperature"]), *embedding_pair(config, device))


def eager_candidate(config, device):
    from pyssl import reference

    temperature = config["temperature"]
    return _step(lambda z0, z1: reference.ntxent(z0, z1, temperature), *embedding_pair(config, device))


def lightly_candidate(config, device):
    from lightly.loss import NTXentLoss

    return _step(NTXentLoss(temperature=config["temperature"]), *embedding_pair(config, device))


CANDIDATES = {"pyssl": pyssl_candidate, "eager": eager_candidate, "lightly": lightly_candidate}

if __name__ == "__main__":
    on_cuda = "--device" in sys.argv and "cuda" in sys.argv[sys.argv.index("--device") + 1]
    configs = (
        [
            {"n": 8192, "d": 128, "temperature": 0.5, "dtype": "bfloat16"},
            {"n": 4096, "d": 128, "temperature": 0.5, "dtype": "float32"},
        ]
        if on_cuda
        else [
            {"n": 4096, "d": 128, "temperature": 0.5, "dtype": "float32"},
            {"n": 1024, "d": 128, "temperature": 0.5, "dtype": "float32"},
        ]
    )
    run_benchmark(__file__, CANDIDATES, configs)
