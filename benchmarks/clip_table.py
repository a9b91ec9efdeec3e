"""Measured numbers of CLIP on the embedded captioned digits.

For every seed: train ``pyssl train --method clip`` (its defaults: ResNet-10-small image tower,
AdamW, 32 px) for ``--epochs`` epochs, then report on the test split
  * zero-shot accuracy: digits (10 classes) and paint colours (8 classes) classified from
    prompts alone (:func:`pyssl.eval.zero_shot_accuracy`), no labelled image;
  * the linear probe on the image tower's output with 1%, 10% and 100% of the training labels,
beside the same model at random initialisation (same seed). Prints the mean over seeds;
writes every run to JSON.

    python benchmarks/clip_table.py --epochs 20 --seeds 0,1,2 [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import torch

from pyssl.config import build_trainer, resolve
from pyssl.data.colour import _stratified_test_mask, captioned_digits
from pyssl.eval import balanced_subset, extract_features, linear_probe, zero_shot_accuracy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import default_output  # noqa: E402

FRACTIONS = (0.01, 0.1, 1.0)


def measure(model, train, test, colour_images, colours, seed: int) -> dict:
    model.eval()
    out = {
        "zero_shot_digit": zero_shot_accuracy(model, test.images, test.labels, model.digit_prompts()),
        "zero_shot_colour": zero_shot_accuracy(model, colour_images, colours, model.colour_prompts()),
    }
    tr = extract_features(model.backbone, train.images, model.normalize)
    te = extract_features(model.backbone, test.images, model.normalize)
    for f in FRACTIONS:
        idx = balanced_subset(train.labels, f, seed)
        out[f"probe_{f:g}"] = linear_probe(tr[idx], train.labels[idx], te, test.labels, num_classes=10)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--json",
        default=default_output("clip_table_cpu"),
        help="output (default runs/benchmarks/clip_table_cpu.json; the recorded one is benchmarks/results/)",
    )
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    images, labels, _, attr = captioned_digits(32)
    test_mask = _stratified_test_mask(labels, 0.3, 0)
    runs = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as out:
            run = resolve(
                "clip",
                epochs=args.epochs,
                seed=seed,
                out=out,
                progress=False,
                tensorboard=False,
                knn_every=0,
                device="cpu",
            )
            trainer = build_trainer(run)
            random_init = copy.deepcopy(trainer.method)
            t0 = time.perf_counter()
            trainer.fit()
            seconds = time.perf_counter() - t0
        row = {"seed": seed, "epochs": args.epochs, "train_seconds": round(seconds, 1)}
        for name, model in (("clip", trainer.method), ("random_init", random_init)):
            row[name] = measure(
                model, trainer.train_data, trainer.test_data, images[test_mask], attr["colour"][test_mask], seed
            )
        runs.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    keys = list(runs[0]["clip"])
    print(f"CLIP on captioned_digits, {args.epochs} epochs, mean of {len(seeds)} seeds (test split)")
    print(f"{'':<14}" + "".join(f"{k:>18}" for k in keys))
    for name in ("clip", "random_init"):
        means = [sum(r[name][k] for r in runs) / len(runs) for k in keys]
        print(f"{name:<14}" + "".join(f"{m:>18.3f}" for m in means))
    print(f"{'chance':<14}{0.1:>18.3f}{0.125:>18.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"torch": torch.__version__, "runs": runs}, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
