"""Pictures of a run: its training loss, its kNN accuracy over epochs and a 2-D map of its test
features (``pyssl plot RUN``)."""

from __future__ import annotations

import os
import sys


class PlotError(Exception):
    """Nothing can be drawn as asked (reported as one line)."""


def _read_log(run: str, name: str, warn) -> list[dict]:
    """A log's rows that parse; a damaged log is drawn as far as it goes, with a warning."""
    from pyssl.train import LOGS, read_log

    path = os.path.join(run, name)
    if not os.path.exists(path):
        return []
    rows, problems = read_log(path, LOGS[name])
    if problems:
        warn(
            f"warning: {path}: skipped {len(problems)} damaged line(s) ({problems[0]}); pyssl train --resume repairs it"
        )
    return rows


def plot_run(
    run: str, out: str | None = None, embedding: str = "tsne", device: str | None = None, warn=None
) -> list[str]:
    """Writes loss.png, knn.png and embedding.png (as far as the run has logs and a checkpoint)
    into ``out`` (default: the run directory); returns the paths written. ``warn``: where notes
    about damaged logs go (default: stderr)."""
    warn = warn or (lambda message: print(message, file=sys.stderr))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("pyssl plot needs matplotlib (pip install matplotlib)") from None
    if not os.path.isdir(run):
        raise PlotError(f"run directory {run} does not exist")
    from matplotlib.ticker import MaxNLocator

    if embedding not in ("tsne", "pca"):
        raise PlotError(f"embedding must be tsne or pca, got {embedding!r}")
    out = out or run
    os.makedirs(out, exist_ok=True)
    run_name = os.path.basename(os.path.abspath(run))
    written = []

    def curve(path: str, x: list, y: list, xlabel: str, ylabel: str, title: str, **style) -> None:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(x, y, **style)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{title} ({run_name})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, path), dpi=120)
        plt.close(fig)
        written.append(path)

    rows = _read_log(run, "metrics.csv", warn)
    if rows:
        steps, losses = [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]
        curve("loss.png", steps, losses, "step", "training loss", "training loss", lw=1)
    rows = _read_log(run, "knn.csv", warn)
    if rows:
        epochs, accuracy = [int(r["epoch"]) for r in rows], [100 * float(r["knn_accuracy"]) for r in rows]
        curve("knn.png", epochs, accuracy, "epoch", "kNN accuracy (%)", "kNN accuracy on the test split", marker="o")
    from pyssl.train import CHECKPOINT_NAME

    if os.path.exists(os.path.join(run, CHECKPOINT_NAME)):
        import torch

        from pyssl.config import default_device, load_run
        from pyssl.data import load_data
        from pyssl.eval import extract_features

        device = device or default_device()
        method, _, ckpt = load_run(run, device)
        extra = ckpt.get("extra", {})
        _, test = load_data(extra.get("data", "digits"), extra.get("image_size"))
        test = test.to(device)
        feats = extract_features(method.backbone, test.images[:5000], method.normalize)
        feats = torch.nn.functional.normalize(feats, dim=1).cpu().numpy()  # the cosine geometry kNN uses
        labels = test.labels[:5000].cpu().numpy()
        if embedding == "tsne":
            from sklearn.manifold import TSNE

            xy = TSNE(2, init="pca", random_state=0, perplexity=min(30, len(feats) - 1)).fit_transform(feats)
        else:
            from sklearn.decomposition import PCA

            xy = PCA(2, random_state=0).fit_transform(feats)
        fig, ax = plt.subplots(figsize=(6, 5.5))
        labelled = bool((labels >= 0).any())
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels if labelled else None, cmap="tab10" if labelled else None, s=6)
        names = test.classes or [str(i) for i in range(int(labels.max()) + 1)]
        if labelled and len(names) <= 20:
            ax.legend(sc.legend_elements()[0], names, fontsize=7, markerscale=0.8, loc="best")
        method_name = (ckpt.get("method") or {}).get("name", "")
        ax.set(
            title=f"test features of {run_name} ({method_name}), {'t-SNE' if embedding == 'tsne' else 'PCA'}",
            xticks=[],
            yticks=[],
        )
        fig.tight_layout()
        fig.savefig(os.path.join(out, "embedding.png"), dpi=120)
        plt.close(fig)
        written.append("embedding.png")
    if not written:
        raise PlotError(f"nothing to plot in {run} (no metrics.csv, knn.csv or checkpoint)")
    return [os.path.join(out, w) for w in written]
