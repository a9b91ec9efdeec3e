"""Image data sets too large to decode up front: a list of files decoded as they are trained on.

:class:`StreamingImageDataset` holds file paths and labels only. Its batches come from a
``torch.utils.data.DataLoader`` whose worker processes decode the files with
:func:`pyssl.data.files._read_image`, the decoder of the in-memory path, in the order of
:func:`pyssl.data.sampling.batches` (:class:`EpochBatchSampler`): a streamed batch is bitwise the
batch the in-memory data set gives for the same seed, epoch and rank.

Sources (:func:`open_data`): ``folder:PATH`` (an ImageFolder tree, or a flat folder of
unlabelled images; its ``train``/``val`` (or ``test``) sub-folders if present, else a fixed 80/20
split) and ``list:FILE.txt`` (one image path per line, relative to the file's folder, optionally
followed by a tab and a label: an integer, or a class name). A data set whose decoded size,
``files x C x size x size`` bytes, exceeds :func:`memory_budget` streams; a smaller one is decoded
into memory as before. ``stream=True`` / ``False`` forces either.

A file that does not decode (truncated, not an image, gone) is skipped with a counted
:class:`DataWarning` and its place in the batch taken by the next file of the list that decodes,
so batch shapes stay fixed and a resumed run meets the same replacement. More than
``max_bad_files`` (a share of the files) is a :class:`~pyssl.data.dataset.DataError`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pyssl.data.dataset import DataError, ImageDataset
from pyssl.data.files import _read_image, holdout_split, list_image_folder
from pyssl.data.registry import load_data
from pyssl.data.sampling import batches

#: The data kinds that can stream (the others are read into memory whole).
STREAMABLE_KINDS = ("folder", "list")
#: The memory budget is this share of the memory available (Linux: ``MemAvailable``) ...
STREAM_MEMORY_SHARE = 0.25
#: ... or this many bytes where the available memory is unknown.
STREAM_FALLBACK_BUDGET = 2 * 2**30
#: Images decoded for the normalisation statistics (the in-memory path uses its first 10,000).
STATS_SAMPLE = 10_000
#: The default share of a data set's files that may fail to decode (skipped with a warning).
MAX_BAD_FILES = 0.01


class DataWarning(UserWarning):
    """A data problem that training survives (an image file that does not decode, skipped)."""


def memory_budget() -> int:
    """Bytes a decoded data set may take in host memory before it streams instead:
    :data:`STREAM_MEMORY_SHARE` of the memory available now, :data:`STREAM_FALLBACK_BUDGET`
    where that is unknown (no ``/proc/meminfo``)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(STREAM_MEMORY_SHARE * int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return STREAM_FALLBACK_BUDGET


def choose_streaming(nbytes: int, stream: bool | None, budget: int | None = None) -> bool:
    """Whether a data set of ``nbytes`` decoded bytes streams: ``stream`` when set, else whether
    ``nbytes`` exceeds ``budget`` (default :func:`memory_budget`)."""
    if stream is not None:
        return bool(stream)
    return nbytes > (memory_budget() if budget is None else budget)


def default_workers() -> int:
    """DataLoader worker processes when not told: one per core this process may run on, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def read_file_list(path: str) -> tuple[list[str], list[int], list[str]]:
    """``(files, labels, classes)`` of a list file: one image path per line (relative paths are
    relative to the list's folder), optionally a tab and a label. Labels that are all integers
    are used as they are (``-1``: unlabelled; no class names); otherwise they are class names,
    numbered in sorted order. A line without a label is unlabelled (-1); blank lines and lines
    starting with ``#`` are skipped. Nothing is decoded or opened but the list itself."""
    if not os.path.isfile(path):
        raise DataError(f"list: {path} is not a file")
    root = os.path.dirname(os.path.abspath(path))
    files, names = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            file, _, label = line.partition("\t")
            file, label = os.path.expanduser(file.strip()), label.strip()
            if not file:
                raise DataError(f"list: line {number} of {path} has a label but no path")
            files.append(file if os.path.isabs(file) else os.path.join(root, file))
            names.append(label)
    if not files:
        raise DataError(f"list: {path} names no image files")
    given = [n for n in names if n]

    def integer(text: str) -> bool:
        return text.lstrip("-").isdigit()

    if all(integer(n) for n in given):
        labels = [int(n) if n else -1 for n in names]
        if any(v < -1 for v in labels):
            raise DataError(f"list: {path} has a label below -1 (-1 marks an unlabelled image)")
        return files, labels, []
    classes = sorted(set(given))
    index = {c: i for i, c in enumerate(classes)}
    return files, [index[n] if n else -1 for n in names], classes


@dataclass
class StreamedBatch:
    """One batch as the DataLoader's workers hand it over: ``images`` uint8 (B, C, S, S),
    ``labels`` int64 (B,), ``index`` int64 (B,) the rows asked for, ``bad`` ``(row, reason)`` of
    each file that did not decode (its slot holds the next file that does)."""

    images: Tensor
    labels: Tensor
    index: Tensor
    bad: tuple[tuple[int, str], ...] = ()

    def pin_memory(self) -> StreamedBatch:
        """The DataLoader's pin-memory thread calls this (page-locked: copies to the GPU overlap)."""
        return StreamedBatch(self.images.pin_memory(), self.labels.pin_memory(), self.index, self.bad)


def _streamed_batch(batch: StreamedBatch) -> StreamedBatch:
    """The DataLoader's collate function: ``__getitems__`` already made the batch."""
    return batch


class EpochBatchSampler(torch.utils.data.Sampler):
    """This rank's shard of each batch of one epoch, as row lists: ``batches(num_items,
    batch_size, epoch, seed)`` (the in-memory trainer's order), the first ``first`` batches left
    out (trained before a resume: never decoded), each batch cut into ``world_size`` contiguous
    shards of which ``rank`` gets one. The ranks' shards of an epoch are disjoint and together
    hold every row of its batches once (``num_items % batch_size`` rows, other ones each epoch,
    are left out by every rank, as in memory)."""

    def __init__(
        self, num_items: int, batch_size: int, epoch: int, seed: int, first: int = 0, rank: int = 0, world_size: int = 1
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"EpochBatchSampler: rank must lie in [0, world_size={world_size}), got {rank}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(
                f"EpochBatchSampler: batch_size {batch_size} must be a positive multiple of world_size {world_size}"
            )
        steps = num_items // batch_size
        if not 0 <= first <= steps:
            raise ValueError(f"EpochBatchSampler: first must lie in [0, {steps}] (batches per epoch), got {first}")
        self.num_items, self.batch_size, self.epoch, self.seed = num_items, batch_size, epoch, seed
        self.first, self.rank, self.world_size = first, rank, world_size

    def __len__(self) -> int:
        return self.num_items // self.batch_size - self.first

    def __iter__(self) -> Iterator[list[int]]:
        shard = self.batch_size // self.world_size
        for index in batches(self.num_items, self.batch_size, self.epoch, self.seed)[self.first :]:
            yield index[self.rank * shard : (self.rank + 1) * shard].tolist()


class StreamingImageDataset(torch.utils.data.Dataset):
    """Image files (and their labels, -1 where unlabelled) decoded on demand to uint8
    (C, ``size``, ``size``) as :func:`pyssl.data.files.load_image_folder` decodes them.

    Has what the trainer and :func:`pyssl.config.resolve` read of an
    :class:`~pyssl.data.dataset.ImageDataset` (``labels``, ``classes``, ``name``, ``len``,
    ``image_size``, ``channels``, ``num_classes``, ``mean_std``, ``subset``; ``texts`` and
    ``vocab`` are None) but no ``images``: batches come from :meth:`epoch_batches` (training)
    and :meth:`sequential_batches` (features of every image, for the kNN monitor).

    ``max_bad_files``: the share of the files that may fail to decode, each skipped with a
    :class:`DataWarning`; one more is a :class:`DataError`. ``bad_files``: those met so far in
    this process, row -> reason.
    """

    texts = None
    vocab = None

    def __init__(
        self,
        files: list[str],
        labels,
        classes: list[str] | None = None,
        name: str = "",
        size: int = 32,
        channels: int = 3,
        max_bad_files: float = MAX_BAD_FILES,
    ):
        try:
            import PIL  # noqa: F401  (here: a missing Pillow is one error, not every file "corrupt")
        except ImportError as e:  # pragma: no cover
            raise DataError("image files need Pillow (pip install pillow)") from e
        self.files = list(files)
        self.labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        self.classes, self.name, self.size, self._channels = list(classes or []), name, int(size), int(channels)
        if len(self.files) != len(self.labels):
            raise DataError(f"{name or 'dataset'}: {len(self.files)} files but {len(self.labels)} labels")
        if not self.files:
            raise DataError(f"{name or 'dataset'}: no image files")
        if not 0 <= max_bad_files <= 1:
            raise DataError(f"{name or 'dataset'}: max_bad_files must lie in [0, 1], got {max_bad_files}")
        self.max_bad_files = float(max_bad_files)
        self.bad_files: dict[int, str] = {}

    # -- what an ImageDataset has --

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_size(self) -> int:
        return self.size

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(self.labels.max()) + 1

    @property
    def decoded_bytes(self) -> int:
        """What the data set would take decoded in memory."""
        return len(self) * self._channels * self.size * self.size

    def subset(self, index) -> StreamingImageDataset:
        rows = torch.as_tensor(index, dtype=torch.long).reshape(-1).tolist()
        return StreamingImageDataset(
            [self.files[r] for r in rows],
            self.labels[rows],
            self.classes,
            self.name,
            self.size,
            self._channels,
            self.max_bad_files,
        )

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std in [0, 1] units, of at most :data:`STATS_SAMPLE` images spread
        evenly over the files (every image of a data set that small: then the in-memory values)."""
        m = min(len(self), STATS_SAMPLE)
        rows = torch.linspace(0, len(self) - 1, m).round().long().unique()
        return self._decode_rows(rows.tolist()).mean_std()

    def in_memory(self) -> ImageDataset:
        """Every image decoded into memory (those that do not decode left out, with a warning)."""
        return self._decode_rows(range(len(self)))

    # -- decoding --

    def allowed_bad_files(self) -> int:
        return math.floor(self.max_bad_files * len(self))

    def _decode(self, row: int) -> tuple[np.ndarray | None, str]:
        try:
            return _read_image(self.files[row], self.size, self._channels), ""
        except DataError as e:  # _read_image's only errors are the file's (Pillow is checked above)
            return None, str(e)

    def _decode_rows(self, rows) -> ImageDataset:
        """The images of ``rows`` in memory, in threads (Pillow releases the GIL while it
        decodes); rows that do not decode are left out."""
        rows = list(rows)
        with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
            decoded = list(pool.map(self._decode, rows))
        self._note_bad([(r, reason) for r, (a, reason) in zip(rows, decoded) if a is None], checked=len(rows))
        kept = [(r, a) for r, (a, _) in zip(rows, decoded) if a is not None]
        if not kept:
            raise DataError(f"{self.name}: none of {len(rows)} image files decodes (first: {self.files[rows[0]]})")
        images = torch.from_numpy(np.stack([a for _, a in kept]))
        return ImageDataset(images, self.labels[[r for r, _ in kept]], self.classes, self.name)

    def __getitem__(self, row: int) -> tuple[Tensor, int]:
        batch = self.__getitems__([row])
        self._note_bad(batch.bad)
        return batch.images[0], int(batch.labels[0])

    def __getitems__(self, rows: list[int]) -> StreamedBatch:
        """Decodes ``rows`` (in a DataLoader worker). A file that does not decode is replaced by
        the next one of the list that does: at most ``allowed_bad_files() + 1`` tries, since a
        run of more bad files exceeds the limit anyway (the main process then raises)."""
        images, labels, bad = [], [], []
        tries = min(len(self), self.allowed_bad_files() + 1)
        for row in rows:
            image = None
            for step in range(tries):
                source = (row + step) % len(self)
                if source in self.bad_files:  # known (from before the workers forked): not opened again
                    continue
                image, reason = self._decode(source)
                if image is not None:
                    break
                bad.append((source, reason))
            if image is None:  # never trained on: the main process stops at the bad files
                image, source = np.zeros((self._channels, self.size, self.size), np.uint8), row
            images.append(image)
            labels.append(self.labels[source])
        return StreamedBatch(torch.from_numpy(np.stack(images)), torch.stack(labels), torch.tensor(rows), tuple(bad))

    def _note_bad(self, bad, checked: int | None = None) -> None:
        """Warns once for each file newly found not to decode; raises :class:`DataError` once more
        than ``max_bad_files`` of ``checked`` files (default: all) are bad."""
        checked = len(self) if checked is None else checked
        for row, reason in bad:
            if row not in self.bad_files:
                self.bad_files[row] = reason
                warnings.warn(
                    f"{self.name}: skipped an image that does not decode ({reason}); the next file of the "
                    f"list takes its place. {len(self.bad_files)} of {len(self)} files skipped so far "
                    f"(max_bad_files={self.max_bad_files:g} allows {self.allowed_bad_files()})",
                    DataWarning,
                    stacklevel=3,
                )
        found = len(self.bad_files) if checked == len(self) else len({r for r, _ in bad})
        if found > math.floor(self.max_bad_files * checked):
            first = next(iter(self.bad_files.values()))
            raise DataError(
                f"{self.name}: {found} of {checked} image files do not decode, more than max_bad_files="
                f"{self.max_bad_files:g} allows (first: {first}); remove or replace them, or raise max_bad_files"
            )

    # -- batches --

    def _loader(self, batch_sampler, device: torch.device, workers: int | None, prefetch: int):
        workers = default_workers() if workers is None else workers
        pin = device.type == "cuda"
        loader = torch.utils.data.DataLoader(
            self,
            batch_sampler=batch_sampler,
            num_workers=workers,
            collate_fn=_streamed_batch,
            pin_memory=pin,
            prefetch_factor=prefetch if workers else None,
            # The loader draws its workers' base seed from this generator: left to the global one,
            # it would shift the augmentations' random stream (and an exact resume).
            generator=torch.Generator(),
        )
        for batch in loader:
            if batch.bad:
                self._note_bad(batch.bad)
            yield batch, pin

    def epoch_batches(
        self,
        batch_size: int,
        epoch: int,
        seed: int,
        first: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device="cpu",
        workers: int | None = None,
        max_bad_files: float | None = None,
        prefetch: int = 2,
    ) -> Iterator[Tensor]:
        """This rank's shard of each batch of epoch ``epoch`` from batch ``first`` on
        (:class:`EpochBatchSampler`): uint8 images (batch_size / world_size, C, S, S) on
        ``device``. ``workers`` decoding processes (None: :func:`default_workers`; 0: in this
        process), each ``prefetch`` batches ahead; pinned memory when ``device`` is a GPU."""
        if max_bad_files is not None:
            self.max_bad_files = float(max_bad_files)
        device = torch.device(device)
        sampler = EpochBatchSampler(len(self), batch_size, epoch, seed, first, rank, world_size)
        for batch, pin in self._loader(sampler, device, workers, prefetch):
            yield batch.images.to(device, non_blocking=pin)

    def sequential_batches(
        self, batch_size: int = 512, device="cpu", workers: int | None = None, prefetch: int = 2
    ) -> Iterator[StreamedBatch]:
        """Every row once, in order, in batches of ``batch_size`` (the last one shorter), images
        and labels on ``device``."""
        device = torch.device(device)
        rows = list(range(len(self)))
        sampler = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        for batch, pin in self._loader(sampler, device, workers, prefetch):
            images, labels = batch.images.to(device, non_blocking=pin), batch.labels.to(device, non_blocking=pin)
            yield StreamedBatch(images, labels, batch.index, batch.bad)


# ---- sources -------------------------------------------------------------------------------------


def _listed_splits(kind: str, path: str, size: int) -> tuple[StreamingImageDataset, StreamingImageDataset]:
    """(train, test) of a streamable source, listed and split by the in-memory loaders' rules."""

    def listed(files, labels, classes):
        return StreamingImageDataset(files, labels, classes, kind, size)

    if kind == "folder":
        for tr, te in (("train", "val"), ("train", "test")):
            if os.path.isdir(os.path.join(path, tr)) and os.path.isdir(os.path.join(path, te)):
                return (
                    listed(*list_image_folder(os.path.join(path, tr))),
                    listed(*list_image_folder(os.path.join(path, te))),
                )
        full = listed(*list_image_folder(path))
    else:
        full = listed(*read_file_list(path))
    train_rows, test_rows = holdout_split(len(full))
    return full.subset(train_rows), full.subset(test_rows)


def open_data(
    spec: str,
    image_size: int | None = None,
    stream: bool | None = None,
    max_bad_files: float = MAX_BAD_FILES,
    budget: int | None = None,
):
    """(train, test) for a data spec, as :func:`pyssl.data.load_data` gives it, except that the
    train split of a large ``folder:PATH`` or ``list:FILE`` is a :class:`StreamingImageDataset`.

    ``stream``: None chooses (:func:`choose_streaming`: streams when both splits would take more
    than ``budget`` bytes decoded, default :func:`memory_budget`), True / False force it. The
    test split of a streamed source is decoded into memory when labelled and within the budget
    (the kNN monitor reads it whenever it is due); else it streams as well. Only the listing
    happens here (and, for streamed data, nothing is decoded until asked)."""
    kind, _, path = spec.partition(":")
    kind = kind.lower()
    if kind not in STREAMABLE_KINDS:
        if stream:
            raise DataError(
                f"stream: {kind} data is read into memory whole; {' and '.join(f'{k}:PATH' for k in STREAMABLE_KINDS)} "
                f"can stream"
            )
        return load_data(spec, image_size)
    if not path:
        raise DataError(f"data set {kind} needs a path: --data {kind}:PATH")
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise DataError(f"data path {path} does not exist")
    size = image_size or 32
    train, test = _listed_splits(kind, path, size)
    budget = memory_budget() if budget is None else budget
    if not choose_streaming(train.decoded_bytes + test.decoded_bytes, stream, budget):
        return load_data(spec, image_size)
    train.max_bad_files = test.max_bad_files = max_bad_files
    if bool((test.labels >= 0).any()) and test.decoded_bytes <= budget:
        test = test.in_memory()
    return train, test


__all__ = [
    "StreamingImageDataset",
    "StreamedBatch",
    "EpochBatchSampler",
    "DataWarning",
    "open_data",
    "read_file_list",
    "choose_streaming",
    "memory_budget",
    "default_workers",
    "STREAMABLE_KINDS",
    "STREAM_MEMORY_SHARE",
    "STREAM_FALLBACK_BUDGET",
]
