"""Barlow Twins and VICReg, forward + backward at the papers' projector width: pyssl vs eager
PyTorch vs lightly.

    python benchmarks/bench_noncontrastive.py [--device cuda] [--n 256] [--d 8192] [--out FILE]

Two random (n, d) float32 views that require grad; one step is the loss and its backward.
pyssl forms the Frobenius terms from N x N Gram matrices when d > n (see
pyssl.losses.noncontrastive); eager is the formula written the direct way, in the input dtype
(the d x d cross-correlation or covariance and a boolean off-diagonal mask, as the float64
references of the tests do); lightly runs its own modules with the same arguments. Time is the
median of repeated steps; memory is the peak extra memory of the first step (CPU: each
candidate in its own subprocess, peak-RSS growth; CUDA: ``torch.cuda.max_memory_allocated``),
both measured by benchmarks/harness.py. Ratios are against pyssl, from the same run.

Prints a table; writes JSON only to the path given with ``--out``.
"""

import argparse
import json
import os
import platform
import sys

# This CPU is shared with other jobs: OpenMP threads that spin while idle take the core from
# the threads doing the work (see bench_metric.py). Set before torch loads, inherited by the
# per-candidate subprocesses.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import _child, _fmt_bytes, _run_isolated, embedding_pair, measure  # noqa: E402

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


def lightly_candidate(config, device):
    from lightly import loss

    loss_fn = loss.BarlowTwinsLoss(LAMBDA_BT) if config["loss"] == "barlow_twins" else loss.VICRegLoss()
    return _step(loss_fn, config, device)


# ---- eager: the formulas the direct d x d way -------------------------------------------------


def eager_barlow_twins(z_a, z_b):
    n, d = z_a.shape
    a = (z_a - z_a.mean(0)) / torch.sqrt(z_a.var(0, unbiased=False) + 1e-5)
    b = (z_b - z_b.mean(0)) / torch.sqrt(z_b.var(0, unbiased=False) + 1e-5)
    c = a.T @ b / n
    off_diagonal = ~torch.eye(d, dtype=torch.bool, device=c.device)
    return (1 - torch.diagonal(c)).square().sum() + LAMBDA_BT * c[off_diagonal].square().sum()


def eager_vicreg(z_a, z_b, lambda_param=25.0, mu_param=25.0, nu_param=1.0, eps=1e-4):
    n, d = z_a.shape
    off_diagonal = ~torch.eye(d, dtype=torch.bool, device=z_a.device)

    def variance(z):
        return torch.relu(1 - torch.sqrt(z.var(0) + eps)).mean()

    def covariance(z):
        z = z - z.mean(0)
        cov = z.T @ z / (n - 1)
        return cov[off_diagonal].square().sum() / d

    invariance = (z_a - z_b).square().mean()
    return (
        lambda_param * invariance
        + mu_param * 0.5 * (variance(z_a) + variance(z_b))
        + nu_param * (covariance(z_a) + covariance(z_b))
    )


def eager_candidate(config, device):
    return _step(eager_barlow_twins if config["loss"] == "barlow_twins" else eager_vicreg, config, device)


CANDIDATES = {"pyssl": pyssl_candidate, "eager": eager_candidate, "lightly": lightly_candidate}


def main() -> None:
    parser = argparse.ArgumentParser(description="benchmark: Barlow Twins and VICReg, pyssl vs eager vs lightly")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=256, help="batch size")
    parser.add_argument("--d", type=int, default=8192, help="projector width")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of timed steps per candidate")
    parser.add_argument("--max-iters", type=int, default=20)
    parser.add_argument("--only", default="", help="comma-separated candidate names")
    parser.add_argument("--out", default="", help="write the results as JSON to this path (default: nothing written)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(__file__, CANDIDATES, args.child, json.loads(args.config), args.device, args.min_time, args.max_iters)
        return

    names = [name for name in CANDIDATES if not args.only or name in args.only.split(",")]
    cuda = args.device.startswith("cuda")
    report = {
        "benchmark": "bench_noncontrastive",
        "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "results": [],
    }
    for loss in ("barlow_twins", "vicreg"):
        config = {"loss": loss, "n": args.n, "d": args.d}
        print(f"\n== {loss} n={args.n} d={args.d} float32, forward + backward, on {args.device}")
        rows = {}
        for name in names:
            if cuda:
                try:
                    rows[name] = measure(
                        CANDIDATES[name](config, args.device), args.device, args.min_time, args.max_iters
                    )
                except Exception as err:  # an OOM of the d x d candidates is a result, not a crash
                    rows[name] = {"error": f"{type(err).__name__}: {err}"}
                torch.cuda.empty_cache()
            else:
                rows[name] = _run_isolated(__file__, name, config, args.device, args.min_time, args.max_iters)
        ref = rows.get("pyssl", {})
        print(f"{'candidate':<12}{'time':>12}{'peak extra mem':>18}{'time / pyssl':>16}{'mem / pyssl':>16}")
        for name, r in rows.items():
            if "error" in r:
                print(f"{name:<12}  error: {r['error']}")
                continue
            if "seconds" in ref:
                r["time_ratio_vs_pyssl"] = r["seconds"] / ref["seconds"]
                r["memory_ratio_vs_pyssl"] = (
                    r["peak_extra_bytes"] / ref["peak_extra_bytes"] if ref["peak_extra_bytes"] else None
                )
            tr, mr = r.get("time_ratio_vs_pyssl"), r.get("memory_ratio_vs_pyssl")
            print(
                f"{name:<12}{r['seconds'] * 1e3:>10.1f}ms{_fmt_bytes(r['peak_extra_bytes']):>18}"
                f"{(f'{tr:.2f}x' if tr else '-'):>16}{(f'{mr:.2f}x' if mr else '-'):>16}"
            )
        report["results"].append({"config": config, "candidates": rows})
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
