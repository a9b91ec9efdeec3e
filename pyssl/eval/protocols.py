"""Every evaluation protocol for several encoders and label fractions, and its table."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn

from pyssl.eval.features import extract_features
from pyssl.eval.knn import knn_predict
from pyssl.eval.probes import balanced_subset, fine_tune, linear_probe

PROTOCOLS = ("linear", "knn", "finetune")


def evaluate_encoders(
    encoders: dict[str, nn.Module | None],
    transform: Callable[[Tensor], Tensor],
    train,
    test,
    fractions=(0.01, 0.1, 1.0),
    protocols=PROTOCOLS,
    k: int = 200,
    t: float = 0.1,
    finetune_steps: int = 300,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    layer: str | None = None,
    grid: int = 1,
) -> dict:
    """``{encoder_name: {protocol: {fraction: accuracy}}}``.  ``None`` as an encoder means raw
    pixels (fine-tuning is then skipped: it would be the linear probe again).  ``train``/``test``
    are :class:`pyssl.data.ImageDataset` on the evaluation device.  ``layer`` (a module name, or
    ``"mid"`` for each encoder's :func:`middle_layer`) and ``grid`` choose the features of the
    linear probe and kNN (see :func:`extract_features`); fine-tuning always uses the output."""
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"unknown protocol {p!r} (choose from {', '.join(PROTOCOLS)})")
    num_classes = train.num_classes
    subsets = {f: balanced_subset(train.labels, f, seed).to(train.images.device) for f in fractions}
    results: dict = {}
    for name, enc in encoders.items():
        res = results[name] = {p: {} for p in protocols}
        if "linear" in protocols or "knn" in protocols:
            at = None if enc is None else layer  # raw pixels have no layers
            tr = extract_features(enc, train.images, transform, layer=at, grid=grid if at else 1)
            te = extract_features(enc, test.images, transform, layer=at, grid=grid if at else 1)
        for f in fractions:
            idx = subsets[f]
            if "linear" in protocols:
                res["linear"][f] = linear_probe(tr[idx], train.labels[idx], te, test.labels, num_classes=num_classes)
            if "knn" in protocols:
                pred = knn_predict(tr[idx], train.labels[idx], te, k=k, t=t, num_classes=num_classes)
                res["knn"][f] = (pred == test.labels.to(pred.device)).float().mean().item()
            if "finetune" in protocols:
                res["finetune"][f] = (
                    float("nan")
                    if enc is None
                    else fine_tune(
                        enc,
                        transform,
                        train.images[idx],
                        train.labels[idx],
                        test.images,
                        test.labels,
                        num_classes,
                        steps=finetune_steps,
                        seed=seed,
                    )
                )
            if log is not None:
                # raw pixels have nothing to fine-tune (NaN): left out, as the table shows "-"
                log(
                    f"{name}, {f:.0%} labels: "
                    + ", ".join(f"{p} {res[p][f] * 100:.1f}%" for p in protocols if not math.isnan(res[p][f]))
                )
    return results


def format_table(results: dict, k: int = 200, t: float = 0.1) -> str:
    """A fixed-width table: one row per encoder, one column group per protocol and fraction."""
    names = list(results)
    protocols = [p for p in PROTOCOLS if p in next(iter(results.values()))]
    fractions = list(next(iter(results.values()))[protocols[0]])
    titles = {"linear": "linear probe", "knn": f"kNN (k={k}, t={t})", "finetune": "fine-tune"}
    w0 = max(len("labels"), *(len(n) for n in names)) + 2
    colw = 8
    group = colw * len(fractions)
    lines = [
        " " * w0 + "".join(f"{titles[p]:^{group}}|" for p in protocols),
        f"{'labels':<{w0}}" + "".join("".join(f"{f'{f:.0%}':>{colw}}" for f in fractions) + "|" for _ in protocols),
    ]
    lines.append("-" * len(lines[1]))
    for n in names:
        cells = []
        for p in protocols:
            cells.append(
                "".join(
                    f"{'-':>{colw}}" if math.isnan(results[n][p][f]) else f"{results[n][p][f] * 100:>{colw - 1}.1f}%"
                    for f in fractions
                )
                + "|"
            )
        lines.append(f"{n:<{w0}}" + "".join(cells))
    return "\n".join(lines)
