"""The CUDA kernels on the GPU against the same kernel sources on the CPU emulator, same inputs.

For the GPU check (benchmarks/gpu_check.sh): every op family on shapes with partial tiles and in
every dtype runs on CUDA and on the emulator (torch.ops.pyssl_emu, CPU tensors); the JSON holds,
per case, the largest difference between the two relative to the output's size, beside the
difference of each to the CPU kernel. The emulator's float math is the host's (no FMA
contraction, another libm), so the two agree to rounding, not bit for bit; a disagreement far
beyond the CPU kernel's own distance is a finding (a race the emulator's order hid, an
uninitialised read that happened to be zero on the GPU, ...).

    python benchmarks/gpu_vs_emulator.py --out /tmp/gpu_vs_emulator.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import pyssl
import pyssl.emulation as emulation

CPU = torch.ops.pyssl


def _rel(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    scale = max(b.abs().max().item(), 1e-30)
    return (a - b).abs().max().item() / scale


def _cases():
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for n, d in ((1, 7), (97, 300), (1000, 128)):
            yield "ntxent", dict(n=n, d=d, dtype=dtype, temperature=0.07)
            yield "clip", dict(n=n, d=d, dtype=dtype, scale=14.0)
        yield "moco", dict(n=97, k=4100, d=128, dtype=dtype, temperature=0.2)
        if dtype in (torch.float16, torch.bfloat16):  # a queue of the query's dtype: the tensor-core sweep
            yield "moco", dict(n=97, k=4100, d=128, dtype=dtype, temperature=0.2, queue_dtype=dtype)
        yield "ema", dict(dtype=dtype)
    for dtype in (torch.uint8, torch.float32):
        yield "augment", dict(dtype=dtype)


def _run(kind, cfg, ops, device):
    g = torch.Generator().manual_seed(0)
    dtype = cfg["dtype"]

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)

    if kind == "ntxent":
        z = randn(2 * cfg["n"], cfg["d"])
        loss, lse = ops.ntxent_forward(z, cfg["temperature"])
        grad = ops.ntxent_backward(torch.ones((), device=device, dtype=dtype), z, lse, cfg["temperature"])
        return {"loss": loss, "lse": lse, "grad": grad}
    if kind == "clip":
        q, k = randn(cfg["n"], cfg["d"]), randn(cfg["n"], cfg["d"])
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        scale = torch.full((), cfg["scale"], device=device, dtype=acc)
        loss, lse_row, lse_col = ops.infonce_forward(q, k, scale, True)
        gq, gk, gs = ops.infonce_backward(
            torch.ones((), device=device, dtype=dtype), q, k, scale, lse_row, lse_col, True
        )
        return {
            "loss": loss,
            "lse_row": lse_row,
            "lse_col": lse_col,
            "grad_query": gq,
            "grad_key": gk,
            "grad_scale": gs,
        }
    if kind == "moco":
        q, k = randn(cfg["n"], cfg["d"]), randn(cfg["n"], cfg["d"])
        queue = torch.nn.functional.normalize(randn(cfg["k"], cfg["d"]).float(), dim=1)
        queue = queue.to(cfg.get("queue_dtype", torch.float32))
        loss, lse, expected = ops.moco_forward(q, k, queue, cfg["temperature"])
        return {"loss": loss, "lse": lse, "expected_queue": expected}
    if kind == "ema":
        shapes = [(3,), (40_003,), (7, 65, 129)]
        ema = [randn(*s) for s in shapes]
        online = [randn(*s) for s in shapes]
        ops.ema_update_(ema, online, 0.99)
        return {f"ema{i}": e for i, e in enumerate(ema)}
    from pyssl.augment import SimCLRAugment

    aug = SimCLRAugment.simclr((41, 33), p_solarize=0.3)
    images = (torch.rand(9, 3, 57, 80, generator=g) * 255).to(torch.uint8)
    if cfg["dtype"] != torch.uint8:
        images = images.float() / 255
    params = aug.draw_params(9, 57, 80, generator=torch.Generator().manual_seed(1))
    if ops is CPU:
        return {"out": aug.apply(images, params)}
    if device == "cpu":
        with emulation.cuda_emulated():
            return {"out": aug.apply(images, params)}
    return {"out": aug.apply(images.to(device), params.to(device))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="JSON file to write (default: print only)")
    args = parser.parse_args()
    if not emulation.available():
        print("pyssl was built without its CUDA emulator (PYSSL_CUDA_EMULATE=ON): nothing to compare")
        return 1
    on_gpu = torch.cuda.is_available() and pyssl.cuda_kernels_built
    if not on_gpu:
        print("no CUDA device (or no CUDA kernels): comparing the emulator with the CPU kernels only")
    emu_ops = emulation.ops()
    rows, worst = [], 0.0
    for kind, cfg in _cases():
        started = time.perf_counter()
        cpu = _run(kind, cfg, CPU, "cpu")
        emu = _run(kind, cfg, emu_ops, "cpu")
        gpu = _run(kind, cfg, torch.ops.pyssl, "cuda") if on_gpu else None
        row = {"op": kind, **{k: str(v) if isinstance(v, torch.dtype) else v for k, v in cfg.items()}, "outputs": {}}
        for name in cpu:
            entry = {"emu_vs_cpu": _rel(emu[name], cpu[name])}
            if gpu is not None:
                entry["gpu_vs_emu"] = _rel(gpu[name], emu[name])
                entry["gpu_vs_cpu"] = _rel(gpu[name], cpu[name])
                worst = max(worst, entry["gpu_vs_emu"])
            row["outputs"][name] = entry
        row["seconds"] = round(time.perf_counter() - started, 3)
        rows.append(row)
        summary = ", ".join(f"{n} " + "/".join(f"{v:.1e}" for v in e.values()) for n, e in row["outputs"].items())
        print(f"{kind:8s} {str(cfg.get('dtype')):15s} {summary}", flush=True)
    result = {
        "device": torch.cuda.get_device_name() if on_gpu else None,
        "torch": torch.__version__,
        "columns": "relative max difference: emu_vs_cpu[/gpu_vs_emu/gpu_vs_cpu]",
        "worst_gpu_vs_emu": worst if on_gpu else None,
        "cases": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
