"""A method registered from outside the package trains through pyssl.config and the CLI, resumes
exactly and takes --init-backbone into its teacher, with no change to pyssl."""

from __future__ import annotations

import pytest
import torch

import pyssl.methods.registry as registry
from pyssl.cli import main
from pyssl.config import build_trainer, init_backbone, resolve
from pyssl.methods import MethodSpec, MomentumMethod, StepOutput, register
from pyssl.methods.base import images_of, two_views
from pyssl.train import ConfigError, StopTraining, load_checkpoint


class PredictTheTeacher(MomentumMethod):
    """A minimal BYOL: the student's backbone predicts its EMA teacher's features of the other view."""

    spec = MethodSpec(
        teachers=(("teacher", "backbone"),),
        run_defaults={"epochs": 2},
        train_defaults={"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0},
    )

    def __init__(self, backbone="resnet18", image_size=32, in_channels=3, width=8, mean=(0.5,) * 3, std=(0.5,) * 3):
        super().__init__(backbone, image_size, in_channels, mean, std, momentum=0.9)
        self.predictor = torch.nn.Linear(self.backbone.out_dim, self.backbone.out_dim)
        self.width = width
        self.build_teachers()

    def training_step(self, batch) -> StepOutput:
        v0, v1 = two_views(self.augment, images_of(batch))
        p = self.predictor(self.backbone(torch.cat([v0, v1])))
        with torch.no_grad():
            self.update_teachers()
            t0, t1 = self.teacher(torch.cat([v0, v1])).chunk(2)
        p0, p1 = p.chunk(2)
        loss = -torch.nn.functional.cosine_similarity(torch.cat([p0, p1]), torch.cat([t1, t0])).mean()
        return self.output(loss, momentum=torch.tensor(self.current_momentum()))


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register("predict_the_teacher")(PredictTheTeacher)
    return "predict_the_teacher"


def _run(name, out, **kw):
    return resolve(name, "digits", device="cpu", out=str(out), progress=False, tensorboard=False, knn_every=0, **kw)


def test_an_external_method_trains_resumes_exactly_and_logs_its_metrics(registered, tmp_path):
    run = _run(registered, tmp_path / "full", batch_size=256, width=4)
    assert run.train.epochs == 2 and run.train.optimizer == "adamw" and run.method_cfg["width"] == 4
    full = build_trainer(run).fit()
    assert full.steps == 8 and set(full.metrics) == {"loss", "momentum"}

    def stop_at_5(trainer, step, loss):
        if step == 5:
            raise StopTraining

    cut = _run(registered, tmp_path / "cut", batch_size=256, width=4, checkpoint_every=2)
    build_trainer(cut, callbacks=[stop_at_5]).fit()
    resumed = build_trainer(_run(registered, tmp_path / "cut", batch_size=256, width=4, checkpoint_every=2, seed=0))
    assert resumed.fit(resume=True).losses == full.losses[4:]
    with pytest.raises(ConfigError, match="unknown setting .no_such_setting.*width"):
        _run(registered, tmp_path / "bad", no_such_setting=1)


def test_init_backbone_reaches_the_declared_teacher_and_the_cli_trains_it(registered, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["train", "--method", registered, "--set", "width=2", "--epochs", "1", "--batch-size", "256"]
    assert main([*argv, "--device", "cpu", "--out", str(out), "--no-progress", "--no-tensorboard"]) == 0
    saved = load_checkpoint(str(out / "checkpoint.pt"))
    assert (
        saved["method"] == {"name": registered, "cfg": saved["method"]["cfg"]} and saved["method"]["cfg"]["width"] == 2
    )
    method = build_trainer(_run(registered, tmp_path / "other")).method
    init_backbone(method, str(out))
    for module in (method.backbone, method.teacher):
        for name, value in module.state_dict().items():
            assert torch.equal(value, saved["backbone"][name]), name
