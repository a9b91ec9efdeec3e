"""Data loaders: the embedded digits and tiny files written in each real format."""

import os
import pickle

import numpy as np
import pytest
import torch

from pyssl.data import (
    DataError,
    ImageDataset,
    batches,
    load_cifar,
    load_data,
    load_digits,
    load_image_folder,
    load_stl10,
)


def test_digits_splits_are_disjoint_stratified_uint8():
    tr, te = load_digits("train", size=16), load_digits("test", size=16)
    assert len(tr) + len(te) == 1797
    assert tr.images.dtype == torch.uint8 and tr.images.shape[1:] == (3, 16, 16)
    assert sorted(tr.labels.unique().tolist()) == list(range(10))
    counts = torch.bincount(te.labels, minlength=10).float()
    assert counts.min() / counts.max() > 0.8  # stratified
    assert tr.images.max() > 200 and tr.images.min() == 0
    one = load_digits("all", size=8, channels=1)
    assert one.images.shape == (1797, 1, 8, 8)
    assert one.images.view(1797, -1).unique(dim=0).shape[0] > 1700


def _write_cifar10(root, n_per_batch=4, corrupt=None):
    os.makedirs(root)
    rng = np.random.default_rng(0)
    expected = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        expected.append((name, data, labels))
        with open(os.path.join(root, name), "wb") as f:
            if name == corrupt:
                f.write(b"\x80\x04not a pickle")
            else:
                pickle.dump({b"data": data, b"labels": labels}, f)
    with open(os.path.join(root, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return expected


def test_cifar10_pickle_batches(tmp_path):
    expected = _write_cifar10(str(tmp_path / "cifar-10-batches-py"))
    train = load_cifar(str(tmp_path), "train")
    test = load_cifar(str(tmp_path), "test")
    assert len(train) == 20 and len(test) == 4 and train.classes[3] == "c3"
    # row-major 3x32x32: channel planes of 1024 bytes
    name, data, labels = expected[1]
    assert torch.equal(train.images[4], torch.from_numpy(data[0].reshape(3, 32, 32)))
    assert train.labels[4].item() == labels[0]
    tr, te = load_data(f"cifar10:{tmp_path}")
    assert len(tr) == 20 and len(te) == 4


def test_cifar100_pickle(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 6), ("test", 3)):
        with open(tmp_path / split, "wb") as f:
            pickle.dump(
                {
                    b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                    b"fine_labels": rng.integers(0, 100, n).tolist(),
                    b"coarse_labels": [0] * n,
                },
                f,
            )
    with open(tmp_path / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, f)
    tr, te = load_data(f"cifar100:{tmp_path}")
    assert len(tr) == 6 and len(te) == 3 and tr.num_classes == 100


def test_cifar_corrupt_and_missing_files_raise_naming_the_file(tmp_path):
    _write_cifar10(str(tmp_path / "c"), corrupt="data_batch_3")
    with pytest.raises(DataError, match="corrupt data file .*data_batch_3"):
        load_cifar(str(tmp_path / "c"), "train")
    os.remove(tmp_path / "c" / "data_batch_5")
    with pytest.raises(DataError, match="data_batch"):
        load_cifar(str(tmp_path / "c"), "train")
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"cifar10:{tmp_path}/nowhere")
    with pytest.raises(DataError, match="unknown data set"):
        load_data("imagenet:/x")
    with pytest.raises(DataError, match="needs a path"):
        load_data("cifar10")


def test_stl10_binary_is_column_major(tmp_path):
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (3, 3, 96, 96), dtype=np.uint8)  # N, C, H, W
    # STL-10 stores each channel plane column-major (Fortran order)
    imgs.transpose(0, 1, 3, 2).tofile(tmp_path / "train_X.bin")
    np.array([1, 10, 5], dtype=np.uint8).tofile(tmp_path / "train_y.bin")
    imgs[:2].transpose(0, 1, 3, 2).tofile(tmp_path / "test_X.bin")
    np.array([2, 3], dtype=np.uint8).tofile(tmp_path / "test_y.bin")
    ds = load_stl10(str(tmp_path), "train")
    assert torch.equal(ds.images, torch.from_numpy(imgs))
    assert ds.labels.tolist() == [0, 9, 4]
    tr, te = load_data(f"stl10:{tmp_path}", image_size=32)
    assert tr.images.shape == (3, 3, 32, 32) and len(te) == 2
    with open(tmp_path / "test_X.bin", "ab") as f:
        f.write(b"xyz")
    with pytest.raises(DataError, match="corrupt data file .*test_X.bin"):
        load_stl10(str(tmp_path), "test")


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    for cls, n in (("cat", 3), ("dog", 2)):
        os.makedirs(tmp_path / cls)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    ds = load_image_folder(str(tmp_path), size=16)
    assert ds.images.shape == (5, 3, 16, 16) and ds.classes == ["cat", "dog"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    tr, te = load_data(f"folder:{tmp_path}", image_size=8)
    assert len(tr) + len(te) == 5
    (tmp_path / "dog" / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="corrupt data file .*bad.png"):
        load_image_folder(str(tmp_path), size=16)


def test_many_images_are_read_in_threads_in_file_order(tmp_path):
    from PIL import Image

    from pyssl.data.files import _read_image

    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    os.makedirs(tmp_path / "a")
    for i in range(300):  # enough for several reader threads
        h, w = rng.integers(12, 40, 2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "a" / f"{i:03d}.png")
    ds = load_image_folder(str(tmp_path), size=10)
    one_by_one = np.stack([_read_image(str(tmp_path / "a" / f"{i:03d}.png"), 10, 3) for i in range(300)])
    assert torch.equal(ds.images, torch.from_numpy(one_by_one))
    (tmp_path / "a" / "150.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="corrupt data file .*150.png"):
        load_image_folder(str(tmp_path), size=10)


def test_dataset_validation():
    with pytest.raises(DataError, match="uint8"):
        ImageDataset(torch.zeros(2, 3, 4, 4), torch.zeros(2))
    with pytest.raises(DataError, match="labels"):
        ImageDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3))


def test_batches_are_a_fixed_permutation_per_epoch():
    a = batches(103, 10, epoch=4, seed=7)
    b = batches(103, 10, epoch=4, seed=7)
    assert len(a) == 10 and all(torch.equal(x, y) for x, y in zip(a, b))
    flat = torch.cat(a)
    assert flat.unique().numel() == 100
    assert not torch.equal(torch.cat(batches(103, 10, epoch=5, seed=7)), flat)
    assert torch.cat(batches(103, 10, 0, 0, drop_last=False)).sort().values.tolist() == list(range(103))
