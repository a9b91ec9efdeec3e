"""Image data sets read from local files: CIFAR-10/100, STL-10 and ImageFolder trees."""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch
from torch import Tensor

from pyssl.data.dataset import DataError, ImageDataset, _resize_uint8

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


def list_image_folder(path: str) -> tuple[list[str], list[int], list[str]]:
    """The image files of an ImageFolder tree, without decoding any: ``(files, labels, classes)``.
    Classes are the sorted sub-directory names, each searched recursively, files in sorted order;
    a folder without sub-directories holds unlabelled images (labels -1), its own files only."""
    if not os.path.isdir(path):
        raise DataError(f"folder: data path {path} does not exist or is not a directory")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(
                f"folder: no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}, and no class sub-directories"
            )
        return files, [-1] * len(files), []
    files, labels = [], []
    for ci, cname in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(os.path.join(path, cname))):
            for fname in sorted(names):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(dirpath, fname))
                    labels.append(ci)
    if not files:
        raise DataError(f"folder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
    return files, labels, classes


def load_image_folder(path: str, size: int = 32, channels: int = 3) -> ImageDataset:
    """Every image under ``path/<class>/...`` (:func:`list_image_folder`), resized (shorter side,
    then centre crop) to ``size`` x ``size``; classes are the sorted sub-directory names. A folder
    of images without sub-directories is unlabelled (labels -1): self-supervised training needs no
    labels."""
    files, labels, classes = list_image_folder(path)
    return ImageDataset(_read_images(files, size, channels), torch.tensor(labels), classes, "folder")


def holdout_split(num_items: int) -> tuple[Tensor, Tensor]:
    """``(train_rows, test_rows)`` of a data set without its own test split: a fixed random 80/20
    (the same rows on every run and machine; at least one test row)."""
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(0))
    cut = max(1, num_items // 5)
    return perm[cut:], perm[:cut]
