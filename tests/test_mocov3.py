"""MoCo v3: the symmetric in-batch InfoNCE of predictions against the teacher's keys, scaled by
2 tau; the teacher moves by EMA and gets no gradient; features beat random init."""

from __future__ import annotations

import copy

import pytest
import torch

from probing import trained_and_random  # noqa: E402
from pyssl import reference
from pyssl.config import build_trainer, resolve
from pyssl.methods import MoCoV3, build_method


def _identity_views(x):
    return (x.float() / 255 - 0.5) / 0.5  # the default mean and std: the views are the images


def test_the_loss_is_two_tau_times_the_symmetric_infonce_of_queries_and_keys():
    torch.manual_seed(0)
    m = build_method(
        "mocov3",
        backbone="convnet-small",
        image_size=16,
        hidden_dim=32,
        out_dim=16,
        temperature=0.3,
        augment=_identity_views,
    )
    assert isinstance(m, MoCoV3) and m.momentum_end == 1.0
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = m.training_step(images)
    x = _identity_views(images)
    with torch.no_grad():
        q = m(torch.cat([x, x])).double()
        k = m.projection_head_momentum(m.backbone_momentum(torch.cat([x, x]))).double()
    q0, q1, k0, k1 = *q.chunk(2), *k.chunk(2)
    expected = 2 * 0.3 * (reference.infonce(q0, k1, 1 / 0.3) + reference.infonce(q1, k0, 1 / 0.3))
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for p in m.prediction_head.parameters())
    assert all(p.grad is None for p in m.backbone_momentum.parameters())


@pytest.mark.slow
def test_features_beat_the_random_init_encoder_on_the_digits(tmp_path):
    run = resolve("mocov3", "digits", device="cpu", epochs=40, out=str(tmp_path), knn_every=0, progress=False)
    trainer = build_trainer(run)
    random_init = copy.deepcopy(trainer.method)
    result = trainer.fit()
    assert result.losses[-1] < result.losses[0] - 1.0
    scores = trained_and_random(trainer, random_init)
    assert scores["trained"][1] > scores["random"][1] + 0.02, scores
    assert scores["trained"][0] > scores["random"][0] + 0.02, scores
