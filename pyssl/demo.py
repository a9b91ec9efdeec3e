"""The main job until the trainer lands: the fused NT-Xent loss and its gradient beside eager
PyTorch, with time and peak extra memory.  ``python -m pyssl.demo``"""
from __future__ import annotations

import resource
import time

import torch
import torch.nn.functional as F

import pyssl


def eager_ntxent(z0, z1, temperature):
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    n = z0.shape[0]
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, target)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(loss_fn, z0, z1, repeats=3):
    """Returns (loss, grad of z0, median seconds, peak resident growth of the first call)."""
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * 4096
    times = []
    for _ in range(repeats):
        z0.grad = z1.grad = None
        t0 = time.perf_counter()
        loss = loss_fn(z0, z1)
        loss.backward()
        times.append(time.perf_counter() - t0)
        if len(times) == 1:
            extra = max(0, _peak_rss() - before)
    return loss.detach(), z0.grad.clone(), sorted(times)[len(times) // 2], extra


def main(n: int = 4096, dim: int = 128, temperature: float = 0.5) -> None:
    torch.manual_seed(0)
    z0 = torch.randn(n, dim, requires_grad=True)
    z1 = torch.randn(n, dim, requires_grad=True)
    print(f"NT-Xent, 2N = {2 * n} rows, d = {dim}, float32, CPU ({torch.get_num_threads()} threads)")
    # pyssl first: the resident-set high-water mark only grows, so the smaller run goes first.
    fused = run(pyssl.losses.NTXentLoss(temperature), z0, z1)
    eager = run(lambda a, b: eager_ntxent(a, b, temperature), z0, z1)
    print(f"{'':<8}{'loss':>12}{'fwd+bwd':>12}{'peak extra memory':>20}")
    for name, (loss, _, seconds, extra) in (("pyssl", fused), ("eager", eager)):
        print(f"{name:<8}{loss.item():>12.6f}{seconds * 1e3:>10.1f}ms{extra / 2**20:>17.1f} MB")
    grad_err = (fused[1] - eager[1]).abs().max().item()
    print(f"pyssl is {eager[2] / fused[2]:.1f}x faster and uses {eager[3] / max(fused[3], 1):.0f}x less memory;"
          f" max gradient difference {grad_err:.1e}")


if __name__ == "__main__":
    main()
