"""The method contract: StepOutput with tensor metrics, one Method base, MomentumMethod's fused EMA."""

from __future__ import annotations

import pytest
import torch

import pyssl.methods.momentum_method as momentum_method
from pyssl.config import build_trainer, resolve
from pyssl.methods import Method, MomentumMethod, StepOutput, available_methods, build_method, method_class


def _batch(name: str):
    run = resolve(name, device="cpu", batch_size=16)
    images = run.train_set.images[:16]
    batch = (images, run.train_set.texts[:16]) if run.train_set.texts is not None else images
    return build_method(name, **run.method_cfg), batch


@pytest.mark.parametrize("name", available_methods())
def test_every_method_is_a_method_and_returns_its_loss_and_tensor_metrics(name):
    assert issubclass(method_class(name), Method)
    torch.manual_seed(0)
    method, batch = _batch(name)
    out = method.training_step(batch)
    assert isinstance(out, StepOutput) and out.loss.ndim == 0 and out.loss.requires_grad
    assert "loss" in out.metrics and torch.equal(out.metrics["loss"], out.loss.detach())
    for key, value in out.metrics.items():  # tensors, so that no step waits for the device to read them
        assert isinstance(value, torch.Tensor) and value.ndim == 0 and not value.requires_grad, key
    assert set(method.last_metrics) == set(out.metrics)
    assert all(isinstance(v, float) for v in method.last_metrics.values())


def test_a_momentum_method_updates_all_its_teachers_with_one_fused_call(monkeypatch):
    torch.manual_seed(0)
    method, batch = _batch("mocov2")
    assert isinstance(method, MomentumMethod)
    pairs = method.teacher_pairs()
    assert len(pairs) == 2 and all(not p.requires_grad for t, _ in pairs for p in t.parameters())
    with torch.no_grad():  # make teachers and students differ, so the update is visible
        for teacher, _ in pairs:
            for p in teacher.parameters():
                p.add_(0.5)
    before = [[p.clone() for p in t.parameters()] for t, _ in pairs]
    calls = []
    real = momentum_method.ops.ema_update_

    def counting(ema, online, m):
        calls.append((len(ema), m))
        return real(ema, online, m)

    monkeypatch.setattr(momentum_method.ops, "ema_update_", counting)
    method.set_progress(0, 10)
    method.training_step(batch)
    n_params = sum(len(list(t.parameters())) for t, _ in pairs)
    assert calls == [(n_params, method.momentum)]
    m = method.momentum
    for (teacher, student), old in zip(pairs, before):
        for p, q, o in zip(teacher.parameters(), student.parameters(), old):
            torch.testing.assert_close(p, m * o + (1 - m) * q, rtol=1e-6, atol=1e-6)


def test_the_momentum_schedule_follows_the_trainers_progress():
    method = build_method("mocov2", backbone="convnet-small", image_size=16, momentum=0.9, momentum_end=1.0)
    method.set_progress(0, 11)
    assert method.current_momentum() == pytest.approx(0.9)
    method.set_progress(5, 11)
    assert method.current_momentum() == pytest.approx(0.95)
    method.set_progress(10, 11)
    assert method.current_momentum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="momentum_end must lie in"):
        build_method("mocov2", backbone="convnet-small", image_size=16, momentum_end=1.5)


def test_the_trainer_reads_the_metrics_with_the_losses(tmp_path):
    run = resolve("rotnet", epochs=1, batch_size=256, out=str(tmp_path), progress=False, tensorboard=False)
    result = build_trainer(run).fit()
    assert set(result.metrics) == {"loss", "rotation_acc"} and 0.0 <= result.metrics["rotation_acc"] <= 1.0
    assert result.metrics["loss"] == result.losses[-1]


def test_a_module_whose_training_step_returns_a_bare_loss_still_trains(tmp_path):
    from pyssl.data import load_data
    from pyssl.train import TrainConfig, Trainer

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))

        def set_progress(self, step, total):
            pass

        def training_step(self, batch):
            return self.backbone(batch.float() / 255).pow(2).mean()

    train, _ = load_data("digits", 8)
    cfg = TrainConfig(epochs=1, batch_size=256, out_dir=str(tmp_path), progress=False, tensorboard=False)
    result = Trainer(Plain(), train, cfg).fit()
    assert result.steps == len(train) // 256 and result.metrics == {"loss": result.losses[-1]}
