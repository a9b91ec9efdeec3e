"""The built-in data sets of :func:`~pyssl.data.load_data` (``--data NAME[:PATH]``), registered in
the order they are listed."""

from __future__ import annotations

import os

import torch

from pyssl.data.caption_files import load_caption_file
from pyssl.data.colour import load_colour_data
from pyssl.data.dataset import ImageDataset, _resize_uint8
from pyssl.data.digits import load_digits
from pyssl.data.files import _read_images, holdout_split, load_cifar, load_image_folder, load_stl10
from pyssl.data.registry import data_kinds, register_data
from pyssl.data.streaming import read_file_list


# The embedded digits are sized for a CPU; real data sets get the standard CIFAR protocol
# (ResNet-18 with the CIFAR stem, batch 512, 200 epochs, kNN k=200 every 5 epochs).
@register_data(
    "digits",
    defaults={
        "backbone": "convnet-small",
        "image_size": 16,
        "batch_size": 128,
        "epochs": 40,
        "knn_every": 5,
        "hidden_dim": 512,
        "lr": {"simclr": 0.5, "barlow_twins": 0.003, "mae": 0.002, "*": 0.1},
        "warmup_epochs": 2,
        "knn_k": 20,
        # digits are not mirror-symmetric, and 8x8 originals leave little to crop
        "augment_kwargs": {"scale": [0.3, 1.0], "p_flip": 0.0},
        "temperature": {"simclr": 0.2},
    },
)
def _digits(path: str, image_size: int | None):
    size = image_size or 16
    return load_digits("train", size=size), load_digits("test", size=size)


# colour_digits and videos: the embedded colour data of the pretext tasks (pyssl.data.colour);
# captioned_digits: its image-text pairs (CLIP).
@register_data(
    "colour_digits",
    defaults={
        "backbone": "convnet-small",
        "image_size": 32,
        "batch_size": 128,
        "epochs": 20,
        "knn_every": 5,
        "hidden_dim": 512,
        "knn_k": 20,
    },
)
def _colour_digits(path: str, image_size: int | None):
    return load_colour_data("colour_digits", image_size)


# The "small" pretext encoder is too weak to learn the digits from captions.
@register_data(
    "captioned_digits",
    defaults={
        "backbone": "resnet10-small",
        "image_size": 32,
        "batch_size": 128,
        "epochs": 20,
        "knn_every": 5,
        "hidden_dim": 512,
        "knn_k": 20,
    },
)
def _captioned_digits(path: str, image_size: int | None):
    return load_colour_data("captioned_digits", image_size)


@register_data(
    "videos",
    defaults={
        "backbone": "convnet-small",
        "image_size": 32,
        "batch_size": 32,
        "epochs": 20,
        "knn_every": 0,
        "hidden_dim": 512,
    },
)
def _videos(path: str, image_size: int | None):
    return load_colour_data("videos", image_size)


def _cifar(path: str, image_size: int | None, kind: str):
    train, test = load_cifar(path, "train", kind), load_cifar(path, "test", kind)
    if image_size and image_size != 32:
        train = ImageDataset(_resize_uint8(train.images, image_size), train.labels, train.classes, kind)
        test = ImageDataset(_resize_uint8(test.images, image_size), test.labels, test.classes, kind)
    return train, test


@register_data(
    "cifar10",
    needs_path=True,
    defaults={
        "backbone": "resnet18",
        "image_size": 32,
        "batch_size": 512,
        "epochs": 200,
        "knn_every": 5,
        "hidden_dim": 2048,
    },
)
def _cifar10(path: str, image_size: int | None):
    return _cifar(path, image_size, "cifar10")


@register_data(
    "cifar100",
    needs_path=True,
    defaults={
        "backbone": "resnet18",
        "image_size": 32,
        "batch_size": 512,
        "epochs": 200,
        "knn_every": 5,
        "hidden_dim": 2048,
    },
)
def _cifar100(path: str, image_size: int | None):
    return _cifar(path, image_size, "cifar100")


@register_data(
    "stl10",
    needs_path=True,
    defaults={
        "backbone": "resnet18",
        "image_size": 96,
        "batch_size": 256,
        "epochs": 200,
        "knn_every": 5,
        "hidden_dim": 2048,
    },
)
def _stl10(path: str, image_size: int | None):
    return load_stl10(path, "train", image_size), load_stl10(path, "test", image_size)


@register_data("folder", needs_path=True)
def _folder(path: str, image_size: int | None):
    size = image_size or 32
    for tr, te in (("train", "val"), ("train", "test")):
        if os.path.isdir(os.path.join(path, tr)) and os.path.isdir(os.path.join(path, te)):
            return load_image_folder(os.path.join(path, tr), size), load_image_folder(os.path.join(path, te), size)
    full = load_image_folder(path, size)
    train_rows, test_rows = holdout_split(len(full))
    return full.subset(train_rows), full.subset(test_rows)


# A list file of image paths (and labels): pyssl.data.streaming.read_file_list; a fixed 80/20 split.
@register_data("list", needs_path=True)
def _file_list(path: str, image_size: int | None):
    files, labels, classes = read_file_list(path)
    full = ImageDataset(_read_images(files, image_size or 32, 3), torch.tensor(labels), classes, "list")
    train_rows, test_rows = holdout_split(len(full))
    return full.subset(train_rows), full.subset(test_rows)


# Your own image-text pairs (load_caption_file); labels are optional, so no kNN.
@register_data(
    "captions",
    needs_path=True,
    defaults={
        "backbone": "resnet18",
        "image_size": 64,
        "batch_size": 256,
        "epochs": 100,
        "knn_every": 0,
        "hidden_dim": 2048,
    },
)
def _captions(path: str, image_size: int | None):
    return load_caption_file(path, image_size or 32)


# The names of the built-in data sets (others may register more: data_kinds() lists all).
DATA_KINDS = data_kinds()
