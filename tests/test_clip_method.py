"""CLIP: the embedded image-text data says what its images show, the tokenizer and the text tower
behave, the method's loss is the CLIP loss of its embeddings, a short run learns to classify
digits and colours from prompts alone, and bad input gets a clear error."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pyssl.data import DataError, ImageDataset
from pyssl.data import captions as cap
from pyssl.data.colour import _stratified_test_mask, captioned_digits, load_captioned_digits
from pyssl.eval import zero_shot_accuracy
from pyssl.methods import MethodError, build_method
from pyssl.models import TextTransformer


@pytest.fixture(scope="module")
def digits16():
    return captioned_digits(16)


# ---- data and tokenizer ----------------------------------------------------------------------------


def test_every_caption_names_its_digit_and_only_true_attributes(digits16):
    _, labels, captions, attr = digits16
    named_colour = named_background = 0
    for caption, label, colour, background in zip(
        captions, labels.tolist(), attr["colour"].tolist(), attr["background"].tolist()
    ):
        words = caption.split()
        assert cap.DIGIT_WORDS[label] in words or str(label) in words, caption
        assert not (set(cap.DIGIT_WORDS) - {cap.DIGIT_WORDS[label]}) & set(words), caption
        colours = set(cap.COLOUR_NAMES) & set(words)
        assert colours <= {cap.COLOUR_NAMES[colour]}, caption
        backgrounds = set(cap.BACKGROUND_NAMES) & set(words)
        assert backgrounds <= {cap.BACKGROUND_NAMES[background]}, caption
        named_colour += bool(colours)
        named_background += bool(backgrounds)
    n = len(captions)
    # p_colour = 0.7, p_background = 0.5: binomial sd is about 0.012 at n = 1797.
    assert abs(named_colour / n - 0.7) < 0.05 and abs(named_background / n - 0.5) < 0.05


def test_the_named_colour_is_the_painted_colour(digits16):
    images, _, _, attr = digits16
    x = images.float() / 255
    # The digit's strokes are the brightest, most saturated pixels; their mean hue is the paint's.
    sat = x.amax(1) - x.amin(1)
    stroke = sat >= sat.flatten(1).quantile(0.9, dim=1)[:, None, None]
    rgb = (x * stroke[:, None]).sum((2, 3)) / stroke.sum((1, 2))[:, None]
    r, g, b = rgb.unbind(1)
    hue = torch.atan2(math.sqrt(3) * (g - b), 2 * r - g - b) / (2 * math.pi) % 1.0
    target = torch.tensor(cap.COLOUR_HUES)[attr["colour"]]
    error = torch.minimum((hue - target).abs(), 1 - (hue - target).abs())
    assert error.median() < 0.05


def test_colour_and_class_are_independent(digits16):
    _, labels, _, attr = digits16
    counts = torch.zeros(10, len(cap.COLOUR_NAMES))
    counts.index_put_((labels, attr["colour"]), torch.ones(len(labels)), accumulate=True)
    assert (counts > 0).all()  # every digit comes in every colour


def test_captioned_digits_are_deterministic():
    a, b = captioned_digits(16, seed=3), captioned_digits(16, seed=3)
    assert torch.equal(a[0], b[0]) and a[2] == b[2]
    assert not torch.equal(a[0], captioned_digits(16, seed=4)[0])


def test_dataset_carries_texts_through_subset_and_split():
    train, test = load_captioned_digits("train", 16), load_captioned_digits("test", 16)
    assert len(train) + len(test) == 1797 and train.texts.shape == (len(train), cap.CONTEXT_LENGTH)
    everything = load_captioned_digits("all", 16)
    mask = _stratified_test_mask(everything.labels, 0.3, 0)
    assert torch.equal(test.texts, everything.texts[mask]) and torch.equal(test.images, everything.images[mask])
    idx = torch.randperm(len(train))[:7]
    sub = train.subset(idx)
    assert torch.equal(sub.texts, train.texts[idx]) and torch.equal(sub.images, train.images[idx])
    with pytest.raises(DataError, match="texts"):
        ImageDataset(train.images[:4], train.labels[:4], texts=train.texts[:3])
    with pytest.raises(DataError, match="texts"):
        ImageDataset(train.images[:4], train.labels[:4], texts=train.texts[:4].float())


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(cap.VOCAB[4:]), min_size=0, max_size=cap.CONTEXT_LENGTH - 2))
def test_tokenize_decode_round_trip(words):
    tokens = cap.tokenize(" ".join(words))
    assert tokens.shape == (1, cap.CONTEXT_LENGTH)
    assert tokens[0, 0] == cap.SOT and tokens[0, len(words) + 1] == cap.EOT
    assert (tokens[0, len(words) + 2 :] == cap.PAD).all()
    assert cap.decode(tokens) == [" ".join(words)]


def test_tokenize_unknown_long_and_bad_input():
    assert cap.decode(cap.tokenize("A ZEBRA seven!")) == ["a <unk> seven"]
    long = " ".join(["one"] * 20)
    with pytest.raises(ValueError, match="truncate=True"):
        cap.tokenize(long)
    cut = cap.tokenize(long, truncate=True)
    assert cut[0, -1] == cap.EOT and cap.decode(cut) == [" ".join(["one"] * (cap.CONTEXT_LENGTH - 2))]
    with pytest.raises(TypeError, match="index 1"):
        cap.tokenize(["a one", 7])
    with pytest.raises(ValueError, match="context_length"):
        cap.tokenize("a one", context_length=2)


# ---- text tower ----------------------------------------------------------------------------------


def test_text_feature_ignores_padding_and_what_follows_eot():
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    enc = TextTransformer(len(cap.VOCAB), cap.EOT, context_length=16, width=32, layers=2, heads=4).eval()
    texts = ["a red seven on a flower", "the digit 3", "a photo of the number one"]
    with torch.no_grad():
        full = enc(cap.tokenize(texts, 16))
        short = enc(cap.tokenize(texts, 9))
        noisy = cap.tokenize(texts, 16)
        after = torch.arange(16)[None] > (noisy == cap.EOT).int().argmax(1, keepdim=True)
        noisy[after] = torch.randint(4, len(cap.VOCAB), (int(after.sum()),))
        torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(enc(noisy), full, rtol=1e-5, atol=1e-5)
        # ... while the words before <eot> do matter
        assert not torch.allclose(enc(cap.tokenize(["a red seven on a temple"], 16)), full[:1], atol=1e-3)


def test_text_tower_rejects_bad_tokens():
    enc = TextTransformer(len(cap.VOCAB), cap.EOT, context_length=16, width=32, layers=1, heads=2)
    good = cap.tokenize(["a one"])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, "):
        enc(good + len(cap.VOCAB))
    with pytest.raises(ValueError, match="end-of-text"):
        enc(torch.full((1, 8), 5))
    with pytest.raises(ValueError, match="int64"):
        enc(good.float())
    with pytest.raises(ValueError, match="rows of 17 tokens"):
        enc(cap.tokenize(["a one"], 17))


# ---- the method ----------------------------------------------------------------------------------


def test_clip_loss_is_the_clip_loss_of_its_embeddings():
    """With no augmentation, training_step's loss and its logit-scale gradient equal a float64
    cross-entropy over the full scaled cosine-similarity matrix, in both directions."""
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    m = build_method(
        "clip",
        backbone="convnet-small",
        image_size=16,
        augment=nn.Identity(),
        embed_dim=24,
        text_width=32,
        text_layers=1,
        text_heads=2,
        temperature=0.2,
    ).eval()
    images = torch.randn(12, 3, 16, 16)
    texts = cap.tokenize(
        cap.digit_captions(
            torch.randint(0, 10, (12,)),
            torch.randint(0, 8, (12,)),
            torch.randint(0, 2, (12,)),
            torch.Generator().manual_seed(1),
        )
    )
    loss = m.training_step((images, texts)).loss
    (grad,) = torch.autograd.grad(loss, m.logit_scale)

    with torch.no_grad():
        zi = m.image_projection(m.backbone(images).flatten(1)).double()
        zt = m.text_projection(m.text_encoder(texts)).double()
    log_scale = m.logit_scale.detach().double().requires_grad_()
    logits = log_scale.exp() * F.normalize(zi, dim=1) @ F.normalize(zt, dim=1).T
    target = torch.arange(12)
    ref = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    (ref_grad,) = torch.autograd.grad(ref, log_scale)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-5)
    assert set(m.last_metrics) == {"loss", "logit_scale", "i2t_acc"}
    assert m.last_metrics["logit_scale"] == pytest.approx(5.0, rel=1e-5)


def test_logit_scale_is_capped_and_can_be_frozen():
    m = build_method("clip", backbone="convnet-small", image_size=16, max_logit_scale=50.0)
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    assert float(m.scale().detach()) == pytest.approx(50.0)
    frozen = build_method("clip", backbone="convnet-small", image_size=16, learn_temperature=False)
    assert not frozen.logit_scale.requires_grad


def test_locked_image_tower_keeps_its_weights_and_statistics(digits16):
    images, labels, captions, _ = digits16
    texts = cap.tokenize(captions[:32])
    m = build_method("clip", backbone="convnet-small", image_size=16, lock_image=True).train()
    assert not m.backbone.training and m.text_encoder.training
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    projection = m.image_projection.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = m.training_step((images[:32], texts)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, value in m.backbone.state_dict().items():  # weights and BatchNorm running statistics
        assert torch.equal(value, before[name]), name
    assert not torch.equal(m.image_projection.weight, projection)
    assert all(p.grad is None for p in m.backbone.parameters())


@pytest.mark.slow
def test_clip_learns_digits_and_colours_from_captions(digits16):
    """120 steps at 16 px: zero-shot digit accuracy 0.28-0.53 and colour accuracy 0.82-0.91 over
    12 seeds (chance 0.10 and 0.125, about 0.013 standard error on 539 images); the random-init
    model is at chance."""
    images, labels, captions, attr = digits16
    texts = cap.tokenize(captions)
    test = _stratified_test_mask(labels, 0.3, 0)
    train_rows = (~test).nonzero().flatten()
    # A fixed seed, as every learning test has: a seed drawn per run made this test fail now and
    # then (seed 1138564015 reaches 0.154, below the 12-seed range quoted above).
    seed = 0
    torch.manual_seed(seed)
    m = build_method("clip", backbone="resnet10-small", image_size=16)
    untrained_digits = zero_shot_accuracy(m, images[test], labels[test], m.digit_prompts())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(120):
        idx = train_rows[torch.randperm(len(train_rows), generator=g)[:128]]
        loss = m.training_step((images[idx], texts[idx])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    digits = zero_shot_accuracy(m, images[test], labels[test], m.digit_prompts())
    colours = zero_shot_accuracy(m, images[test], attr["colour"][test], m.colour_prompts())
    assert untrained_digits < 0.2
    assert digits > 0.17, f"zero-shot digit accuracy {digits:.3f} (seed {seed})"
    assert colours > 0.6, f"zero-shot colour accuracy {colours:.3f} (seed {seed})"


def test_clip_rejects_bad_batches_and_settings():
    m = build_method("clip", backbone="convnet-small", image_size=16)
    images = torch.zeros(4, 3, 16, 16, dtype=torch.uint8)
    with pytest.raises(MethodError, match="image-text pairs"):
        m.training_step(images)
    with pytest.raises(MethodError, match="4 images but 3 texts"):
        m.training_step((images, cap.tokenize(["a one"] * 3)))
    with pytest.raises(MethodError, match="end-of-text"):
        m.training_step((images, torch.full((4, 8), 5)))
    with pytest.raises(MethodError, match="temperature"):
        build_method("clip", temperature=0.0)
    with pytest.raises(MethodError, match="divisible"):
        build_method("clip", text_width=30, text_heads=4)
    with pytest.raises(MethodError, match="max_logit_scale"):
        build_method("clip", temperature=0.07, max_logit_scale=10.0)
    with pytest.raises(MethodError, match="vocab must be a list of words starting with"):
        build_method("clip", vocab=["a", "red", "square"])
    with pytest.raises(MethodError, match="vocab holds a word twice"):
        build_method("clip", vocab=list(cap.SPECIALS) + ["red", "red"])
    with pytest.raises(MethodError, match="vocab_size 9 but vocab has 6 words"):
        build_method("clip", vocab=list(cap.SPECIALS) + ["red", "blue"], vocab_size=9)
    with pytest.raises(MethodError, match="lock_image must be True or False"):
        build_method("clip", lock_image="yes")
    with pytest.raises(ValueError, match="image-text model"):
        zero_shot_accuracy(nn.Linear(2, 2), images, torch.zeros(4, dtype=torch.long), [["a one"]])
    with pytest.raises(ValueError, match="prompts"):
        m.zero_shot_classifier([])


def test_clip_trains_on_captioned_digits_and_refuses_data_without_captions(tmp_path):
    from pyssl.config import build_trainer, resolve
    from pyssl.train import ConfigError

    run = resolve(
        "clip",
        epochs=1,
        image_size=16,
        batch_size=256,
        out=str(tmp_path / "clip"),
        progress=False,
        tensorboard=False,
        knn_every=0,
    )
    trainer = build_trainer(run)
    assert trainer.train_data.name == "captioned_digits" and trainer.train_data.texts is not None
    assert trainer.cfg.optimizer == "adamw"
    result = trainer.fit()
    assert result.steps == len(trainer.train_data) // 256 and all(map(math.isfinite, result.losses))
    with pytest.raises(ConfigError, match="image-text pairs.*--data captioned_digits"):
        resolve("clip", "colour_digits", epochs=1, out=str(tmp_path / "bad"))


# ---- your own image-text pairs: captions:FILE ----------------------------------------------------


def _write_pairs(root, n=40, sep="\t", header=("filepath", "caption", "label"), split=None):
    import csv

    from PIL import Image

    colours = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    name = "pairs.tsv" if sep == "\t" else "pairs.csv"
    with open(root / name, "w", newline="") as f:
        writer = csv.writer(f, delimiter=sep)
        writer.writerow(header + (("split",) if split else ()))
        for i in range(n):
            colour, shape = ("red", "blue")[i % 2], ("square", "stripe")[(i // 2) % 2]
            pixels = torch.randint(0, 60, (16, 16, 3), dtype=torch.uint8)
            if shape == "square":
                pixels[4:12, 4:12] = torch.tensor(colours[colour], dtype=torch.uint8)
            else:
                pixels[:, 6:10] = torch.tensor(colours[colour], dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / f"im{i}.png")
            # the comma needs the CSV quoting of a real caption file
            writer.writerow(
                [f"im{i}.png", f"A {colour} {shape}, seen from above", shape] + ([split(i)] if split else [])
            )
    return root / name


def test_caption_file_gives_pairs_labels_and_a_training_vocabulary(tmp_path):
    from pyssl.data import load_caption_file

    path = _write_pairs(tmp_path, sep=",", split=lambda i: "train" if i < 30 else "test")
    train, test = load_caption_file(str(path), size=16)
    assert (len(train), len(test)) == (30, 10)
    assert train.texts.shape[1] == len("a red square seen from above".split()) + 2
    assert cap.decode(train.texts[:3], train.vocab) == [
        "a red square seen from above",
        "a blue square seen from above",
        "a red stripe seen from above",
    ]
    assert train.classes == ["square", "stripe"] and train.labels[:4].tolist() == [0, 0, 1, 1]
    assert test.vocab == train.vocab and cap.decode(test.texts[:1], test.vocab) == [
        "a red stripe seen from above"
    ]  # row 30
    assert train.images.shape == (30, 3, 16, 16) and train.images.dtype == torch.uint8
    # without a split column: a fixed random 80/20 split
    train, test = load_caption_file(str(_write_pairs(tmp_path)), size=16)
    assert (len(train), len(test)) == (32, 8)


def test_caption_file_words_only_in_test_captions_are_unknown(tmp_path):
    from pyssl.data import load_caption_file

    path = _write_pairs(tmp_path, split=lambda i: "train" if i < 30 else "val")
    lines = path.read_text().splitlines()
    lines[-1] = lines[-1].replace("seen from above", "seen from below")
    path.write_text("\n".join(lines) + "\n")
    train, test = load_caption_file(str(path), size=16)
    assert "below" not in train.vocab
    assert cap.decode(test.texts[-1:], test.vocab)[0].endswith("seen from <unk>")


def test_caption_file_errors_name_the_problem(tmp_path):
    from pyssl.data import load_caption_file

    path = _write_pairs(tmp_path, header=("image_name", "caption", "label"))
    with pytest.raises(DataError, match=r"needs an image column .*header is \['image_name'"):
        load_caption_file(str(path))
    path = _write_pairs(tmp_path)
    (tmp_path / "im3.png").unlink()
    with pytest.raises(DataError, match="missing data file .*im3.png"):
        load_caption_file(str(path))
    path = _write_pairs(tmp_path, split=lambda i: "holdout")
    with pytest.raises(DataError, match="split must be train, val or test, got 'holdout'"):
        load_caption_file(str(path))
    with pytest.raises(DataError, match="is not a file"):
        load_caption_file(str(tmp_path / "nope.csv"))


def test_clip_trains_on_a_caption_file_and_eval_rebuilds_its_vocabulary(tmp_path):
    from pyssl.config import build_trainer, load_run, resolve

    path = _write_pairs(tmp_path)
    out = tmp_path / "run"
    run = resolve(
        "clip",
        f"captions:{path}",
        epochs=2,
        batch_size=16,
        image_size=16,
        backbone="convnet-small",
        out=str(out),
        progress=False,
        tensorboard=False,
    )
    trainer = build_trainer(run)
    assert trainer.method.vocab == trainer.train_data.vocab
    assert trainer.method.text_encoder.context_length == trainer.train_data.texts.shape[1]
    result = trainer.fit()
    assert result.steps == 2 * (len(trainer.train_data) // 16) and all(map(math.isfinite, result.losses))
    method, _, _ = load_run(str(out), "cpu")
    assert method.vocab == trainer.train_data.vocab
    for name, p in method.state_dict().items():
        torch.testing.assert_close(p, trainer.method.state_dict()[name].cpu())
    assert method.encode_text(["a red square", "a blue stripe seen from above"]).shape == (2, 128)
    assert method.class_prompts(["square", "stripe"])[1] == ["a photo of a stripe", "a stripe", "stripe"]
    with pytest.raises(ValueError, match=r"\['circle'\] are not words of the model's vocabulary"):
        method.class_prompts(["square", "circle"])


def test_pyssl_eval_of_a_clip_run_adds_zero_shot_accuracy(tmp_path, capsys):
    import json

    from pyssl.cli import main

    path = _write_pairs(tmp_path)
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--method",
                "clip",
                "--data",
                f"captions:{path}",
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--image-size",
                "16",
                "--backbone",
                "convnet-small",
                "--out",
                str(out),
                "--no-progress",
                "--no-tensorboard",
            ]
        )
        == 0
    )
    assert main(["eval", str(out), "--protocols", "knn", "--fractions", "100%", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "zero-shot accuracy (prompts such as 'a photo of a square', no labels)" in printed
    results = json.loads((out / "eval.json").read_text())
    assert 0.0 <= results["clip encoder"]["zero_shot"]["0.0"] <= 1.0
    assert set(results["random-init encoder"]) == {"knn", "zero_shot"}


def test_eval_of_a_run_on_unlabelled_pairs_is_one_line(tmp_path, capsys):
    import csv

    from pyssl.cli import main

    path = _write_pairs(tmp_path)
    rows = list(csv.reader(open(path), delimiter="\t"))
    with open(path, "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows(row[:2] for row in rows)  # no label column
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--method",
                "clip",
                "--data",
                f"captions:{path}",
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--image-size",
                "16",
                "--backbone",
                "convnet-small",
                "--out",
                str(out),
                "--no-progress",
                "--no-tensorboard",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["eval", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no labels, so there is nothing to probe" in err[0]


@pytest.mark.cuda
def test_clip_step_on_cuda_matches_cpu_and_runs_under_fp16_autocast():
    from conftest import cuda_ready

    if not cuda_ready():
        pytest.skip("CUDA kernels not built")
    cpu = build_method(
        "clip",
        backbone="convnet-small",
        image_size=16,
        augment=nn.Identity(),
        embed_dim=32,
        text_width=32,
        text_layers=1,
        text_heads=2,
    ).eval()
    gpu = build_method(
        "clip",
        backbone="convnet-small",
        image_size=16,
        augment=nn.Identity(),
        embed_dim=32,
        text_width=32,
        text_layers=1,
        text_heads=2,
    ).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    images = torch.randn(64, 3, 16, 16)
    texts = cap.tokenize(
        cap.digit_captions(
            torch.randint(0, 10, (64,)),
            torch.randint(0, 8, (64,)),
            torch.randint(0, 2, (64,)),
            torch.Generator().manual_seed(2),
        )
    )
    loss_cpu = cpu.training_step((images, texts)).loss
    loss_gpu = gpu.training_step((images.cuda(), texts.cuda())).loss
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=1e-4, atol=1e-4)
    loss_cpu.backward()
    loss_gpu.backward()
    torch.testing.assert_close(gpu.logit_scale.grad.cpu(), cpu.logit_scale.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(
        gpu.text_projection.weight.grad.cpu(), cpu.text_projection.weight.grad, rtol=1e-3, atol=1e-4
    )
    with torch.autocast("cuda", dtype=torch.float16):
        loss_half = gpu.training_step((images.cuda(), texts.cuda())).loss
    assert torch.isfinite(loss_half) and abs(float(loss_half) - float(loss_cpu)) < 0.05
    with pytest.raises(MethodError, match=r"token ids must be in \[0, "):
        gpu.training_step((images.cuda(), texts.cuda() + 1000))
