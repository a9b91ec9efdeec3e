"""Evaluation of a (frozen or fine-tuned) encoder with a fraction of the labels.

- :func:`knn_predict`: weighted kNN on cosine similarity, votes ``exp(sim / t)`` (InstDisc;
  k=200, t=0.1 as in lightly's CIFAR-10 benchmark).
- :func:`extract_features` (with ``layer=``, :func:`resolve_layer`, :func:`middle_layer`): frozen
  features of the output or of an intermediate layer.
- :func:`linear_probe`: a linear classifier on frozen, standardised features (full-batch L-BFGS
  with L2 regularisation: deterministic and quick).
- :func:`fine_tune`: the encoder plus a linear layer trained end to end.
- :func:`balanced_subset`: a class-balanced fraction of the labelled images (>= 1 per class).
- :func:`evaluate_encoders`: all of it for several encoders (raw pixels and a random-init
  encoder as baselines) and label fractions; :func:`format_table` prints it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyssl.models import StagedEncoder

PROTOCOLS = ("linear", "knn", "finetune")


def middle_layer(encoder: nn.Module) -> str | None:
    """The name (for :func:`extract_features`'s ``layer``) of the second-to-last stage of the
    first :class:`~pyssl.models.StagedEncoder` inside ``encoder`` (pyssl's ResNet, ConvNet and
    pretext ConvEncoder), or ``None`` for an encoder without stages. The pretext-task papers
    probe this depth: the last stage specialises in the pretext task (Gidaris et al. 2018)."""
    for name, module in encoder.named_modules():
        if isinstance(module, StagedEncoder) and module.num_stages >= 2:
            return ".".join(filter(None, (name, module.stage_name(-2))))
    return None


def resolve_layer(encoder: nn.Module, layer: str | None) -> str | None:
    """The module name ``layer`` stands for in ``encoder``: ``None`` (the output) stays ``None``,
    ``"mid"`` becomes :func:`middle_layer`, any other name must be one of ``named_modules()``.
    Raises ``ValueError`` (naming the layer) otherwise."""
    if layer is None:
        return None
    if layer == "mid":
        name = middle_layer(encoder)
        if name is None:
            raise ValueError(
                "layer 'mid': the encoder has no named stages (pyssl's ResNet, ConvNet and "
                "pretext encoder have them); give a module name instead"
            )
        return name
    modules = dict(encoder.named_modules())
    if layer not in modules or layer == "":
        names = [n for n in modules if n][:12]
        raise ValueError(
            f"no layer {layer!r}: the encoder has no module {layer!r} (some of its modules: {', '.join(names)})"
        )
    return layer


@torch.no_grad()
def extract_features(
    encoder: nn.Module | None,
    images: Tensor,
    transform: Callable[[Tensor], Tensor],
    batch_size: int = 512,
    layer: str | None = None,
    grid: int = 1,
) -> Tensor:
    """Features (N, D) of uint8 images; ``encoder=None`` gives the (normalised) raw pixels.

    ``layer`` probes an intermediate layer instead of the encoder's output (as VISSL and the
    pretext-task papers do): the output of the submodule of that name (``named_modules()``,
    e.g. ``"features.1"`` or ``"layer3"``, or ``"mid"``: see :func:`resolve_layer`),
    average-pooled to ``grid x grid`` cells and flattened.
    """
    if grid < 1:
        raise ValueError(f"extract_features: grid must be >= 1, got {grid}")
    captured: list[Tensor] = []
    hook = None
    if layer is not None:
        if encoder is None:
            raise ValueError("extract_features: layer needs an encoder")
        try:
            layer = resolve_layer(encoder, layer)
        except ValueError as e:
            raise ValueError(f"extract_features: {e}") from None
        hook = encoder.get_submodule(layer).register_forward_hook(lambda mod, args, out: captured.append(out))
    out = []
    was = encoder.training if encoder is not None else False
    # Images may live on the CPU while the encoder is on the GPU (data sets larger than its memory).
    param = next(encoder.parameters(), None) if encoder is not None else None
    device = param.device if param is not None else images.device
    if encoder is not None:
        encoder.eval()
    try:
        for i in range(0, len(images), batch_size):
            x = transform(images[i : i + batch_size].to(device))
            f = encoder(x) if encoder is not None else x
            if layer is not None:
                f = captured.pop()
                if f.dim() == 4:
                    f = F.adaptive_avg_pool2d(f, grid)
            out.append(f.flatten(1).float())
    finally:
        if hook is not None:
            hook.remove()
        if encoder is not None:
            encoder.train(was)
    return torch.cat(out)


@torch.no_grad()
def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    k: int = 200,
    t: float = 0.1,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> Tensor:
    """Predicted labels: the ``k`` most cosine-similar training features vote for their class
    with weight ``exp(similarity / t)``.  ``k`` is clamped to the number of training samples."""
    if k < 1 or t <= 0:
        raise ValueError(f"knn: k must be >= 1 and t > 0, got k={k}, t={t}")
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train_features))
    tr = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(tr.device)
    preds = []
    for i in range(0, len(test_features), chunk):
        te = F.normalize(test_features[i : i + chunk].float().to(tr.device), dim=1)
        sim, idx = (te @ tr.T).topk(k, dim=1)
        votes = torch.zeros(len(te), num_classes, device=tr.device, dtype=sim.dtype)
        votes.scatter_add_(1, labels[idx], (sim / t).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def balanced_subset(labels: Tensor, fraction: float, seed: int = 0) -> Tensor:
    """Indices of ``round(fraction * n_c)`` (at least 1) random images of every class ``c``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    picked = []
    for c in labels.unique():
        if c < 0:
            continue
        idx = (labels == c).nonzero().flatten()
        n = max(1, round(fraction * len(idx)))
        picked.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(picked).sort().values


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    weight_decay: float = 1e-3,
    max_iter: int = 300,
    num_classes: int | None = None,
) -> float:
    """Test accuracy of an L2-regularised multinomial logistic regression on frozen features."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    x = train_features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(x[0])
    x = (x - mean) / std
    xt = (test_features.double().to(x.device) - mean) / std
    y = train_labels.to(x.device)
    with torch.enable_grad():
        w = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
        b = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x @ w + b, y) + weight_decay * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        return ((xt @ w + b).argmax(1) == test_labels.to(x.device)).double().mean().item()


def _random_shift(x: Tensor, pad: int, g: torch.Generator) -> Tensor:
    if pad == 0:
        return x
    dx, dy = torch.randint(-pad, pad + 1, (2,), generator=g).tolist()
    return torch.roll(F.pad(x, (pad,) * 4, mode="replicate"), (dy, dx), (2, 3))[..., pad:-pad, pad:-pad]


def fine_tune(
    encoder: nn.Module,
    transform: Callable[[Tensor], Tensor],
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    num_classes: int,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    shift: int = 2,
    flip: bool = False,
    seed: int = 0,
) -> float:
    """Test accuracy after training a copy of ``encoder`` plus a linear layer end to end (AdamW,
    cosine schedule, random shifts of up to ``shift`` pixels) on the given labelled images."""
    g = torch.Generator().manual_seed(seed)
    enc = copy.deepcopy(encoder).train()
    param = next(enc.parameters(), None)
    device = param.device if param is not None else train_images.device  # images may be on the host
    with torch.no_grad():
        enc.eval()
        dim = enc(transform(train_images[:2].to(device))).flatten(1).shape[1]
        enc.train()
    head = nn.Linear(dim, num_classes).to(device)
    params = list(enc.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    n = len(train_images)
    bs = min(batch_size, n)
    for _ in range(steps):
        idx = torch.randint(0, n, (bs,), generator=g).to(train_images.device)
        x = transform(train_images[idx].to(device))
        x = _random_shift(x, shift, g)
        if flip and bool(torch.randint(0, 2, (1,), generator=g)):
            x = x.flip(3)
        if bs == 1:  # BatchNorm needs two samples
            x = torch.cat([x, x])
            idx = torch.cat([idx, idx])
        loss = F.cross_entropy(head(enc(x).flatten(1)), train_labels[idx.to(train_labels.device)].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    enc.eval()
    with torch.no_grad():
        feats = extract_features(enc, test_images, transform)
        return (head(feats).argmax(1) == test_labels.to(device)).float().mean().item()


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


@torch.no_grad()
def zero_shot_accuracy(model: nn.Module, images: Tensor, labels: Tensor, prompts, batch_size: int = 512) -> float:
    """Accuracy of classifying ``images`` with no labelled example: each image goes to the class
    whose prompts' embedding (``model.zero_shot_classifier(prompts)``, one list of prompts per
    class, in label order) is the most cosine-similar to its own (``model.encode_image``).
    ``model`` is an image-text method such as :class:`pyssl.methods.CLIP`."""
    if not hasattr(model, "zero_shot_classifier") or not hasattr(model, "encode_image"):
        raise ValueError(f"zero-shot classification needs an image-text model, got {type(model).__name__}")
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"zero_shot_accuracy: {len(images)} images and {len(labels)} labels (need as many, > 0)")
    classifier = model.zero_shot_classifier(prompts)
    was = model.training
    model.eval()
    try:
        hits = 0
        for i in range(0, len(images), batch_size):
            scores = model.encode_image(images[i : i + batch_size]) @ classifier.T
            hits += int((scores.argmax(1) == labels[i : i + batch_size].to(scores.device)).sum())
    finally:
        model.train(was)
    return hits / len(images)


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


__all__ = [
    "extract_features",
    "knn_predict",
    "balanced_subset",
    "linear_probe",
    "fine_tune",
    "evaluate_encoders",
    "format_table",
    "zero_shot_accuracy",
    "PROTOCOLS",
]
