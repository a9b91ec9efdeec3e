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
# name -> the run defaults declared with it (see register_data)
_DEFAULTS: dict[str, dict] = {}
#: The run defaults of a data set registered without its own: a real data set of unknown size.
GENERIC_DEFAULTS = {
    "backbone": "resnet18",
    "image_size": 64,
    "batch_size": 256,
    "epochs": 200,
    "knn_every": 5,
    "hidden_dim": 2048,
}
#: What a data set's defaults may set (pyssl.config reads them; a typo fails at registration).
DEFAULT_KEYS = (
    "backbone",
    "image_size",
    "batch_size",
    "epochs",
    "knn_every",
    "knn_k",
    "hidden_dim",
    "lr",
    "warmup_epochs",
    "augment_kwargs",
    "temperature",
)


def register_data(name: str, needs_path: bool = False, defaults: dict | None = None) -> Callable:
    """Decorator of a loader ``(path, image_size) -> (train, test)``: ``load_data("name[:PATH]")`` calls it.
    With ``needs_path``, the spec must name a path that exists (it comes to the loader expanded).

    ``defaults``: how a run on this data set is sized when the user does not say (keys of
    :data:`DEFAULT_KEYS`; ``lr`` and ``temperature`` map method names, or ``"*"`` for the rest,
    to values tuned for the default batch size); missing keys come from :data:`GENERIC_DEFAULTS`.
    """
    unknown = set(defaults or {}) - set(DEFAULT_KEYS)
    if unknown:
        raise DataError(f"data set {name!r}: unknown default(s) {', '.join(sorted(unknown))}")

    def deco(loader):
        if name in _DATA_SETS:
            raise DataError(f"data set {name!r} is already registered")
        _DATA_SETS[name] = (loader, needs_path)
        _DEFAULTS[name] = {**GENERIC_DEFAULTS, **(defaults or {})}
        return loader

    return deco


def data_defaults(kind: str) -> dict:
    """The run defaults of data set ``kind`` (a copy; :data:`GENERIC_DEFAULTS` for unknown names)."""
    return {k: dict(v) if isinstance(v, dict) else v for k, v in _DEFAULTS.get(kind, GENERIC_DEFAULTS).items()}


def data_kinds() -> tuple[str, ...]:
    """The registered data set names, in the order they were registered."""
    return tuple(_DATA_SETS)


def load_data(spec: str, image_size: int | None = None) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) for a spec: ``digits``, ``cifar10:PATH``, ``cifar100:PATH``, ``stl10:PATH``
    or ``folder:PATH`` (the folder's ``train``/``val`` (or ``test``) sub-folders if present, else
    a fixed 80/20 split), ``list:FILE.txt`` (image paths, optionally tab and label, one a line;
    a fixed 80/20 split: :func:`~pyssl.data.streaming.read_file_list`); ``captions:FILE.csv|tsv`` for image-text pairs (:func:`load_caption_file`).
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
