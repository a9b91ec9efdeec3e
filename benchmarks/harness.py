"""Shared benchmark harness: time and peak extra memory of named candidates, printed as ratios
against pyssl and written as JSON.

A benchmark script defines ``CANDIDATES``: a dict name -> factory(config, device) that returns a
zero-argument callable running one step (forward + backward, say). Inputs are built by the
factory, before measurement. On CPU each candidate runs in a fresh subprocess whose peak-RSS
mark is reset after set-up (``/proc/self/clear_refs``), so the peak resident-set growth during
the first call is its extra memory; on CUDA the peak of
``torch.cuda.max_memory_allocated`` above the allocation before the call is used.

The JSON goes to ``--out`` or, by default, to ``runs/benchmarks/`` (git-ignored): a run never
rewrites the recorded results in ``benchmarks/results/``; name one of those with ``--out`` to
refresh it.

Usage inside a benchmark script::

    from harness import run_benchmark
    if __name__ == "__main__":
        run_benchmark(__file__, CANDIDATES, configs, reference="pyssl")
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch


def embedding_pair(config: dict, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random ``(config["n"], config["d"])`` leaf embeddings in ``config["dtype"]`` (float32
    by default): the inputs of the paired losses (two views, or image and text)."""
    dtype = getattr(torch, config.get("dtype", "float32"))
    n, d = config["n"], config["d"]
    return tuple(torch.randn(n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM; Linux >= 4.0), so memory the candidate's setup
    used and freed does not count as the step's. False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(step, device: str, min_time: float, max_iters: int) -> dict:
    """Peak extra memory of the first call, then the median time of repeated calls."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
    else:
        _reset_peak_rss()
        before = _rss_bytes()
        step()
        extra = max(0, _peak_rss_bytes() - before)
    times = []
    start = time.perf_counter()
    while len(times) < max_iters and (time.perf_counter() - start < min_time or len(times) < 3):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "iters": len(times), "peak_extra_bytes": int(extra)}


def _child(script: str, candidates: dict, name: str, config: dict, device: str, min_time: float, max_iters: int):
    try:
        step = candidates[name](config, device)
        result = measure(step, device, min_time, max_iters)
    except Exception as err:  # a missing anchor library or an OOM is reported, not fatal
        result = {"error": f"{type(err).__name__}: {err}"}
    print("RESULT " + json.dumps(result), flush=True)


def _run_isolated(script: str, name: str, config: dict, device: str, min_time: float, max_iters: int) -> dict:
    cmd = [
        sys.executable,
        script,
        "--child",
        name,
        "--config",
        json.dumps(config),
        "--device",
        device,
        "--min-time",
        str(min_time),
        "--max-iters",
        str(max_iters),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_output(name: str) -> str:
    """Where a benchmark's JSON goes without ``--out``: ``runs/benchmarks/NAME.json`` (git-ignored)."""
    return os.path.join(REPO_ROOT, "runs", "benchmarks", f"{name}.json")


def run_benchmark(
    script: str, candidates: dict, configs: list[dict], *, reference: str = "pyssl", name: str | None = None
) -> str | None:
    """Runs the benchmark the command line asks for; the path of the JSON written (None in a child)."""
    parser = argparse.ArgumentParser(description=f"benchmark: {os.path.basename(script)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of timed calls per candidate")
    parser.add_argument("--max-iters", type=int, default=20)
    parser.add_argument("--only", default="", help="comma-separated candidate names")
    parser.add_argument("--quick", action="store_true", help="first config only (written to *_quick.json)")
    parser.add_argument("--out", default="", help="JSON output path (default runs/benchmarks/NAME_DEVICE.json)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        _child(script, candidates, args.child, json.loads(args.config), args.device, args.min_time, args.max_iters)
        return

    names = [n for n in candidates if not args.only or n in args.only.split(",")]
    bench_name = name or os.path.splitext(os.path.basename(script))[0]
    report = {
        "benchmark": bench_name,
        "device": args.device,
        "device_name": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "results": [],
    }
    for config in configs[:1] if args.quick else configs:
        print(f"\n== {bench_name} {config} on {args.device}")
        rows = {}
        for n in names:
            if args.device.startswith("cuda"):
                try:
                    rows[n] = measure(candidates[n](config, args.device), args.device, args.min_time, args.max_iters)
                except Exception as err:
                    rows[n] = {"error": f"{type(err).__name__}: {err}"}
                torch.cuda.empty_cache()
            else:
                rows[n] = _run_isolated(script, n, config, args.device, args.min_time, args.max_iters)
        ref = rows.get(reference, {})
        print(
            f"{'candidate':<22}{'time':>12}{'peak extra mem':>18}{'time / ' + reference:>16}{'mem / ' + reference:>16}"
        )
        for n, r in rows.items():
            if "error" in r:
                print(f"{n:<22}  error: {r['error']}")
                continue
            if "seconds" in ref:
                r["time_ratio_vs_reference"] = r["seconds"] / ref["seconds"]
                r["memory_ratio_vs_reference"] = (
                    r["peak_extra_bytes"] / ref["peak_extra_bytes"] if ref["peak_extra_bytes"] else None
                )
            tr = r.get("time_ratio_vs_reference")
            mr = r.get("memory_ratio_vs_reference")
            print(
                f"{n:<22}{r['seconds'] * 1e3:>10.1f}ms{_fmt_bytes(r['peak_extra_bytes']):>18}"
                f"{(f'{tr:.2f}x' if tr else '-'):>16}{(f'{mr:.2f}x' if mr else '-'):>16}"
            )
        report["results"].append({"config": config, "candidates": rows})
    out = args.out or default_output(f"{bench_name}_{args.device.split(':')[0]}{'_quick' if args.quick else ''}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {out}")
    return out
