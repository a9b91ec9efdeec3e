"""DINO as a method: multi-crop views (the teacher sees the global ones only), the loss of its
outputs, the EMA teacher without gradient, the epoch schedules, exact resume, and features that
beat the random-init encoder."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from probing import trained_and_random  # noqa: E402
from pyssl.config import build_trainer, resolve
from pyssl.losses import DINOLoss
from pyssl.losses.dino import dino_loss_reference
from pyssl.methods import DINO, MethodError, available_methods, build_method
from pyssl.methods.dino import default_local_scale
from pyssl.models import DINOProjectionHead
from pyssl.train import ConfigError, StopTraining

TINY = dict(backbone="convnet-small", image_size=16, hidden_dim=32, bottleneck_dim=16, out_dim=64)


def images(n=8, size=16, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _identity_views(x):
    return (x.float() / 255 - 0.5) / 0.5  # the default mean and std: the views are the images


def _centre_crops(x):
    """A deterministic local view: the central 8 x 8 of the 16 x 16 images."""
    return _identity_views(x)[..., 4:12, 4:12]


def _record_inputs(module, into):
    return module.register_forward_pre_hook(lambda m, args: into.append(tuple(args[0].shape)))


def test_registered_and_resolved_with_no_other_argument():
    assert "dino" in available_methods()
    run = resolve("dino", device="cpu")
    assert run.data == "digits" and run.method_cfg["steps_per_epoch"] == 1258 // 128
    method = build_trainer(run).method
    assert isinstance(method, DINO) and isinstance(method.projection_head, DINOProjectionHead)
    assert method.projection_head.out_dim == 2048 and method.n_local == 6 and method.local_size == 8
    assert method.momentum == 0.99 and method.momentum_end == 1.0
    # the digits' crop scale and no flips reach the global crops; the local crops keep 8 x 8 px
    first, second = method.augment.augments
    assert first.scale == second.scale == (0.3, 1.0) and (first.p_solarize, second.p_solarize) == (0.0, 0.2)
    assert method.local_augment.scale == (0.25, 0.5) and method.local_augment.size == (8, 8)
    assert first.p_flip == second.p_flip == method.local_augment.p_flip == 0.0
    assert default_local_scale(224) == (0.05, 0.4) and default_local_scale(32) == (0.0625, 0.4)
    assert [teacher for teacher, _ in type(method).spec.teachers] == ["backbone_momentum", "projection_head_momentum"]
    # the batch decides the epoch's length
    assert resolve("dino", device="cpu", batch_size=256).method_cfg["steps_per_epoch"] == 1258 // 256


def test_the_teacher_sees_the_global_views_and_the_student_all_views_at_their_sizes(monkeypatch):
    torch.manual_seed(0)
    m = build_method("dino", **TINY, n_local=3, local_size=8)
    global_views, local_views = m.views(images())
    assert [tuple(v.shape) for v in global_views] == [(8, 3, 16, 16)] * 2
    assert [tuple(v.shape) for v in local_views] == [(8, 3, 8, 8)] * 3
    student, teacher, losses = [], [], []
    _record_inputs(m.backbone, student), _record_inputs(m.backbone_momentum, teacher)
    real = DINOLoss.forward

    def spy(self, teacher_out, student_out, **kw):
        losses.append(([tuple(t.shape) for t in teacher_out], [tuple(s.shape) for s in student_out], kw))
        return real(self, teacher_out, student_out, **kw)

    monkeypatch.setattr(DINOLoss, "forward", spy)
    m.training_step(images())
    assert teacher == [(16, 3, 16, 16)]  # the two global views, in one pass
    assert student == [(16, 3, 16, 16), (24, 3, 8, 8)]  # one pass per resolution
    assert losses == [([(8, 64)] * 2, [(8, 64)] * 5, {"epoch": None})]
    m.n_local = 0
    student.clear()
    m.training_step(images())
    assert student == [(16, 3, 16, 16)]


def test_the_loss_is_the_dino_cross_entropy_of_the_outputs_and_moves_the_centre():
    torch.manual_seed(0)
    m = build_method("dino", **TINY, n_local=2, augment=_identity_views, local_augment=_centre_crops)
    x = images()
    out = m.training_step(x)
    with torch.no_grad():
        g, loc = _identity_views(x), _centre_crops(x)
        student = list(
            m.projection_head(torch.cat([m.backbone(torch.cat([g, g])), m.backbone(torch.cat([loc, loc]))])).chunk(4)
        )
        teacher = list(m.projection_head_momentum(m.backbone_momentum(torch.cat([g, g]))).chunk(2))
    # the first step: centre 0, no epoch known so the teacher temperature is teacher_temp (0.04)
    expected = dino_loss_reference(teacher, student, torch.zeros(1, 64), 0.04, 0.1)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    centre = 0.1 * torch.cat(teacher).mean(0)  # centre_momentum 0.9 from 0
    torch.testing.assert_close(m.criterion.center.reshape(-1), centre, rtol=1e-5, atol=1e-7)
    assert set(out.metrics) == {"loss", "teacher_entropy", "student_entropy", "teacher_temp", "momentum"}
    log_k = torch.log(torch.tensor(64.0))
    for key in ("teacher_entropy", "student_entropy"):
        assert 0 <= out.metrics[key] <= log_k + 1e-5, key
    q = torch.softmax(torch.cat(teacher) / 0.04, dim=-1)
    torch.testing.assert_close(out.metrics["teacher_entropy"], -(q * q.log()).sum(-1).mean(), rtol=1e-4, atol=1e-5)


def test_the_teacher_gets_no_gradient_and_follows_the_student_by_ema():
    torch.manual_seed(0)
    m = build_method("dino", **TINY, n_local=2, momentum=0.5)
    teacher = [p.clone() for t, _ in m.teacher_pairs() for p in t.parameters()]
    out = m.training_step(images())
    out.loss.backward()
    assert all(p.grad is not None for p in (*m.backbone.parameters(), *m.projection_head.mlp.parameters()))
    assert m.projection_head.prototypes.grad is not None  # no epoch known: never frozen
    teachers = [p for t, _ in m.teacher_pairs() for p in t.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in teachers)
    assert all(torch.equal(a, b) for a, b in zip(teacher, teachers))  # equal to the student at start
    students = [p for _, s in m.teacher_pairs() for p in s.parameters()]
    with torch.no_grad():
        for p in students:
            p.add_(1.0)
    m.set_progress(0, 10)  # momentum 0.5 at step 0
    m.training_step(images())
    for t, s, t0 in zip(teachers, students, teacher):
        torch.testing.assert_close(t, 0.5 * t0 + 0.5 * s)


def test_the_epoch_drives_the_teacher_temperature_and_the_frozen_prototypes():
    torch.manual_seed(0)
    m = build_method(
        "dino",
        **TINY,
        n_local=1,
        steps_per_epoch=3,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=4,
        freeze_last_layer=2,
    )
    seen = []
    for step in (0, 3, 6, 11, 12):
        m.set_progress(step, 30)
        m.zero_grad(set_to_none=True)
        out = m.training_step(images())
        out.loss.backward()
        seen.append((m.epoch, round(float(out.metrics["teacher_temp"]), 6), m.projection_head.prototypes.grad is None))
    assert seen == [
        (0, 0.04, True),
        (1, 0.05, True),
        (2, 0.06, False),
        (3, 0.07, False),
        (4, 0.07, False),
    ]
    assert all(p.grad is not None for p in m.projection_head.mlp.parameters())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"n_local": -1}, "n_local must be an int >= 0"),
        ({"local_size": 2}, "local_size must be an int >= 4"),
        ({"local_scale": (0.5, 0.1)}, "local_scale must be a pair"),
        ({"steps_per_epoch": 0}, "steps_per_epoch must be a positive int"),
        ({"freeze_last_layer": 0.5}, "freeze_last_layer must be an int"),
        ({"out_dim": 0}, "out_dim must be a positive int"),
        ({"backbone": "vit-mini"}, "cannot encode local crops of 8 px.*local_size=16 or n_local=0"),
    ],
)
def test_bad_options_are_a_clear_error_naming_them(kwargs, message):
    with pytest.raises(MethodError, match=message):
        build_method("dino", **{**TINY, **kwargs})


def test_a_vit_trains_with_local_crops_at_its_size_and_other_data_is_refused():
    m = build_method("dino", **{**TINY, "backbone": "vit-mini"}, local_size=16, n_local=1)
    assert m.training_step(images()).loss.isfinite()
    with pytest.raises(ConfigError, match="dino trains on images"):
        resolve("dino", "videos", device="cpu")
    with pytest.raises(MethodError, match="images"):
        m.training_step(torch.zeros(8, 5, dtype=torch.long))  # tokens, not images


def _run(out, **kw):
    small = dict(backbone="small", image_size=8, hidden_dim=16, out_dim=32, bottleneck_dim=8, n_local=1)
    return resolve(
        "dino",
        "digits",
        device="cpu",
        out=str(out),
        progress=False,
        tensorboard=False,
        knn_every=0,
        batch_size=256,
        **small,
        **kw,
    )


def test_a_stopped_run_resumes_exactly(tmp_path):
    # 4 steps an epoch, 2 epochs: the warm-up and the frozen prototypes change at the epoch,
    # the centre is carried by the checkpoint
    run = _run(tmp_path / "full", epochs=2, teacher_temp=0.07, warmup_teacher_temp_epochs=2)
    full = build_trainer(run).fit()
    assert full.steps == 8 and full.metrics["teacher_temp"] == pytest.approx(0.07)

    def stop_at_5(trainer, step, loss):
        if step == 5:
            raise StopTraining

    cut = dict(epochs=2, teacher_temp=0.07, warmup_teacher_temp_epochs=2, checkpoint_every=2)
    build_trainer(_run(tmp_path / "cut", **cut), callbacks=[stop_at_5]).fit()
    resumed = build_trainer(_run(tmp_path / "cut", **cut))
    assert resumed.fit(resume=True).losses == full.losses[4:]


@pytest.mark.slow
def test_features_beat_the_random_init_encoder_on_the_digits(tmp_path):
    # seed 0, the defaults: the loss falls from 7.64 (log K = 7.62) to 6.63, the teacher's entropy
    # to 6.27; kNN 95.7 % and the 10 %-label probe 95.4 % against 91.8 / 86.3 % at random init
    run = resolve("dino", "digits", device="cpu", epochs=40, out=str(tmp_path), knn_every=0, progress=False)
    trainer = build_trainer(run)
    random_init = copy.deepcopy(trainer.method)
    result = trainer.fit()
    assert result.losses[-1] < result.losses[0] - 0.5
    assert result.metrics["teacher_entropy"] < math.log(2048) - 0.5  # not the uniform collapse
    scores = trained_and_random(trainer, random_init)
    assert scores["trained"][1] > scores["random"][1] + 0.02, scores
    assert scores["trained"][0] > scores["random"][0], scores


def test_the_head_gives_cosines_to_the_prototypes_and_can_freeze_them():
    torch.manual_seed(0)
    head = DINOProjectionHead(12, 24, 8, 40).double()
    x = torch.randn(6, 12, dtype=torch.float64)
    y = head(x)
    h = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    w = torch.nn.functional.normalize(head.prototypes, dim=-1)
    torch.testing.assert_close(y, h @ w.T)  # unit prototypes: cosines in [-1, 1]
    assert y.shape == (6, 40) and y.abs().max() <= 1
    assert not head.prototype_norm.requires_grad  # norm_last_layer: the lengths stay 1
    head(x, freeze_prototypes=True).sum().backward()
    assert head.prototypes.grad is None and all(p.grad is not None for p in head.mlp.parameters())
    free = DINOProjectionHead(12, 24, 8, 40, norm_last_layer=False).double()
    with torch.no_grad():
        free.prototype_norm.mul_(3.0)
    assert free.prototype_norm.requires_grad and free(x).abs().max() > 1  # learnt lengths scale the cosines
    assert torch.autograd.gradcheck(free, (x[:2].clone().requires_grad_(),))
    with pytest.raises(ValueError, match="bottleneck_dim must be a positive int"):
        DINOProjectionHead(12, 24, 0, 40)
