"""The main job: SimCLR on the embedded digits, on the CPU, in a few minutes.

``python -m pyssl.demo`` (``make demo``) runs ``pyssl train --method simclr`` on scikit-learn's
handwritten digits (no download), then evaluates the encoder with 1 %, 10 % and 100 % of the
labels (linear probe and kNN; fine-tuning with ``--finetune``) beside a random-init encoder and
raw pixels, prints the table and writes the plots (loss, kNN accuracy over epochs, a t-SNE map of
the test features) into the run directory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyssl.demo", description=__doc__.split("\n\n")[1])
    p.add_argument("--method", default="simclr")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--out", default=os.path.join("runs", "demo-simclr-digits"))
    p.add_argument("--k", type=int, default=20, help="kNN neighbours (digits: ~126 training images per class)")
    p.add_argument("--finetune", action="store_true", help="also fine-tune each encoder (slower)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from pyssl import cli
    from pyssl.config import build_trainer, load_run, resolve, write_run_config
    from pyssl.data import load_data
    from pyssl.eval import evaluate_encoders, format_table

    t0 = time.perf_counter()
    print(
        f"== pyssl train --method {args.method} --data digits --epochs {args.epochs} "
        f"(CPU, {torch.get_num_threads()} threads)",
        flush=True,
    )
    # The demo's run directory is its own: running the demo again means training again.
    run = resolve(args.method, "digits", device="cpu", epochs=args.epochs, seed=args.seed, out=args.out, knn_k=args.k)
    trainer = build_trainer(run)
    write_run_config(run, trainer)
    trainer.fit()
    t_train = time.perf_counter() - t0
    method, random_init, ckpt = load_run(args.out, "cpu")
    train, test = load_data("digits", ckpt["extra"]["image_size"])
    protocols = ("linear", "knn", "finetune") if args.finetune else ("linear", "knn")
    name = {"simclr": "SimCLR", "moco": "MoCo v1", "mocov2": "MoCo v2"}.get(args.method, args.method)
    encoders = {f"{name} encoder": method.backbone, "random-init encoder": random_init.backbone, "raw pixels": None}
    print(
        f"== evaluation: {len(train)} training / {len(test)} test digits, {train.image_size}x{train.image_size}, "
        f"class-balanced label fractions",
        flush=True,
    )
    results = evaluate_encoders(
        encoders,
        method.normalize,
        train,
        test,
        fractions=(0.01, 0.1, 1.0),
        protocols=protocols,
        k=args.k,
        t=0.1,
        seed=args.seed,
    )
    table = format_table(results, k=args.k, t=0.1)
    print(table)
    ssl, rnd = results[f"{name} encoder"], results["random-init encoder"]
    margin = {p: (ssl[p][0.1] - rnd[p][0.1]) * 100 for p in protocols}
    print(
        "with 10% of the labels the "
        + name
        + " encoder beats the random-init encoder by "
        + ", ".join(f"{m:+.1f} points ({p})" for p, m in margin.items())
    )
    with open(os.path.join(args.out, "demo_table.txt"), "w") as f:
        f.write(table + "\n")
    cli.main(["plot", args.out, "--device", "cpu"])  # the same pictures as a later `pyssl plot`
    print(f"total {time.perf_counter() - t0:.0f} s (training {t_train:.0f} s); plots and logs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
