"""Contrastive Predictive Coding: it learns to pick the patch below out of the batch, its features
beat a random-init encoder, its context is causal, impossible sizes give a clear error, and it
trains from the CLI with nothing but its name."""

import pytest
import torch

from pyssl.methods import MethodError, build_method
from pyssl.pretext.fit import quick_fit
from test_pretext_methods import SEED, _colour, _eval_metrics, _split, _train_and_probe


@pytest.mark.slow
def test_cpc_learns_to_predict_patches_below():
    x, y = _colour()
    xtr, _, xte, _ = _split(x, y, 1200)
    torch.manual_seed(SEED)
    m = build_method("cpc")
    quick_fit(m, xtr, steps=60, batch_size=64, seed=SEED)
    r = _eval_metrics(m, xte)
    # 128 images x 3 columns x (2 + 1) context rows: chance is 2 / 1152 per query.
    assert r["chance"] < 0.01
    assert r["cpc_acc"] > 0.1 and r["cpc_acc_k1"] > 0.1 and r["cpc_acc_k2"] > 0.1


@pytest.mark.slow
def test_cpc_beats_random_mid_layer_probe():
    # Probe margins over random init: 200 steps, 31 seeds: +0.009..+0.078; 400 steps, 15 seeds: +0.013..
    _, r, probe, probe_random = _train_and_probe("cpc", *_colour(), 400)
    assert r["cpc_acc"] > 10 * r["chance"]
    assert probe > probe_random


def test_cpc_context_cannot_see_the_rows_it_predicts():
    m = build_method("cpc", image_size=32).eval()
    images = torch.rand(4, 3, 32, 32)
    changed = images.clone()
    # Grid row 0 covers image rows 0..15 (16-pixel patches every 8 pixels): change everything below.
    changed[:, :, 16:] = torch.rand(4, 3, 16, 32)
    with torch.no_grad():
        z, z_changed = m.encode_patches(images), m.encode_patches(changed)
        c, c_changed = m.context(z), m.context(z_changed)
    assert not torch.allclose(z[:, :, 1:], z_changed[:, :, 1:])  # the rows below did change
    torch.testing.assert_close(c[:, :, 0], c_changed[:, :, 0])
    # And more generally: context row i is unchanged by any change to the encodings of rows > i.
    for i in range(z.shape[2] - 1):
        z2 = z.clone()
        z2[:, :, i + 1 :] = torch.randn_like(z2[:, :, i + 1 :])
        with torch.no_grad():
            torch.testing.assert_close(m.context(z2)[:, :, : i + 1], c[:, :, : i + 1])


def test_cpc_rejects_small_images():
    with pytest.raises(ValueError, match=r"4x4.*minimum image size is 6x6"):
        build_method("cpc", image_size=4, patch_size=4, stride=1)
    m = build_method("cpc", image_size=32)
    with pytest.raises(MethodError, match=r"24x24.*minimum image size is 32x32"):
        m.training_step(torch.zeros(4, 3, 24, 24, dtype=torch.uint8))
    with pytest.raises(ValueError, match="steps"):
        build_method("cpc", steps=0)


def test_a_cpc_run_defaults_to_its_own_data(tmp_path):
    from pyssl.config import build_trainer, resolve

    trainer = build_trainer(resolve("cpc", epochs=1, out=str(tmp_path / "cpc"), progress=False, tensorboard=False))
    assert trainer.train_data.name == "colour_digits"
    assert trainer.cfg.optimizer == "adamw" and trainer.cfg.epochs == 1
    loss = trainer.method.training_step(trainer.train_data.images[:16]).loss
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(trainer.method.last_metrics) >= {"cpc_acc", "chance", "loss"}
