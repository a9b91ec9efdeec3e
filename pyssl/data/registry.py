"""The registry of data sets known by name: ``@register_data("name")`` on a loader, ``load_data(spec)``.

A loader takes ``(path, image_size)`` (``image_size`` None: the data set's own) and returns the
``(train, test)`` pair of :class:`~pyssl.data.dataset.ImageDataset`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from pyssl.data.dataset import DataError, ImageDataset

# name -> (loader, whether the spec must name an existing path: "name:PATH")
_DATA_SETS: dict[str, tuple[Callable[[str, int | None], tuple[ImageDataset, ImageDataset]], bool]] = {}


def register_data(name: str, needs_path: bool = False) -> Callable:
    """Decorator of a loader ``(path, image_size) -> (train, test)``: ``load_data("name[:PATH]")`` calls it.
    With ``needs_path``, the spec must name a path that exists (it comes to the loader expanded)."""

    def deco(loader):
        if name in _DATA_SETS:
            raise DataError(f"data set {name!r} is already registered")
        _DATA_SETS[name] = (loader, needs_path)
        return loader

    return deco


def data_kinds() -> tuple[str, ...]:
    """The registered data set names, in the order they were registered."""
    return tuple(_DATA_SETS)


def load_data(spec: str, image_size: int | None = None) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) for a spec: ``digits``, ``cifar10:PATH``, ``cifar100:PATH``, ``stl10:PATH``
    or ``folder:PATH`` (the folder's ``train``/``val`` (or ``test``) sub-folders if present, else
    a fixed 80/20 split); ``captions:FILE.csv|tsv`` for image-text pairs (:func:`load_caption_file`).
    STL-10 uses its labelled train/test splits (5,000 / 8,000 images)."""
    kind, _, path = spec.partition(":")
    kind = kind.lower()
    if kind not in _DATA_SETS:
        raise DataError(f"unknown data set {kind!r} (choose from {', '.join(_DATA_SETS)}; e.g. cifar10:/data/cifar)")
    loader, needs_path = _DATA_SETS[kind]
    if needs_path:
        if not path:
            raise DataError(f"data set {kind} needs a path: --data {kind}:PATH")
        path = os.path.expanduser(path)
        if not os.path.exists(path):
            raise DataError(f"data path {path} does not exist")
    return loader(path, image_size)
