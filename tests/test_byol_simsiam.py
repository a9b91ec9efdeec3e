"""BYOL and SimSiam: the online network learns, the teacher (or the detached branch) gets no
gradient, and the features beat the random-init encoder."""

from __future__ import annotations

import copy

import pytest
import torch

from probing import trained_and_random  # noqa: E402
from pyssl.config import build_trainer, resolve
from pyssl.losses import NegativeCosineSimilarity
from pyssl.methods import BYOL, SimSiam, build_method


def images(n=8, size=16):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_byol_trains_the_online_network_only_and_moves_its_teacher():
    torch.manual_seed(0)
    m = build_method("byol", backbone="convnet-small", image_size=16, hidden_dim=32, out_dim=16, momentum=0.5)
    assert isinstance(m, BYOL) and m.momentum_end == 1.0
    teacher = [p.clone() for p in m.backbone_momentum.parameters()]
    out = m.training_step(images())
    assert -1.0 <= out.loss.item() <= 1.0
    out.loss.backward()
    assert all(p.grad is not None for p in (*m.backbone.parameters(), *m.prediction_head.parameters()))
    assert all(p.grad is None for p in (*m.backbone_momentum.parameters(), *m.projection_head_momentum.parameters()))
    # the first step's update: teacher = m * teacher + (1 - m) * student, before the targets
    assert all(torch.equal(a, b) for a, b in zip(teacher, m.backbone_momentum.parameters()))  # equal at start
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    m.set_progress(0, 10)
    m.training_step(images())
    for t, s, t0 in zip(m.backbone_momentum.parameters(), m.backbone.parameters(), teacher):
        torch.testing.assert_close(t, 0.5 * t0 + 0.5 * s)


def test_byol_loss_is_the_symmetric_negative_cosine_of_predictions_and_teacher_projections():
    torch.manual_seed(0)
    identity_views = lambda x: (x.float() / 255 - 0.5) / 0.5  # noqa: E731 - the default mean and std
    m = build_method("byol", backbone="convnet-small", image_size=16, hidden_dim=32, out_dim=16, augment=identity_views)
    x = m.normalize(images())
    loss = m.training_step(images()).loss
    with torch.no_grad():
        p = m(torch.cat([x, x]))
        t = m.projection_head_momentum(m.backbone_momentum(torch.cat([x, x])))
    p0, p1, t0, t1 = *p.double().chunk(2), *t.double().chunk(2)
    cos = torch.nn.functional.cosine_similarity
    expected = 0.5 * (-cos(p0, t1).mean() - cos(p1, t0).mean())
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_simsiam_stops_the_gradient_at_the_target_projection():
    torch.manual_seed(0)
    m = build_method("simsiam", backbone="convnet-small", image_size=16, hidden_dim=32, out_dim=16)
    assert isinstance(m, SimSiam) and m.prediction_head[0].out_features == 4  # out_dim // 4
    captured = []
    real = NegativeCosineSimilarity.forward

    def spy(self, x0, x1):
        captured.append(x1)
        return real(self, x0, x1)

    NegativeCosineSimilarity.forward = spy
    try:
        out = m.training_step(images())
    finally:
        NegativeCosineSimilarity.forward = real
    assert len(captured) == 2 and not any(t.requires_grad for t in captured)
    assert out.loss.requires_grad and "std_of_outputs" in out.metrics
    with pytest.raises(ValueError, match="pred_dim"):
        build_method("simsiam", backbone="convnet-small", image_size=16, pred_dim=0)


@pytest.mark.slow
@pytest.mark.parametrize("name,epochs", [("simsiam", 40), ("byol", 100)])
def test_features_beat_the_random_init_encoder_on_the_digits(name, epochs, tmp_path):
    # BYOL's teacher starts as a random network, so its features first get worse; on the digits
    # (9 steps an epoch) it overtakes the random-init encoder after about 60 epochs.
    run = resolve(name, "digits", device="cpu", epochs=epochs, out=str(tmp_path), knn_every=0, progress=False)
    trainer = build_trainer(run)
    random_init = copy.deepcopy(trainer.method)
    result = trainer.fit()
    assert result.losses[-1] < result.losses[0] - 0.5
    scores = trained_and_random(trainer, random_init)
    # the probe with 10 % of the labels is where pre-training shows; kNN over all labels (a strong
    # baseline on the digits: 92 % from random weights) must not be worse
    assert scores["trained"][1] > scores["random"][1] + 0.02, scores
    assert scores["trained"][0] > scores["random"][0], scores
