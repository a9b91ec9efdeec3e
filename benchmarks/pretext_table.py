"""Measured numbers of the self-prediction methods: pretext task and linear probe.

For every pretext method and seed: train it with the project's Trainer on its default
embedded data for ``--epochs`` epochs (as ``pyssl train --method NAME``; SimCLR and MoCo v2 on
the colour digits with the same ``small`` network, for comparison), then report on the test split
  * its pretext metric beside chance / the no-learning baseline,
  * two linear probes (pyssl.eval.linear_probe) of its backbone beside the same architecture
    at random initialisation (same seed): the backbone's output (global average pool) with
    all training labels, and the middle conv stage pooled to 2x2 with 10% of the labels
    (class-balanced), the layer and the label-scarce regime the pretext-task papers evaluate;
video colorization instead reports mask propagation (mean object IoU) beside the random-init
model and the copy-from-the-same-location baseline. Prints the mean over seeds; writes every
run to JSON.

    python benchmarks/pretext_table.py --epochs 30 --seeds 0,1,2 [--methods rotnet,jigsaw] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

from pyssl.data.colour import load_videos
from pyssl.eval import balanced_subset, extract_features, linear_probe, middle_layer

METHODS = (
    "rotnet",
    "relative_patch",
    "jigsaw",
    "inpainting",
    "colorization",
    "split_brain",
    "video_colorization",
    "cpc",
    "simclr",
    "mocov2",
)

# The metric that shows the pretext task was learned, and what it is compared with.
PRETEXT = {
    "rotnet": ("rotation_acc", "chance", lambda m: 0.25),
    "relative_patch": ("position_acc", "chance", lambda m: 0.125),
    "jigsaw": ("permutation_acc", "chance (P=100)", lambda m: 0.01),
    "inpainting": ("rec_mse", "context-mean fill", lambda m: m["rec_mse_context_mean"]),
    "colorization": ("ab_rmse", "best constant ab", lambda m: m["ab_rmse_constant"]),
    "split_brain": ("ab_bin_acc", "most frequent bin", lambda m: m["ab_bin_acc_constant"]),
    "video_colorization": ("colour_acc", "copy same location", lambda m: m["colour_acc_copy"]),
    "cpc": ("cpc_acc", "chance", lambda m: m["chance"]),
}


def pretext_on(method, images, batch=128, batches=4) -> dict:
    torch.manual_seed(0)
    out: dict = {}
    n = 0
    for i in range(0, min(len(images), batch * batches), batch):
        m = method.pretext_metrics(images[i : i + batch])
        for k, v in m.items():
            out[k] = out.get(k, 0.0) + v
        n += 1
    return {k: v / n for k, v in out.items()}


def probe(method, train, test, layer=None, grid=1, fraction=1.0, seed=0) -> float:
    tr = extract_features(method.backbone, train.images, method.normalize, layer=layer, grid=grid)
    te = extract_features(method.backbone, test.images, method.normalize, layer=layer, grid=grid)
    keep = balanced_subset(train.labels, fraction, seed) if fraction < 1 else slice(None)
    return linear_probe(tr[keep], train.labels[keep], te, test.labels, num_classes=10)


def run(name: str, epochs: int, seed: int, out_dir: str) -> dict:
    """Train ``name`` as ``pyssl train --method NAME`` would (the contrastive methods on the pretext
    methods' default data and network, for a side-by-side comparison) and measure it."""
    from pyssl.config import build_trainer, resolve

    contrastive = name not in PRETEXT
    settings = dict(
        epochs=epochs,
        seed=seed,
        device="cpu",
        out=os.path.join(out_dir, f"{name}-{seed}"),
        progress=False,
        tensorboard=False,
        knn_every=0,
    )
    if contrastive:
        settings.update(backbone="small")
    trainer = build_trainer(resolve(name, "colour_digits" if contrastive else None, **settings))
    method, train, test = trainer.method, trainer.train_data, trainer.test_data
    random_init = copy.deepcopy(method)
    t0 = time.time()
    trainer.fit()
    seconds = time.time() - t0
    row = {"method": name, "data": train.name, "epochs": epochs, "seed": seed, "train_seconds": round(seconds, 1)}
    if not contrastive:
        metric, base_name, base = PRETEXT[name]
        m_tr, m_rand = pretext_on(method, test.images), pretext_on(random_init, test.images)
        row.update(
            pretext_metric=metric,
            pretext_trained=m_tr[metric],
            pretext_random=m_rand[metric],
            baseline_name=base_name,
            baseline=base(m_tr),
        )
    if name == "video_colorization":
        from pyssl.eval.propagation import propagate_masks

        ds, masks = load_videos("test", with_masks=True)
        p_tr, p_rand = propagate_masks(method, ds.images, masks), propagate_masks(random_init, ds.images, masks)
        row.update(
            probe_metric="mask IoU (frame 0 -> 1..3)",
            probe_trained=p_tr["mask_iou"],
            probe_random=p_rand["mask_iou"],
            probe_baseline=p_tr["mask_iou_copy"],
        )
    else:
        row.update(
            probe_metric=f"linear probe on {train.name}",
            probe_trained=probe(method, train, test),
            probe_random=probe(random_init, train, test),
        )
        mid = dict(layer=middle_layer(method.backbone), grid=2, fraction=0.1, seed=seed)
        row.update(
            mid_layer=mid["layer"],
            mid_probe_trained=probe(method, train, test, **mid),
            mid_probe_random=probe(random_init, train, test, **mid),
        )
    return row


def mean_rows(rows: list[dict]) -> list[dict]:
    """One row per method: numbers averaged over its seeds (with the spread of the probes)."""
    out = []
    for name in dict.fromkeys(r["method"] for r in rows):
        runs = [r for r in rows if r["method"] == name]
        m = dict(runs[0], seeds=len(runs))
        for k, v in runs[0].items():
            if isinstance(v, float):
                m[k] = sum(r[k] for r in runs) / len(runs)
        for k in ("probe", "mid_probe"):
            if f"{k}_trained" in m:
                gains = [r[f"{k}_trained"] - r[f"{k}_random"] for r in runs]
                m[f"{k}_gain_min"], m[f"{k}_gain_max"] = min(gains), max(gains)
        out.append(m)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", default="/tmp/pyssl-pretext-table")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rows = []
    for name in args.methods.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            row = run(name.strip(), args.epochs, seed, args.out)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(
        "| method | data | pretext metric | trained | random init | baseline | probe: trained | random init "
        "| mid-layer probe, 10% labels: trained | random init |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in mean_rows(rows):
        pb = f" (copy: {r['probe_baseline']:.3f})" if "probe_baseline" in r else ""
        mid = f"{r['mid_probe_trained']:.3f} | {r['mid_probe_random']:.3f}" if "mid_probe_trained" in r else "- | -"
        pretext = (
            (
                f"{r['pretext_metric']} | {r['pretext_trained']:.3f} | {r['pretext_random']:.3f} | "
                f"{r['baseline']:.3f} ({r['baseline_name']})"
            )
            if "pretext_metric" in r
            else "- | - | - | -"
        )
        print(
            f"| {r['method']} | {r['data']} | {pretext} | {r['probe_trained']:.3f}{pb} | {r['probe_random']:.3f} | {mid} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"epochs": args.epochs, "seeds": args.seeds, "runs": rows, "mean": mean_rows(rows)}, f, indent=1)


if __name__ == "__main__":
    main()
