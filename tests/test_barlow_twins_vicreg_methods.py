"""Barlow Twins and VICReg as methods: the loss of the projections, the expander's widths, and
features that beat the random-init encoder."""

from __future__ import annotations

import copy

import pytest
import torch

from probing import trained_and_random  # noqa: E402
from pyssl.config import build_trainer, resolve
from pyssl.losses import BarlowTwinsLoss, VICRegLoss
from pyssl.methods import BarlowTwins, VICReg, build_method


def _identity_views(x):
    return (x.float() / 255 - 0.5) / 0.5  # the default mean and std: the views are the images


@pytest.mark.parametrize(
    "name,cls,loss", [("barlow_twins", BarlowTwins, BarlowTwinsLoss()), ("vicreg", VICReg, VICRegLoss())]
)
def test_the_loss_is_the_criterion_of_the_two_views_projections(name, cls, loss):
    torch.manual_seed(0)
    m = build_method(name, backbone="convnet-small", image_size=16, hidden_dim=24, augment=_identity_views)
    assert isinstance(m, cls) and m.projection_head[-1].out_features == 24  # out_dim follows hidden_dim
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = m.training_step(images)
    z = m(_identity_views(images))
    torch.testing.assert_close(out.loss, loss(z, z), rtol=1e-5, atol=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for p in m.backbone.parameters())
    assert (
        build_method(name, backbone="convnet-small", image_size=16, hidden_dim=24, out_dim=40)
        .projection_head[-1]
        .out_features
        == 40
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["barlow_twins", "vicreg"])
def test_features_beat_the_random_init_encoder_on_the_digits(name, tmp_path):
    run = resolve(name, "digits", device="cpu", epochs=40, out=str(tmp_path), knn_every=0, progress=False)
    trainer = build_trainer(run)
    random_init = copy.deepcopy(trainer.method)
    result = trainer.fit()
    assert result.losses[-1] < 0.8 * result.losses[0]
    scores = trained_and_random(trainer, random_init)
    assert scores["trained"][1] > scores["random"][1] + 0.02, scores
    assert scores["trained"][0] > scores["random"][0], scores
