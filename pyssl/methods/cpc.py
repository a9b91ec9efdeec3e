"""Contrastive Predictive Coding on image patches (van den Oord et al., 2018; Hénaff et al., 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyssl.losses import InfoNCELoss
from pyssl.methods._pretext import MethodError, PretextMethod, as_method_error, make_backbone, pretext_spec
from pyssl.methods.registry import register
from pyssl.pretext.transforms import extract_patches, sliding_grid, sliding_origins


class CausalRowConv(nn.Module):
    """Context network: residual convolutions whose output at grid row ``i`` depends only on
    rows ``<= i`` (any column), so the context never sees the rows it is asked to predict.

    Causality comes from the padding: each ``(rows, 3)`` kernel is padded ``rows - 1`` rows
    above and none below, so output row ``i`` reads input rows ``i - rows + 1 .. i``.
    """

    def __init__(self, dim: int, layers: int = 2, rows: int = 2):
        super().__init__()
        self.rows = rows
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, (rows, 3)) for _ in range(layers))

    def forward(self, z: Tensor) -> Tensor:  # (N, D, G, G) -> (N, D, G, G)
        c = z
        for conv in self.convs:
            c = c + conv(F.relu(F.pad(c, (1, 1, self.rows - 1, 0))))
        return c


@register("cpc")
class CPC(PretextMethod):
    """Predict the encodings of patches further down the image from the rows above them.

    Every image is cut into a G x G grid of overlapping ``patch_size`` patches every
    ``stride`` pixels; the shared patch encoder (the backbone) embeds each into ``z[i, j]``.
    A causal context network (:class:`CausalRowConv`) summarises rows ``<= i`` into
    ``c[i, j]``; for every offset ``k = 1..steps`` a linear map ``W_k`` predicts
    ``z[i + k, j]`` from ``c[i, j]``. Each offset's predictions are scored with InfoNCE against
    all the targets of that offset in the batch (other positions of the same image and
    other images are the negatives), so the encoder must keep what is predictable across
    space -- the shape of the digit -- rather than pixel detail.

    The loss is pyssl's fused :class:`~pyssl.losses.InfoNCELoss`: cosine similarity over a
    temperature (the normalised variant of later CPC/MoCo-style work) rather than the
    paper's raw dot product, which keeps logits bounded on small batches. As in the
    original, patches overlap, so a target shares pixels with the bottom row of its
    context for ``k = 1``; ``steps >= 2`` adds predictions that cannot rely on that.
    The small backbone keeps BatchNorm (CPC v2 swaps it for LayerNorm at scale, where
    batch statistics can leak across patches); the fused loss's in-batch negatives already
    make collapse costly.

    ``last_metrics`` has ``cpc_acc`` (how often the true target is the most similar of the
    candidates, over all offsets), ``chance`` (the same for a random guess) and
    ``cpc_acc_k{k}`` per offset. Images smaller than ``patch_size + steps * stride`` raise
    ``ValueError`` naming the minimum.

    Args:
        patch_size: side of a patch (default: half the image).
        stride: pixels between neighbouring patches (default: half the patch).
        steps: K, how many rows ahead are predicted (default 2, all a 3x3 grid allows).
        context_layers: causal conv layers of the context network.
        temperature: InfoNCE temperature.
        backbone, image_size, in_channels, mean, std: as :class:`~pyssl.methods.rotnet.RotNet`.
    """

    spec = pretext_spec("colour_digits")

    def __init__(
        self,
        backbone: str | nn.Module = "small",
        image_size: int = 32,
        in_channels: int = 3,
        patch_size: int | None = None,
        stride: int | None = None,
        steps: int = 2,
        context_layers: int = 2,
        temperature: float = 0.1,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ):
        super().__init__(image_size, in_channels, mean, std)
        if not isinstance(steps, int) or steps < 1:
            raise MethodError(f"cpc: steps must be a positive int, got {steps!r}")
        if not isinstance(context_layers, int) or context_layers < 1:
            raise MethodError(f"cpc: context_layers must be a positive int, got {context_layers!r}")
        self.patch_size = int(patch_size or max(2, image_size // 2))
        self.stride = int(stride or max(1, self.patch_size // 2))
        self.steps = steps
        as_method_error(self._grid, image_size)
        self.backbone = make_backbone(backbone, in_channels, self.patch_size)
        dim = self.backbone.out_dim
        self.context = CausalRowConv(dim, context_layers)
        self.predictors = nn.ModuleList(nn.Linear(dim, dim) for _ in range(steps))
        self.loss_fn = InfoNCELoss(temperature=temperature)

    def _grid(self, size: int) -> int:
        # A prediction k = steps rows ahead needs steps + 1 rows of patches.
        return sliding_grid(size, self.patch_size, self.stride, self.steps + 1, task="cpc")

    def check_images(self, images: Tensor) -> None:
        super().check_images(images)
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"cpc: expected square images, got {images.shape[-2]}x{images.shape[-1]}")
        self._grid(images.shape[-1])

    def encode_patches(self, images: Tensor) -> Tensor:
        """Patch encodings ``z`` as a map ``(N, D, G, G)`` (grid row, grid column)."""
        n, size = images.shape[0], images.shape[-1]
        grid = self._grid(size)
        origins = sliding_origins(n, size, self.patch_size, self.stride, device=images.device)
        patches = extract_patches(self.normalize(images), origins, self.patch_size).flatten(0, 1)
        return self.backbone(patches).view(n, grid, grid, -1).permute(0, 3, 1, 2)

    def pretext_loss(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.encode_patches(images)
        c = self.context(z)
        losses, metrics = [], {}
        correct = queries = chance = 0.0
        for k, predictor in enumerate(self.predictors, start=1):
            # Context rows 0..G-1-k predict target rows k..G-1; one row per (image, position).
            pred = predictor(c[:, :, :-k].permute(0, 2, 3, 1).flatten(0, 2))
            target = z[:, :, k:].permute(0, 2, 3, 1).flatten(0, 2)
            losses.append(self.loss_fn(pred, target))
            hits = _top1_hits(pred.detach(), target.detach())
            metrics[f"cpc_acc_k{k}"] = hits / len(pred)
            # A random guess among len(pred) targets is right 1/len(pred) of the time: 1 hit per offset.
            correct, queries, chance = correct + hits, queries + len(pred), chance + 1.0
        metrics.update(cpc_acc=correct / queries, chance=torch.tensor(chance / queries))
        return torch.stack(losses).mean(), metrics


def _top1_hits(pred: Tensor, target: Tensor, max_queries: int = 1024) -> Tensor:
    """How many of (up to ``max_queries``) predictions have their own target as the most similar
    of all targets, scaled to all rows (the subset keeps the cost linear in large batches)."""
    rows = min(len(pred), max_queries)
    sim = F.normalize(pred[:rows].float(), dim=1) @ F.normalize(target.float(), dim=1).T
    hits = (sim.argmax(dim=1) == torch.arange(rows, device=pred.device)).sum()
    return hits.float() * (len(pred) / rows)
