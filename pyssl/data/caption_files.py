"""Image-text pairs from a caption file (CLIP), in open_clip's CSV/TSV format."""

from __future__ import annotations

import os

import torch

from pyssl.data.dataset import DataError, ImageDataset
from pyssl.data.files import _read_images

IMAGE_COLUMNS = ("filepath", "image", "file", "path")
CAPTION_COLUMNS = ("caption", "title", "text")
MAX_CONTEXT_LENGTH = 77  # CLIP's


def load_caption_file(
    path: str, size: int = 32, channels: int = 3, max_words: int = 20000, test_fraction: float = 0.2
) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) image-text pairs from a CSV (``,``) or TSV (``.tsv``: tab) file with a header,
    open_clip's format: an image column (one of ``filepath``, ``image``, ``file``, ``path``;
    paths relative to the file's folder) and a caption column (``caption``, ``title`` or
    ``text``). Optional columns: ``label`` (class names, for the linear probe and kNN; else
    labels are -1) and ``split`` (``train`` / ``val`` or ``test``; else a fixed random 80/20).

    Images are resized like :func:`load_image_folder`. The word vocabulary is built from the
    training captions (:func:`pyssl.data.captions.build_vocab`, at most ``max_words`` words)
    and kept in ``vocab``; the context length fits the longest training caption (at most 77
    tokens; longer captions are cut).
    """
    import csv

    from pyssl.data import captions as caption_text

    if not os.path.isfile(path):
        raise DataError(f"captions: {path} is not a file")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t" if path.lower().endswith(".tsv") else ","))
    if not rows:
        raise DataError(f"captions: {path} has no rows under its header")
    header = list(rows[0])
    image_key = next((k for k in IMAGE_COLUMNS if k in header), None)
    caption_key = next((k for k in CAPTION_COLUMNS if k in header), None)
    if image_key is None or caption_key is None:
        raise DataError(
            f"captions: {path} needs an image column ({', '.join(IMAGE_COLUMNS)}) and a caption "
            f"column ({', '.join(CAPTION_COLUMNS)}); its header is {header}"
        )
    root = os.path.dirname(os.path.abspath(path))
    images = _read_images([os.path.join(root, r[image_key] or "") for r in rows], size, channels)
    captions = [r[caption_key] or "" for r in rows]
    if "label" in header:
        classes = sorted({r["label"] for r in rows})
        labels = torch.tensor([classes.index(r["label"]) for r in rows])
    else:
        classes, labels = [], torch.full((len(rows),), -1, dtype=torch.long)
    if "split" in header:
        split = [(r["split"] or "").strip().lower() for r in rows]
        unknown = sorted(set(split) - {"train", "val", "test"})
        if unknown:
            raise DataError(f"captions: split must be train, val or test, got {unknown[0]!r} in {path}")
        test = torch.tensor([s != "train" for s in split])
    else:
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))
        test = torch.zeros(len(rows), dtype=torch.bool)
        test[perm[: max(1, round(len(rows) * test_fraction))]] = True
    if test.all() or not test.any():
        raise DataError(f"captions: {path} needs both training and test rows ({len(rows)} rows)")
    train_captions = [c for c, t in zip(captions, test.tolist()) if not t]
    vocab = caption_text.build_vocab(train_captions, max_words)
    longest = max(len(caption_text.split_words(c)) for c in train_captions)
    texts = caption_text.tokenize(captions, min(longest + 2, MAX_CONTEXT_LENGTH), truncate=True, vocab=vocab)
    full = ImageDataset(images, labels, classes, "captions", texts, vocab)
    return full.subset((~test).nonzero().flatten()), full.subset(test.nonzero().flatten())
