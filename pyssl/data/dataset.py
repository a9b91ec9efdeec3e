"""The in-memory image data set (one uint8 tensor plus labels) and its error."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


class DataError(ValueError):
    """A data set is missing, malformed or unusable; the message names the path and the problem."""


@dataclass
class ImageDataset:
    """``images``: uint8 (N, C, H, W); ``labels``: int64 (N,) (-1 where unlabelled);
    ``texts``: for image-text data, one caption per image as token rows int64 (N, L)
    (:func:`pyssl.data.captions.tokenize`), else None; ``vocab``: the word list those tokens
    index, None for the captioned digits' own (:data:`pyssl.data.captions.VOCAB`)."""

    images: Tensor
    labels: Tensor
    classes: list[str] = field(default_factory=list)
    name: str = ""
    texts: Tensor | None = None
    vocab: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"{self.name or 'dataset'}: images must be uint8 (N, C, H, W), "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"{self.name or 'dataset'}: {self.images.shape[0]} images but {tuple(self.labels.shape)} labels"
            )
        self.labels = self.labels.long()
        if self.texts is not None and (
            self.texts.dim() != 2 or self.texts.shape[0] != self.images.shape[0] or self.texts.dtype != torch.long
        ):
            raise DataError(
                f"{self.name or 'dataset'}: texts must be int64 token rows ({self.images.shape[0]}, L), "
                f"got {self.texts.dtype} {tuple(self.texts.shape)}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(self.labels.max()) + 1

    def to(self, device) -> ImageDataset:
        texts = self.texts.to(device) if self.texts is not None else None
        return replace(self, images=self.images.to(device), labels=self.labels.to(device), texts=texts)

    def subset(self, index: Tensor) -> ImageDataset:
        index = index.to(self.images.device)
        texts = self.texts[index] if self.texts is not None else None  # on the images' device
        return replace(self, images=self.images[index], labels=self.labels[index], texts=texts)

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std in [0, 1] units (for normalisation)."""
        x = self.images[:10000].float().div_(255)
        return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).clamp_min(1e-3).tolist())


def _resize_uint8(images: Tensor, size: int) -> Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = torch.nn.functional.interpolate(
        images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=size < images.shape[-1]
    )
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _convert_channels(images: Tensor, channels: int | None) -> Tensor:
    if channels is None or images.shape[1] == channels:
        return images
    if channels == 3 and images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1).contiguous()
    if channels == 1 and images.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise DataError(f"cannot convert {images.shape[1]} channels to {channels}")
