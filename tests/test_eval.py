"""Evaluation: kNN against a brute-force float64 reference, balanced subsets, linear probe,
fine-tuning, the table."""

import math

import pytest
import torch
from torch import nn

from pyssl.data import ImageDataset
from pyssl.eval import (
    balanced_subset,
    evaluate_encoders,
    extract_features,
    fine_tune,
    format_table,
    knn_predict,
    linear_probe,
)


def knn_reference(train, labels, test, k, t, c):
    tr = torch.nn.functional.normalize(train.double(), dim=1)
    te = torch.nn.functional.normalize(test.double(), dim=1)
    out = []
    for row in te:
        sims = tr @ row
        order = sorted(range(len(sims)), key=lambda j: -sims[j].item())[:k]
        votes = [0.0] * c
        for j in order:
            votes[labels[j]] += math.exp(sims[j].item() / t)
        out.append(max(range(c), key=lambda i: votes[i]))
    return torch.tensor(out)


@pytest.mark.parametrize("k,t", [(1, 0.1), (5, 0.5), (200, 0.1)])
def test_knn_matches_reference(k, t):
    train, test = torch.randn(40, 6), torch.randn(17, 6)
    labels = torch.randint(0, 4, (40,))
    got = knn_predict(train, labels, test, k=k, t=t, num_classes=4, chunk=5)
    assert torch.equal(got, knn_reference(train, labels.tolist(), test, min(k, 40), t, 4))
    with pytest.raises(ValueError, match="k must be"):
        knn_predict(train, labels, test, k=0)


def test_balanced_subset():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 3)
    idx = balanced_subset(labels, 0.1, seed=1)
    counts = torch.bincount(labels[idx], minlength=3).tolist()
    assert counts == [5, 3, 1]  # rounded, at least one per class
    assert len(set(idx.tolist())) == len(idx)
    assert torch.equal(idx, balanced_subset(labels, 0.1, seed=1))
    assert len(balanced_subset(labels, 1.0)) == 83
    with pytest.raises(ValueError, match="fraction"):
        balanced_subset(labels, 0.0)


def test_linear_probe_separable_and_chance():
    centers = torch.randn(3, 10) * 4
    y = torch.randint(0, 3, (150,))
    x = centers[y] + torch.randn(150, 10)
    assert linear_probe(x[:100], y[:100], x[100:], y[100:]) > 0.9
    noise = torch.randn(150, 10)
    assert linear_probe(noise[:100], y[:100], noise[100:], y[100:]) < 0.7


def _blobs(n=60, size=8):
    """Images whose class is the bright quadrant."""
    y = torch.arange(n) % 4
    x = torch.randint(0, 40, (n, 3, size, size), dtype=torch.uint8)
    h = size // 2
    for i, c in enumerate(y.tolist()):
        r, s = divmod(c, 2)
        x[i, :, r * h : (r + 1) * h, s * h : (s + 1) * h] += 200
    return ImageDataset(x, y, ["a", "b", "c", "d"], "blobs")


def test_features_finetune_and_evaluate():
    data = _blobs()
    enc = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
    )
    transform = lambda x: x.float() / 255  # noqa: E731
    f = extract_features(enc, data.images, transform, batch_size=7)
    assert f.shape == (60, 16) and enc.training  # mode restored
    raw = extract_features(None, data.images, transform)
    assert raw.shape == (60, 192)
    acc = fine_tune(
        enc,
        transform,
        data.images[:40],
        data.labels[:40],
        data.images[40:],
        data.labels[40:],
        4,
        steps=60,
        batch_size=16,
        lr=1e-2,
    )
    assert acc > 0.8
    res = evaluate_encoders(
        {"enc": enc, "pixels": None},
        transform,
        data.subset(torch.arange(40)),
        data.subset(torch.arange(40, 60)),
        fractions=(0.1, 1.0),
        k=5,
        finetune_steps=10,
    )
    assert set(res) == {"enc", "pixels"} and set(res["enc"]) == {"linear", "knn", "finetune"}
    assert res["pixels"]["linear"][1.0] > 0.9 and math.isnan(res["pixels"]["finetune"][0.1])
    table = format_table(res, k=5)
    assert "linear probe" in table and "kNN (k=5" in table and "10%" in table and "pixels" in table
    with pytest.raises(ValueError, match="protocol"):
        evaluate_encoders({"enc": enc}, transform, data, data, protocols=("svm",))


