"""Image data sets held in memory as one uint8 tensor (N, C, H, W) plus int64 labels.

The default, :func:`load_digits`, needs no download: scikit-learn's bundled handwritten digits.
Real data comes from local files: CIFAR-10/100 (the python pickle batches), STL-10 (the binary
release) and any ImageFolder tree (``root/class_name/image.png``).  Whole data sets are moved to
the training device once, so batches and augmentation never leave it.

Image folders and file lists too large for that stream (:mod:`pyssl.data.streaming`,
:func:`open_data`): decoded by DataLoader workers as they are trained on.
"""

from pyssl.data.caption_files import CAPTION_COLUMNS, IMAGE_COLUMNS, MAX_CONTEXT_LENGTH, load_caption_file
from pyssl.data.dataset import DataError, ImageDataset
from pyssl.data.digits import load_digits
from pyssl.data.files import IMAGE_EXTENSIONS, load_cifar, load_image_folder, load_stl10
from pyssl.data.registry import data_defaults, data_kinds, load_data, register_data
from pyssl.data.sampling import batches
from pyssl.data.specs import DATA_KINDS
from pyssl.data.streaming import (
    DataWarning,
    EpochBatchSampler,
    StreamingImageDataset,
    choose_streaming,
    memory_budget,
    open_data,
    read_file_list,
)

__all__ = [
    "ImageDataset",
    "DataError",
    "load_digits",
    "load_cifar",
    "load_stl10",
    "load_image_folder",
    "load_caption_file",
    "load_data",
    "register_data",
    "data_kinds",
    "data_defaults",
    "batches",
    "DATA_KINDS",
    "IMAGE_EXTENSIONS",
    "IMAGE_COLUMNS",
    "CAPTION_COLUMNS",
    "MAX_CONTEXT_LENGTH",
    "StreamingImageDataset",
    "EpochBatchSampler",
    "DataWarning",
    "open_data",
    "read_file_list",
    "choose_streaming",
    "memory_budget",
]
