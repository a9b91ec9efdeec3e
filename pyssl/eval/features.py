"""Frozen features of an encoder's output or of one of its intermediate layers."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyssl.models.staged import StagedEncoder


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
