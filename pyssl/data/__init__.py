"""Image data sets held in memory as one uint8 tensor (N, C, H, W) plus int64 labels.

The default, :func:`load_digits`, needs no download: scikit-learn's bundled handwritten digits.
Real data comes from local files: CIFAR-10/100 (the python pickle batches), STL-10 (the binary
release) and any ImageFolder tree (``root/class_name/image.png``).  Whole data sets are moved to
the training device once, so batches and augmentation never leave it.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field, replace

import numpy as np
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


# ---- the embedded default ------------------------------------------------------------------------


def load_digits(
    split: str = "train", size: int = 16, channels: int = 3, test_fraction: float = 0.3, seed: int = 0
) -> ImageDataset:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), upsampled to ``size``.

    ``split``: "train", "test" (a fixed class-stratified ``test_fraction`` split) or "all".
    """
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as e:  # pragma: no cover
        raise DataError("the digits data set needs scikit-learn (pip install scikit-learn)") from e
    d = _sk_digits()
    images = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    images = _convert_channels(_resize_uint8(images, size), channels)
    if split != "all":
        if split not in ("train", "test"):
            raise DataError(f"digits: split must be train, test or all, got {split!r}")
        g = torch.Generator().manual_seed(seed)
        test_mask = torch.zeros(len(labels), dtype=torch.bool)
        for c in range(10):
            idx = (labels == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            test_mask[idx[: round(len(idx) * test_fraction)]] = True
        keep = test_mask if split == "test" else ~test_mask
        images, labels = images[keep], labels[keep]
    return ImageDataset(images.contiguous(), labels, [str(i) for i in range(10)], "digits")


# ---- CIFAR-10 / CIFAR-100 (python pickle batches) -----------------------------------------------


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise DataError(f"missing data file {path}") from None
    except Exception as e:
        raise DataError(f"corrupt data file {path}: {type(e).__name__}: {e}") from None


def _key(d: dict, *names: str):
    for n in names:
        for k in (n, n.encode()):
            if k in d:
                return d[k]
    raise KeyError(names[0])


def _find_cifar_dir(path: str, marker: str) -> str:
    for cand in (path, os.path.join(path, "cifar-10-batches-py"), os.path.join(path, "cifar-100-python")):
        if os.path.exists(os.path.join(cand, marker)):
            return cand
    raise DataError(f"no CIFAR files under {path} (expected {marker})")


def load_cifar(path: str, split: str = "train", variant: str = "cifar10") -> ImageDataset:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``, ``batches.meta``) or CIFAR-100 (``train``,
    ``test``, ``meta``; fine labels) from the python pickle release at ``path``."""
    if not os.path.isdir(path):
        raise DataError(f"{variant}: data path {path} does not exist or is not a directory")
    if split not in ("train", "test"):
        raise DataError(f"{variant}: split must be train or test, got {split!r}")
    if variant == "cifar10":
        root = _find_cifar_dir(path, "test_batch")
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_keys, meta_file, meta_key = ("labels",), "batches.meta", "label_names"
    elif variant == "cifar100":
        root = _find_cifar_dir(path, "test")
        files = [split]
        label_keys, meta_file, meta_key = ("fine_labels",), "meta", "fine_label_names"
    else:
        raise DataError(f"unknown CIFAR variant {variant!r}")
    xs, ys = [], []
    for name in files:
        full = os.path.join(root, name)
        d = _unpickle(full)
        try:
            data = np.asarray(_key(d, "data"), dtype=np.uint8)
            labels = np.asarray(_key(d, *label_keys), dtype=np.int64)
            data = data.reshape(-1, 3, 32, 32)
        except (KeyError, ValueError) as e:
            raise DataError(f"corrupt data file {full}: {type(e).__name__}: {e}") from None
        if len(labels) != len(data):
            raise DataError(f"corrupt data file {full}: {len(data)} images but {len(labels)} labels")
        xs.append(data)
        ys.append(labels)
    classes: list[str] = []
    meta = os.path.join(root, meta_file)
    if os.path.exists(meta):
        try:
            classes = [c.decode() if isinstance(c, bytes) else str(c) for c in _key(_unpickle(meta), meta_key)]
        except (KeyError, DataError):
            classes = []
    return ImageDataset(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), classes, variant)


# ---- STL-10 (binary release) --------------------------------------------------------------------


def load_stl10(path: str, split: str = "train", size: int | None = None) -> ImageDataset:
    """STL-10's binary files (``{split}_X.bin`` uint8 images stored column-major, 3x96x96 each;
    ``{split}_y.bin`` labels 1..10; ``unlabeled_X.bin`` has no labels, given as -1)."""
    if not os.path.isdir(path):
        raise DataError(f"stl10: data path {path} does not exist or is not a directory")
    root = path if os.path.exists(os.path.join(path, f"{split}_X.bin")) else os.path.join(path, "stl10_binary")
    if split not in ("train", "test", "unlabeled"):
        raise DataError(f"stl10: split must be train, test or unlabeled, got {split!r}")
    xfile = os.path.join(root, f"{split}_X.bin")
    if not os.path.exists(xfile):
        raise DataError(f"missing data file {xfile}")
    raw = np.fromfile(xfile, dtype=np.uint8)
    per = 3 * 96 * 96
    if raw.size == 0 or raw.size % per:
        raise DataError(f"corrupt data file {xfile}: {raw.size} bytes is not a multiple of {per}")
    images = torch.from_numpy(raw.reshape(-1, 3, 96, 96)).transpose(2, 3).contiguous()
    if split == "unlabeled":
        labels = torch.full((len(images),), -1, dtype=torch.long)
    else:
        yfile = os.path.join(root, f"{split}_y.bin")
        if not os.path.exists(yfile):
            raise DataError(f"missing data file {yfile}")
        y = np.fromfile(yfile, dtype=np.uint8).astype(np.int64) - 1
        if len(y) != len(images) or (len(y) and (y.min() < 0 or y.max() > 9)):
            raise DataError(
                f"corrupt data file {yfile}: {len(y)} labels (values 1..10 expected) for {len(images)} images"
            )
        labels = torch.from_numpy(y)
    classes = []
    names = os.path.join(root, "class_names.txt")
    if os.path.exists(names):
        with open(names) as f:
            classes = [line.strip() for line in f if line.strip()]
    if size:
        images = _resize_uint8(images, size)
    return ImageDataset(images, labels, classes or [str(i) for i in range(10)], "stl10")


# ---- ImageFolder ---------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _read_image(path: str, size: int, channels: int) -> np.ndarray:
    """One image file -> uint8 (C, size, size): shorter side resized to ``size``, centre crop."""
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover
        raise DataError("image files need Pillow (pip install pillow)") from e
    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            a = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"missing data file {path}") from None
    except Exception as e:
        raise DataError(f"corrupt data file {path}: {type(e).__name__}: {e}") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _read_images(paths: list[str], size: int, channels: int) -> Tensor:
    """:func:`_read_image` over many files, in threads (Pillow releases the GIL while it decodes
    and resizes); uint8 (N, C, size, size) in the order of ``paths``. The first bad file raises."""
    from concurrent.futures import ThreadPoolExecutor

    workers = min(16, os.cpu_count() or 1, max(1, len(paths) // 64))
    if workers == 1:
        arrays = [_read_image(p, size, channels) for p in paths]
    else:
        with ThreadPoolExecutor(workers) as pool:
            arrays = list(pool.map(lambda p: _read_image(p, size, channels), paths))
    return torch.from_numpy(np.stack(arrays))


def load_image_folder(path: str, size: int = 32, channels: int = 3) -> ImageDataset:
    """Every image under ``path/<class>/...``, resized (shorter side, then centre crop) to
    ``size`` x ``size``; classes are the sorted sub-directory names. A folder of images without
    sub-directories is unlabelled (labels -1): self-supervised training needs no labels."""
    if not os.path.isdir(path):
        raise DataError(f"folder: data path {path} does not exist or is not a directory")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(
                f"folder: no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}, and no class sub-directories"
            )
        return ImageDataset(_read_images(files, size, channels), torch.full((len(files),), -1), [], "folder")
    files, labels = [], []
    for ci, cname in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(os.path.join(path, cname))):
            for fname in sorted(names):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(dirpath, fname))
                    labels.append(ci)
    if not files:
        raise DataError(f"folder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
    return ImageDataset(_read_images(files, size, channels), torch.tensor(labels), classes, "folder")


# ---- image-text pairs from a caption file (CLIP) ------------------------------------------------

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


# ---- "name:path" specs used by the CLI -----------------------------------------------------------

# colour_digits and videos: the embedded colour data of the pretext tasks (pyssl.data.colour);
# captioned_digits: its image-text pairs (CLIP).
DATA_KINDS = (
    "digits",
    "colour_digits",
    "captioned_digits",
    "videos",
    "cifar10",
    "cifar100",
    "stl10",
    "folder",
    "captions",
)


def load_data(spec: str, image_size: int | None = None) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) for a spec: ``digits``, ``cifar10:PATH``, ``cifar100:PATH``, ``stl10:PATH``
    or ``folder:PATH`` (the folder's ``train``/``val`` (or ``test``) sub-folders if present, else
    a fixed 80/20 split); ``captions:FILE.csv|tsv`` for image-text pairs (:func:`load_caption_file`).
    STL-10 uses its labelled train/test splits (5,000 / 8,000 images)."""
    kind, _, path = spec.partition(":")
    kind = kind.lower()
    if kind not in DATA_KINDS:
        raise DataError(f"unknown data set {kind!r} (choose from {', '.join(DATA_KINDS)}; e.g. cifar10:/data/cifar)")
    if kind == "digits":
        size = image_size or 16
        return load_digits("train", size=size), load_digits("test", size=size)
    if kind in ("colour_digits", "captioned_digits", "videos"):
        from pyssl.data.colour import load_colour_data

        return load_colour_data(kind, image_size)
    if not path:
        raise DataError(f"data set {kind} needs a path: --data {kind}:PATH")
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise DataError(f"data path {path} does not exist")
    if kind in ("cifar10", "cifar100"):
        train, test = load_cifar(path, "train", kind), load_cifar(path, "test", kind)
        if image_size and image_size != 32:
            train = ImageDataset(_resize_uint8(train.images, image_size), train.labels, train.classes, kind)
            test = ImageDataset(_resize_uint8(test.images, image_size), test.labels, test.classes, kind)
        return train, test
    if kind == "stl10":
        train, test = load_stl10(path, "train", image_size), load_stl10(path, "test", image_size)
        return train, test
    if kind == "captions":
        return load_caption_file(path, image_size or 32)
    size = image_size or 32
    for tr, te in (("train", "val"), ("train", "test")):
        if os.path.isdir(os.path.join(path, tr)) and os.path.isdir(os.path.join(path, te)):
            return load_image_folder(os.path.join(path, tr), size), load_image_folder(os.path.join(path, te), size)
    full = load_image_folder(path, size)
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))
    cut = max(1, len(full) // 5)
    return full.subset(perm[cut:]), full.subset(perm[:cut])


def batches(num_items: int, batch_size: int, epoch: int, seed: int, drop_last: bool = True):
    """Index batches of one epoch: a permutation fixed by (seed, epoch), so a resumed run sees
    the same order and can skip the batches it already trained on."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_items, generator=g)
    stop = num_items - num_items % batch_size if drop_last else num_items
    return [perm[i : i + batch_size] for i in range(0, stop, batch_size)]


__all__ = [
    "ImageDataset",
    "DataError",
    "load_digits",
    "load_cifar",
    "load_stl10",
    "load_image_folder",
    "load_caption_file",
    "load_data",
    "batches",
    "DATA_KINDS",
]