def test_extract_features_of_an_intermediate_layer():
    from pyssl.pretext.nets import ConvEncoder

    torch.manual_seed(0)
    enc = ConvEncoder(3, (4, 6, 8), depth=2)
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    transform = lambda x: x.float() / 255  # noqa: E731
    layer = enc.stage_name(-2)
    assert layer == "features.3"
    got = extract_features(enc, images, transform, batch_size=2, layer=layer, grid=2)
    assert enc.training  # left as it was found
    enc.eval()
    with torch.no_grad():
        mid = enc.features[:4](transform(images))  # (5, 6, 8, 8)
    want = mid.view(5, 6, 2, 4, 2, 4).mean(dim=(3, 5)).flatten(1)  # 2x2 cells of 4x4 pixels
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(extract_features(enc, images, transform), enc.eval()(transform(images)))
    assert not enc.features[3]._forward_hooks  # the hook is gone
    with pytest.raises(ValueError, match="no layer 'layer9'.*features"):
        extract_features(enc, images, transform, layer="layer9")
    with pytest.raises(ValueError, match="grid"):
        extract_features(enc, images, transform, layer=layer, grid=0)
    with pytest.raises(ValueError, match="stage"):
        enc.stage_name(3)


@pytest.mark.cuda
def test_evaluation_with_images_on_the_host_and_the_encoder_on_the_gpu():
    data = _blobs()
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    enc = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
    )
    transform = lambda x: x.float() / 255  # noqa: E731
    on_cpu = extract_features(enc, data.images, transform, batch_size=7)
    gpu_enc = enc.cuda()
    mixed = extract_features(gpu_enc, data.images, transform, batch_size=7)
    assert mixed.is_cuda
    torch.testing.assert_close(mixed.cpu(), on_cpu, rtol=1e-4, atol=1e-5)
    res = evaluate_encoders(
        {"enc": gpu_enc},
        transform,
        data.subset(torch.arange(40)),
        data.subset(torch.arange(40, 60)),
        fractions=(1.0,),
        k=5,
        finetune_steps=5,
    )
    assert all(0.0 <= res["enc"][p][1.0] <= 1.0 for p in ("linear", "knn", "finetune"))


def test_progress_leaves_out_what_raw_pixels_cannot_do():
    from pyssl.data import load_digits

    train, test = load_digits("train", size=8).subset(torch.arange(200)), load_digits("test", size=8)
    lines = []
    results = evaluate_encoders(
        {"raw pixels": None},
        lambda x: x.float() / 255,
        train,
        test,
        fractions=(1.0,),
        protocols=("knn", "finetune"),
        k=5,
        log=lines.append,
    )
    assert math.isnan(results["raw pixels"]["finetune"][1.0])  # nothing to fine-tune
    assert len(lines) == 1 and lines[0].startswith("raw pixels, 100% labels: knn ") and "nan" not in lines[0]
    assert "finetune" not in lines[0]


def test_pyssl_eval_fine_tunes_only_when_asked(tmp_path, monkeypatch):
    # Fine-tuning is opt-in, as the README says (a CLIP run took 8:42 with it, 22 s without).
    # An untrained method stands in for a run: the protocols are what is checked.
    import pyssl.cli
    import pyssl.config
    import pyssl.eval
    from pyssl.methods import build_method

    def untrained_run(path, device):
        cfg = dict(backbone="convnet-small", image_size=8)
        return build_method("simclr", **cfg).eval(), None, {"extra": {"data": "digits", "image_size": 8}}

    asked = []

    def recording(encoders, transform, train, test, *, fractions, protocols, **kwargs):
        asked.append(tuple(protocols))
        return {name: {p: {f: 0.5 for f in fractions} for p in protocols} for name in encoders}

    monkeypatch.setattr(pyssl.config, "load_run", untrained_run)
    monkeypatch.setattr(pyssl.eval, "evaluate_encoders", recording)
    common = [str(tmp_path), "--fractions", "100%", "--no-baselines", "--device", "cpu"]
    assert pyssl.cli.main(["eval", *common]) == 0
    assert pyssl.cli.main(["eval", *common, "--finetune", "--finetune-steps", "1"]) == 0
    assert asked == [("linear", "knn"), ("linear", "knn", "finetune")]
