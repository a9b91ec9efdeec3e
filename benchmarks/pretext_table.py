"""Measured numbers of the self-prediction methods: pretext task and linear probe.

For every pretext method: train it with the project's Trainer on its default embedded data
for ``--epochs`` epochs, then report on the test split
  * its pretext metric beside chance / the no-learning baseline,
  * the linear-probe accuracy (pyssl.eval.linear_probe, all training labels) of its backbone
    beside the same architecture at random initialisation (same seed);
video colorization instead reports mask propagation (mean object IoU) beside the random-init
model and the copy-from-the-same-location baseline. Writes JSON next to the printed table.

    python benchmarks/pretext_table.py --epochs 10 [--methods rotnet,jigsaw] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

from pyssl.data import load_data
from pyssl.data.colour import load_videos
from pyssl.eval import extract_features, linear_probe
from pyssl.methods import build_method, method_class
from pyssl.train import TrainConfig, Trainer

METHODS = ("rotnet", "relative_patch", "jigsaw", "inpainting", "colorization", "split_brain", "video_colorization")

# The metric that shows the pretext task was learned, and what it is compared with.
PRETEXT = {
    "rotnet": ("rotation_acc", "chance", lambda m: 0.25),
    "relative_patch": ("position_acc", "chance", lambda m: 0.125),
    "jigsaw": ("permutation_acc", "chance (P=100)", lambda m: 0.01),
    "inpainting": ("rec_mse", "context-mean fill", lambda m: m["rec_mse_context_mean"]),
    "colorization": ("ab_rmse", "best constant ab", lambda m: m["ab_rmse_constant"]),
    "split_brain": ("ab_bin_acc", "most frequent bin", lambda m: m["ab_bin_acc_constant"]),
    "video_colorization": ("colour_acc", "copy same location", lambda m: m["colour_acc_copy"]),
}


def pretext_on(method, images, batch=128, batches=4) -> dict:
    torch.manual_seed(0)
    out: dict = {}
    n = 0
    for i in range(0, min(len(images), batch * batches), batch):
        m = method.pretext_metrics(images[i: i + batch])
        for k, v in m.items():
            out[k] = out.get(k, 0.0) + v
        n += 1
    return {k: v / n for k, v in out.items()}


def probe(method, train, test) -> float:
    tr = extract_features(method.backbone, train.images, method.normalize)
    te = extract_features(method.backbone, test.images, method.normalize)
    return linear_probe(tr, train.labels, te, test.labels, num_classes=10)


def run(name: str, epochs: int, seed: int, out_dir: str) -> dict:
    cls = method_class(name)
    spec = cls.default_data
    train, test = load_data(spec, 16 if spec == "digits" else None)
    cfg = {"image_size": train.image_size, "in_channels": train.channels}
    if spec == "digits":
        mean, std = train.mean_std()
        cfg.update(mean=list(mean), std=list(std))
    torch.manual_seed(seed)
    method = build_method(name, **cfg)
    random_init = copy.deepcopy(method)
    d = cls.cli_defaults
    tc = TrainConfig(epochs=epochs, batch_size=d["batch_size"] if spec != "videos" else 32, optimizer="adamw",
                     lr=d["lr"]["*"], weight_decay=cls.train_defaults["weight_decay"], device="cpu", seed=seed,
                     out_dir=os.path.join(out_dir, name), knn_every=0, tensorboard=False, progress=False)
    t0 = time.time()
    Trainer(method, train, tc, test).fit()
    seconds = time.time() - t0
    row = {"method": name, "data": spec, "epochs": epochs, "train_seconds": round(seconds, 1)}
    metric, base_name, base = PRETEXT[name]
    m_tr, m_rand = pretext_on(method, test.images), pretext_on(random_init, test.images)
    row.update(pretext_metric=metric, pretext_trained=m_tr[metric], pretext_random=m_rand[metric],
               baseline_name=base_name, baseline=base(m_tr))
    if name == "video_colorization":
        from pyssl.pretext.video import propagate_masks

        ds, masks = load_videos("test", with_masks=True)
        p_tr, p_rand = propagate_masks(method, ds.images, masks), propagate_masks(random_init, ds.images, masks)
        row.update(probe_metric="mask IoU (frame 0 -> 1..3)", probe_trained=p_tr["mask_iou"],
                   probe_random=p_rand["mask_iou"], probe_baseline=p_tr["mask_iou_copy"])
    else:
        row.update(probe_metric=f"linear probe on {spec}", probe_trained=probe(method, train, test),
                   probe_random=probe(random_init, train, test))
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/pyssl-pretext-table")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rows = []
    for name in args.methods.split(","):
        row = run(name.strip(), args.epochs, args.seed, args.out)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"| method | data | epochs | train s | pretext metric | trained | random init | baseline | probe | trained | random init |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pb = f" (copy: {r['probe_baseline']:.3f})" if "probe_baseline" in r else ""
        print(f"| {r['method']} | {r['data']} | {r['epochs']} | {r['train_seconds']} | {r['pretext_metric']} | "
              f"{r['pretext_trained']:.3f} | {r['pretext_random']:.3f} | {r['baseline']:.3f} ({r['baseline_name']}) | "
              f"{r['probe_metric']} | {r['probe_trained']:.3f}{pb} | {r['probe_random']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
