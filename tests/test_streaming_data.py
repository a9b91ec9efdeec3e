"""Streaming image data (pyssl.data.streaming): the same batches as in memory, every sample once
per epoch over ranks x workers, exact resume mid-epoch, bad files, empty sources, file lists."""

import csv
import math
import os
import warnings

import numpy as np
import pytest
import torch

from pyssl.config import resolve
from pyssl.data import (
    DataError,
    DataWarning,
    EpochBatchSampler,
    ImageDataset,
    StreamingImageDataset,
    batches,
    choose_streaming,
    load_data,
    open_data,
    read_file_list,
)
from pyssl.methods import build_method
from pyssl.train import ConfigError, StopTraining, TrainConfig, Trainer, load_checkpoint


def _write_images(folder, n, seed, ext=".png"):
    """``n`` random images of varied sizes and aspect ratios (so the resize and crop matter)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        h, w = rng.integers(9, 24, 2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i:03d}{ext}"))


def _class_folder(root, per_class=(14, 12, 10)):
    for c, n in enumerate(per_class):
        _write_images(os.path.join(root, f"class{c}"), n, seed=c, ext=".png" if c % 2 == 0 else ".jpg")
    return str(root)


def _rows_of(images: ImageDataset) -> dict[bytes, int]:
    rows = {images.images[r].numpy().tobytes(): r for r in range(len(images))}
    assert len(rows) == len(images)  # every image distinct: a decoded image names its row
    return rows


def test_streamed_batches_equal_the_in_memory_batches(tmp_path):
    root = _class_folder(tmp_path)
    held_train, held_test = open_data(f"folder:{root}", 10, stream=False)
    train, test = open_data(f"folder:{root}", 10, stream=True)
    assert isinstance(held_train, ImageDataset) and isinstance(train, StreamingImageDataset)
    assert len(train) == len(held_train) == 29 and torch.equal(train.labels, held_train.labels)
    assert train.classes == held_train.classes == ["class0", "class1", "class2"]
    # the labelled test split of streamed data is held in memory (for the kNN monitor): equal too
    assert isinstance(test, ImageDataset) and torch.equal(test.images, held_test.images)
    assert torch.equal(test.labels, held_test.labels)
    assert train.mean_std() == held_train.mean_std()
    for epoch, workers in ((0, 0), (1, 2)):
        streamed = list(train.epoch_batches(8, epoch, seed=5, workers=workers))
        expected = [held_train.images[index] for index in batches(len(held_train), 8, epoch, 5)]
        assert len(streamed) == len(expected) == 3
        assert all(torch.equal(s, e) for s, e in zip(streamed, expected))
    # every file decoded, one by one, as load_data's threads decode it
    assert torch.equal(train.in_memory().images, held_train.images)
    assert torch.equal(load_data(f"folder:{root}", 10)[0].images, held_train.images)


def test_every_sample_exactly_once_per_epoch_over_two_ranks_and_two_workers(tmp_path):
    _write_images(tmp_path, 34, seed=1)
    full = StreamingImageDataset(sorted(str(p) for p in tmp_path.iterdir()), [-1] * 34, name="folder", size=8)
    rows = _rows_of(full.in_memory())
    for num, batch_size in ((32, 8), (34, 8)):  # 34: 2 rows left out of each epoch, as in memory
        data = full.subset(torch.arange(num))
        for epoch in (0, 1):
            seen = []
            for rank in (0, 1):
                for images in data.epoch_batches(batch_size, epoch, 7, rank=rank, world_size=2, workers=2):
                    assert images.shape == (batch_size // 2, 3, 8, 8)
                    seen += [rows[img.numpy().tobytes()] for img in images]
            kept = torch.cat(batches(num, batch_size, epoch, 7)).tolist()
            assert sorted(seen) == sorted(kept) and len(set(seen)) == len(seen) == num - num % batch_size
            if num % batch_size == 0:
                assert sorted(seen) == list(range(num))
    # the sampler's shards: contiguous, disjoint, this rank's part of each in-memory batch
    shards = [list(EpochBatchSampler(34, 8, 2, 7, first=1, rank=r, world_size=2)) for r in (0, 1)]
    whole = batches(34, 8, 2, 7)[1:]
    assert [a + b for a, b in zip(*shards)] == [b.tolist() for b in whole] and len(shards[0]) == 3
    with pytest.raises(ValueError, match="batch_size 9 must be a positive multiple of world_size 2"):
        EpochBatchSampler(34, 9, 0, 0, world_size=2)
    with pytest.raises(ValueError, match="first must lie in"):
        EpochBatchSampler(34, 8, 0, 0, first=5)


def test_a_resumed_stream_decodes_no_skipped_batch(tmp_path, monkeypatch):
    _write_images(tmp_path, 24, seed=2)
    data = StreamingImageDataset(sorted(str(p) for p in tmp_path.iterdir()), [-1] * 24, name="folder", size=8)
    decoded = []
    real = StreamingImageDataset._decode
    monkeypatch.setattr(StreamingImageDataset, "_decode", lambda self, row: decoded.append(row) or real(self, row))
    out = list(data.epoch_batches(8, 3, 1, first=2, workers=0))  # in this process: the decodes are seen
    assert len(out) == 1 and decoded == batches(24, 8, 3, 1)[2].tolist()


def _method(seed=0):
    torch.manual_seed(seed)
    return build_method("simclr", backbone="convnet-small", image_size=8, hidden_dim=16, out_dim=8)


def _cfg(out, **kw):
    base = dict(epochs=2, batch_size=8, lr=0.05, out_dir=str(out), progress=False, tensorboard=False, seed=3)
    return TrainConfig(**{**base, "checkpoint_every": 2, "warmup_epochs": 1, "data_workers": 2, **kw})


def _stop_at(n):
    def cb(trainer, step, loss):
        if step == n:
            raise StopTraining

    return cb


def test_resume_mid_epoch_on_the_streaming_path_is_exact(tmp_path):
    root = _class_folder(tmp_path / "data", per_class=(14, 12, 10))  # 29 train images: 3 steps of 8 an epoch
    train, test = open_data(f"folder:{root}", 8, stream=True)
    held, held_test = open_data(f"folder:{root}", 8, stream=False)
    # the same run from memory: equal batches give equal losses, step for step
    knn = dict(knn_every=1, knn_k=5)
    in_memory = Trainer(_method(), held, _cfg(tmp_path / "memory", **knn), held_test).fit()
    full = Trainer(_method(), train, _cfg(tmp_path / "full", **knn), test).fit()
    assert full.steps == 6 and full.losses == in_memory.losses
    part = Trainer(_method(), train, _cfg(tmp_path / "cut"), test, callbacks=[_stop_at(5)]).fit()
    assert part.stopped and part.losses == full.losses[:5]
    # a fresh process would build the model with other random weights: resume must overwrite them
    resumed_trainer = Trainer(_method(seed=99), train, _cfg(tmp_path / "cut"), test)
    resumed = resumed_trainer.fit(resume=True)
    assert resumed.losses == full.losses[4:]  # the checkpoint at step 4, mid-epoch 2 -> steps 5 and 6 again
    with open(tmp_path / "cut" / "metrics.csv") as f:
        assert [float(r["loss"]) for r in csv.DictReader(f)] == full.losses
    for (n, p), (_, q) in zip(
        load_checkpoint(str(tmp_path / "full" / "checkpoint.pt"))["model"].items(),
        resumed_trainer.method.state_dict().items(),
    ):
        assert torch.equal(p, q), n
    # the kNN monitor streamed the training features: the same accuracy as from memory
    assert full.knn == in_memory.knn and len(full.knn) == 2


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])


def test_a_corrupt_file_is_skipped_with_a_warning_and_too_many_are_an_error(tmp_path):
    _write_images(tmp_path, 20, seed=4)
    files = sorted(str(p) for p in tmp_path.iterdir())
    good = StreamingImageDataset(files, [-1] * 20, name="folder", size=8).in_memory()
    _truncate(files[5])
    open(files[6], "w").write("not an image")  # two bad files in a row: 5 takes 7's image
    data = StreamingImageDataset(files, [-1] * 20, name="folder", size=8, max_bad_files=0.1)
    with pytest.warns(DataWarning) as caught:
        streamed = torch.cat(list(data.epoch_batches(10, 0, 0, workers=2)))
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(messages) == 2 and "005.png" in messages[0] + messages[1] and "006.png" in messages[0] + messages[1]
    assert "2 of 20 files skipped so far (max_bad_files=0.1 allows 2)" in messages[-1]
    order = batches(20, 10, 0, 0)
    expected = good.images[[7 if r in (5, 6) else r for r in torch.cat(order).tolist()]]
    assert torch.equal(streamed, expected)  # fixed batch shapes: the next good file stands in
    assert sorted(data.bad_files) == [5, 6]
    # another epoch meets the same files again: no new warning, the same replacement
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        again = torch.cat(list(data.epoch_batches(10, 0, 0, workers=0)))
    assert torch.equal(again, streamed)
    strict = StreamingImageDataset(files, [-1] * 20, name="folder", size=8, max_bad_files=0.05)
    with pytest.warns(DataWarning), pytest.raises(DataError, match=r"folder: 2 of 20 image files do not decode"):
        list(strict.epoch_batches(10, 0, 0, workers=2))
    # before training: the statistics' sample finds them (resolve decodes it)
    with pytest.warns(DataWarning), pytest.raises(DataError, match="more than max_bad_files=0.05 allows"):
        StreamingImageDataset(files, [-1] * 20, name="folder", size=8, max_bad_files=0.05).mean_std()


def test_empty_sources_are_a_clear_error_before_training(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"no images .* in {empty}"):
        open_data(f"folder:{empty}", 8, stream=True)
    (empty / "cls").mkdir()
    (empty / "cls" / "readme.txt").write_text("no image")
    with pytest.raises(DataError, match=f"no images .* under {empty}"):
        open_data(f"folder:{empty}", 8, stream=True)
    listing = tmp_path / "files.txt"
    listing.write_text("# nothing yet\n\n")
    with pytest.raises(DataError, match=f"list: {listing} names no image files"):
        open_data(f"list:{listing}", 8, stream=True)
    with pytest.raises(DataError, match="does not exist"):
        open_data(f"list:{tmp_path / 'missing.txt'}", 8)
    with pytest.raises(DataError, match="stream: digits data is read into memory whole"):
        open_data("digits", 8, stream=True)
    with pytest.raises(ConfigError, match="stream must be True, False or None"):
        resolve("simclr", f"folder:{empty}", stream="yes")


def test_a_flat_folder_streams_unlabelled_and_trains(tmp_path):
    _write_images(tmp_path / "flat", 30, seed=5, ext=".jpg")
    train, test = open_data(f"folder:{tmp_path / 'flat'}", 8, budget=1000)  # 30 x 3 x 8 x 8 > 1000 bytes: streams
    assert isinstance(train, StreamingImageDataset) and (train.labels == -1).all() and train.num_classes == 0
    assert isinstance(test, StreamingImageDataset)  # unlabelled: nothing reads it, so it is not decoded
    assert len(train) + len(test) == 30 and len(test) == 6
    held_train, _ = open_data(f"folder:{tmp_path / 'flat'}", 8, budget=10**6)
    assert isinstance(held_train, ImageDataset)
    assert torch.equal(train.in_memory().images, held_train.images)
    run = resolve(
        "simclr",
        f"folder:{tmp_path / 'flat'}",
        stream=True,
        image_size=8,
        backbone="convnet-small",
        hidden_dim=16,
        epochs=1,
        batch_size=8,
        device="cpu",
        data_workers=1,
        progress=False,
        tensorboard=False,
        out=str(tmp_path / "run"),
    )
    assert isinstance(run.train_set, StreamingImageDataset) and run.train.knn_every == 0
    from pyssl.config import build_trainer

    result = build_trainer(run).fit()
    assert result.steps == 3 and all(map(math.isfinite, result.losses))


def test_a_file_list_with_labels(tmp_path):
    _write_images(tmp_path / "imgs" / "a", 6, seed=6)
    _write_images(tmp_path / "imgs" / "b", 5, seed=7, ext=".jpg")
    lines = ["# path <TAB> label", ""]
    lines += [f"../imgs/a/{i:03d}.png\tcat" for i in range(6)]  # relative to the list's folder
    lines += [f"{tmp_path}/imgs/b/{i:03d}.jpg\tdog" for i in range(4)]  # absolute paths too
    lines += ["../imgs/b/004.jpg"]  # no label: unlabelled
    listing = tmp_path / "lists" / "files.txt"
    listing.parent.mkdir()
    listing.write_text("\n".join(lines) + "\n")
    files, labels, classes = read_file_list(str(listing))
    assert classes == ["cat", "dog"] and labels == [0] * 6 + [1] * 4 + [-1]
    assert files[0] == os.path.join(str(listing.parent), "../imgs/a/000.png") and all(map(os.path.isfile, files))
    numbered = tmp_path / "numbered.txt"
    numbered.write_text("imgs/a/000.png\t3\nimgs/a/001.png\t0\nimgs/a/002.png\n")
    assert read_file_list(str(numbered))[1:] == ([3, 0, -1], [])
    held_train, held_test = open_data(f"list:{listing}", 8, stream=False)
    train, test = open_data(f"list:{listing}", 8, stream=True)
    assert isinstance(train, StreamingImageDataset) and train.classes == ["cat", "dog"] and train.name == "list"
    assert torch.equal(train.labels, held_train.labels) and torch.equal(test.images, held_test.images)
    assert torch.equal(train.in_memory().images, held_train.images)
    assert torch.equal(
        torch.cat([held_train.labels, held_test.labels]).sort().values, torch.tensor(labels).sort().values
    )


def test_statistics_of_a_large_stream_come_from_an_even_spread_of_its_images(tmp_path, monkeypatch):
    import pyssl.data.streaming

    _write_images(tmp_path, 21, seed=8)
    data = StreamingImageDataset(sorted(str(p) for p in tmp_path.iterdir()), [-1] * 21, name="folder", size=8)
    everything = data.in_memory()
    assert data.mean_std() == everything.mean_std()
    monkeypatch.setattr(pyssl.data.streaming, "STATS_SAMPLE", 5)
    assert data.mean_std() == everything.subset(torch.tensor([0, 5, 10, 15, 20])).mean_std()


def test_the_choice_between_memory_and_streaming():
    from pyssl.data import memory_budget

    assert 0 < memory_budget()
    assert choose_streaming(10, None, budget=9) and not choose_streaming(9, None, budget=9)
    assert choose_streaming(1, True, budget=9) and not choose_streaming(10**12, False, budget=9)
    for bad, message in (
        (dict(data_workers=-1), "data_workers must be an integer >= 0"),
        (dict(max_bad_files=1.5), "max_bad_files must be a share of the files in"),
        (dict(stream="auto"), "stream must be True, False or None"),
    ):
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**bad).validate()


def test_the_command_line_streams_when_told(tmp_path, capsys):
    from pyssl.cli import main

    root = _class_folder(tmp_path / "data", per_class=(10, 10, 8))
    tiny = ["--image-size", "8", "--backbone", "convnet-small", "--hidden-dim", "16", "--device", "cpu"]
    argv = ["train", "--data", f"folder:{root}", "--epochs", "1", "--batch-size", "8", "--knn-every", "1", *tiny]
    argv += ["--knn-k", "3", "--no-progress", "--no-tensorboard", "--data-workers", "1"]
    assert main([*argv, "--stream", "--out", str(tmp_path / "streamed")]) == 0
    err = capsys.readouterr().err
    assert "(23 images, 8px, streamed from files)" in err and "kNN accuracy" in err
    assert main([*argv, "--no-stream", "--out", str(tmp_path / "held")]) == 0
    assert "(23 images, 8px)" in capsys.readouterr().err
    logs = [list(csv.DictReader(open(tmp_path / run / "metrics.csv"))) for run in ("streamed", "held")]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]] and len(logs[0]) == 2
