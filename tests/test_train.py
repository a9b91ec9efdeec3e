"""Trainer: schedules, LARS, atomic checkpoints, exact resume (in process and after SIGKILL)."""

import csv
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from pyssl.data import load_digits
from pyssl.methods import build_method
from pyssl.train import (
    LARS,
    CheckpointError,
    ConfigError,
    StopTraining,
    TrainConfig,
    Trainer,
    load_checkpoint,
    save_atomic,
    warmup_cosine,
)

DATA = load_digits("train", size=8)
SMALL = DATA.subset(torch.arange(96))


def make_method(name="simclr", seed=0):
    torch.manual_seed(seed)
    kw = dict(backbone="convnet-small", image_size=8, hidden_dim=16, out_dim=8)
    if name in ("moco", "mocov2"):
        kw["queue_size"] = 64
    return build_method(name, **kw)


def cfg(tmp_path, **kw):
    base = dict(
        epochs=2,
        batch_size=32,
        lr=0.05,
        out_dir=str(tmp_path),
        progress=False,
        tensorboard=False,
        warmup_epochs=1,
        seed=3,
    )
    return TrainConfig(**{**base, **kw})


def test_warmup_cosine():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    vals = [warmup_cosine(s, 50, 0) for s in range(50)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_lars_matches_manual_update():
    w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    b = nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = LARS([{"params": [w]}, {"params": [b], "lars_exclude": True}], lr=0.1, momentum=0.9, weight_decay=0.01)
    gw, gb = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    g = gw + 0.01 * w0
    trust = 0.001 * w0.norm() / g.norm()
    assert torch.allclose(w, w0 - 0.1 * trust * g)
    assert torch.allclose(b, b0 - 0.1 * gb)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="larger than the data set"):
        Trainer(make_method(), SMALL, cfg(tmp_path, batch_size=97))
    with pytest.raises(ConfigError, match="optimizer"):
        Trainer(make_method(), SMALL, cfg(tmp_path, optimizer="adam9"))
    with pytest.raises(ConfigError, match="lr"):
        Trainer(make_method(), SMALL, cfg(tmp_path, lr=-1.0))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            Trainer(make_method(), SMALL, cfg(tmp_path, device="cuda"))


def test_atomic_save_never_leaves_a_partial_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    save_atomic({"format": "pyssl-checkpoint-1", "step": 1}, path)
    real_save = torch.save

    def crash_midway(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"format": "pyssl-checkpoint-1", "step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path)["step"] == 1  # the old, complete file
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary left behind
    # a truncated file under the real name is refused, never half-loaded
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def _stop_at(n):
    def cb(trainer, step, loss):
        if step == n:
            raise StopTraining

    return cb


@pytest.mark.parametrize(
    "method,opt",
    [
        ("simclr", "sgd"),
        ("mocov2", "lars"),
        ("moco", "adamw"),
        ("byol", "sgd"),
        ("simsiam", "sgd"),
        ("vicreg", "sgd"),
        ("mocov3", "adamw"),
    ],
)
def test_resume_mid_epoch_reproduces_losses_exactly(tmp_path, method, opt):
    # 3 steps per epoch, 2 epochs; checkpoint every 2 steps; stopped at step 5 (mid-epoch 2)
    c = dict(optimizer=opt, checkpoint_every=2, clip_grad=5.0)
    full = Trainer(make_method(method), SMALL, cfg(tmp_path / "full", **c)).fit()
    assert full.steps == 6 and len(full.losses) == 6
    part = Trainer(make_method(method), SMALL, cfg(tmp_path / "cut", **c), callbacks=[_stop_at(5)]).fit()
    assert part.stopped and part.steps == 5
    assert part.losses == full.losses[:5]
    # a fresh process would build the model with other random weights: resume must overwrite them
    resumed_trainer = Trainer(make_method(method, seed=99), SMALL, cfg(tmp_path / "cut", **c))
    resumed = resumed_trainer.fit(resume=True)
    assert resumed.losses == full.losses[4:]  # the checkpoint at step 4 -> steps 5 and 6 again
    with open(tmp_path / "cut" / "metrics.csv") as f:
        logged = [float(r["loss"]) for r in csv.DictReader(f)]
    assert logged == full.losses  # the log rows after the checkpoint were replaced, not duplicated
    # the resumed run ends with exactly the uninterrupted run's weights
    for (n, p), (_, q) in zip(
        load_checkpoint(str(tmp_path / "full" / "checkpoint.pt"))["model"].items(),
        resumed_trainer.method.state_dict().items(),
    ):
        assert torch.equal(p, q), n


def test_resume_refuses_other_settings(tmp_path):
    Trainer(make_method(), SMALL, cfg(tmp_path, epochs=1)).fit()
    with pytest.raises(CheckpointError, match="batch_size 32 there, 16 here"):
        Trainer(make_method(), SMALL, cfg(tmp_path, epochs=1, batch_size=16)).fit(resume=True)
    with pytest.raises(CheckpointError) as e:
        Trainer(make_method("mocov2"), SMALL, cfg(tmp_path, epochs=1)).fit(resume=True)
    message = str(e.value)  # which run was found and what differs, not torch's cut-off load_state_dict error
    assert "it holds a simclr run at step 3" in message and "method simclr there, mocov2 here" in message
    assert "queue_size (unset) there, 64 here" in message and "state_dict" not in message


def test_logs_knn_amp_and_tensorboard(tmp_path):
    test = load_digits("test", size=8).subset(torch.arange(50))
    c = cfg(tmp_path, knn_every=1, knn_k=5, amp=True, tensorboard=True, log_every=2)
    res = Trainer(make_method(), SMALL, c, test).fit()
    assert len(res.knn) == 2 and all(0 <= a <= 1 for _, a in res.knn)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert all(math.isfinite(float(r["loss"])) and float(r["images_per_s"]) > 0 for r in rows)
    assert len(list(csv.DictReader(open(tmp_path / "knn.csv")))) == 2
    pytest.importorskip("tensorboard")
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tb"))


def _train_argv(out, *extra):
    return [
        "train",
        "--method",
        "mocov2",
        "--data",
        "digits",
        "--image-size",
        "8",
        "--backbone",
        "convnet-small",
        "--hidden-dim",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "128",
        "--device",
        "cpu",
        "--checkpoint-every",
        "3",
        "--knn-every",
        "0",
        "--no-progress",
        "--no-tensorboard",
        "--out",
        str(out),
        *extra,
    ]


def _losses(run):
    with open(run / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path):
    from pyssl.cli import main

    # 1258 digits / 128 = 9 steps in the epoch; checkpoints at steps 3 and 6; SIGKILL after step 5
    assert main(_train_argv(tmp_path / "full")) == 0
    killed = subprocess.run(
        [sys.executable, "-m", "pyssl", *_train_argv(tmp_path / "cut")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYSSL_CRASH_AT_STEP": "5"},
    )
    assert killed.returncode == -9, killed.stderr
    assert load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))["step"] == 3
    assert len(_losses(tmp_path / "cut")) == 3  # the checkpoint's steps are on disk; 4 and 5 died in the buffer
    assert main(_train_argv(tmp_path / "cut", "--resume")) == 0
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")
    assert len(_losses(tmp_path / "full")) == 9


def test_data_set_stays_on_the_gpu_while_it_fits():
    from pyssl.train import DATA_ON_DEVICE_SHARE, data_device

    cpu, gpu = torch.device("cpu"), torch.device("cuda:0")
    gib = 2**30
    assert data_device("auto", cpu, 100 * gib) == cpu
    assert data_device("device", gpu, 100 * gib, free_bytes=gib) == gpu  # asked for: the user knows
    assert data_device("cpu", gpu, 1, free_bytes=100 * gib) == cpu
    limit = int(DATA_ON_DEVICE_SHARE * 10 * gib)
    assert data_device("auto", gpu, limit, free_bytes=10 * gib) == gpu
    assert data_device("auto", gpu, limit + 1, free_bytes=10 * gib) == cpu
    with pytest.raises(ConfigError, match="data_on must be auto, device or cpu, got 'gpu'"):
        TrainConfig(data_on="gpu").validate()


@pytest.mark.cuda
def test_training_from_host_memory_matches_training_from_the_gpu(tmp_path):
    torch.backends.cudnn.deterministic = True
    try:
        results = {}
        for where in ("device", "cpu"):
            trainer = Trainer(
                make_method(),
                SMALL,
                cfg(tmp_path / where, device="cuda", data_on=where, knn_every=1),
                test=DATA.subset(torch.arange(96, 160)),
            )
            assert trainer.train_data.images.device.type == ("cuda" if where == "device" else "cpu")
            results[where] = trainer.fit()
        torch.testing.assert_close(
            torch.tensor(results["cpu"].losses), torch.tensor(results["device"].losses), rtol=1e-4, atol=1e-4
        )
        assert results["cpu"].knn == pytest.approx(results["device"].knn, abs=0.02)
    finally:
        torch.backends.cudnn.deterministic = False


# Each kill resumes from the checkpoint the one before left: (PYSSL_CRASH_AT, the checkpoint's
# step afterwards). 9 steps, checkpoints at 2, 4, 6, 8 and 9.
KILLS = [
    ("checkpoint-done:2", 2),  # right after the first checkpoint
    ("checkpoint-start:4", 2),  # before the checkpoint: rows 3 and 4 still in the buffer
    ("logs-synced:4", 2),  # rows 3 and 4 on disk, the checkpoint still at step 2
    ("checkpoint-written:4", 2),  # during: the temporary file complete, not yet renamed
    ("checkpoint-replaced:4", 4),  # the rename done, the directory not yet synced
    ("step:5", 4),  # between checkpoints
    ("checkpoint-replaced:9", 9),  # the last checkpoint
]

# One process imports torch once and forks a run per kill (a fresh interpreter per kill costs ten
# seconds of imports); it never computes anything itself, so the forks start clean. Per kill it
# prints the signal, the checkpoint's step and the steps in the log on disk.
_KILL_EACH_FORK = """
import json, os, sys
import pyssl.methods, sklearn.datasets  # imported once, for every fork
from pyssl.cli import main
from pyssl.train import LOGS, load_checkpoint, read_log
argv, kills = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for number, instant in enumerate(kills):
    pid = os.fork()
    if pid == 0:
        os.environ["PYSSL_CRASH_AT"] = instant
        os._exit(main(argv + (["--resume"] if number else [])))
    status = os.waitpid(pid, 0)[1]
    run = argv[argv.index("--out") + 1]
    rows, problems = read_log(os.path.join(run, "metrics.csv"), LOGS["metrics.csv"])
    print(json.dumps([os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                      load_checkpoint(os.path.join(run, "checkpoint.pt"))["step"],
                      [int(r["step"]) for r in rows], problems]), flush=True)
"""


@pytest.mark.slow
def test_sigkill_at_every_instant_around_checkpoints_then_resume(tmp_path):
    import json
    import signal

    from pyssl.cli import main
    from pyssl.train import LOGS, read_log

    assert main(_train_argv(tmp_path / "full", "--checkpoint-every", "2")) == 0
    cut = tmp_path / "cut"
    argv = _train_argv(cut, "--checkpoint-every", "2")
    r = subprocess.run(
        [sys.executable, "-c", _KILL_EACH_FORK, json.dumps(argv), json.dumps([k for k, _ in KILLS])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    reports = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(reports) == len(KILLS), r.stderr
    for (instant, checkpoint_step), (sig, step, logged, problems) in zip(KILLS, reports):
        assert sig == signal.SIGKILL and step == checkpoint_step, (instant, sig, step, r.stderr)
        # at every instant the log on disk holds every step of the checkpoint, each once
        assert not problems and logged[:checkpoint_step] == list(range(1, checkpoint_step + 1)), (instant, logged)
    assert main(argv + ["--resume"]) == 0
    rows, problems = read_log(str(cut / "metrics.csv"), LOGS["metrics.csv"])
    assert not problems and [int(r["step"]) for r in rows] == list(range(1, 10))
    assert _losses(cut) == _losses(tmp_path / "full")
    assert sorted(os.listdir(cut)) == ["checkpoint.pt", "config.json", "knn.csv", "metrics.csv"]  # no temporary left


def _log(path, *lines):
    with open(path, "w", newline="") as f:
        f.write("".join(line + "\r\n" for line in lines))


HEADER = "step,epoch,loss,lr,images_per_s"


def _row(step):
    return f"{step},0,{1 / step!r},0.1,100.0"


def test_resume_repairs_a_log_or_refuses_it_with_a_clear_message(tmp_path):
    from pyssl.train import LOGS, repair_log

    header, path = LOGS["metrics.csv"], str(tmp_path / "metrics.csv")
    # recorded length: the rows after the checkpoint, a torn one among them, are cut off
    _log(path, HEADER, *map(_row, (1, 2, 3)))
    length = os.path.getsize(path)
    with open(path, "a") as f:
        f.write(_row(4) + "\r\n" + "5,0,0.2")
    assert repair_log(path, header, 3, length, every_step=True) == []
    assert open(path, newline="").read() == "".join(line + "\r\n" for line in (HEADER, *map(_row, (1, 2, 3))))
    # no recorded length (checkpoints of earlier versions): a missing header and a torn line are repaired
    _log(path, *map(_row, (1, 2, 3, 4)))
    with open(path, "a") as f:
        f.write("5,0,0.2")
    assert repair_log(path, header, 3, None, every_step=True) == [
        "metrics.csv: added the missing header line",
        "metrics.csv: dropped a torn last line '5,0,0.2'",
    ]
    assert open(path, newline="").read().splitlines() == [HEADER, *map(_row, (1, 2, 3))]
    # what cannot be repaired is refused, and the log is left as it is
    refused = [
        ((HEADER, _row(1), _row(2)), 3, None, "step 3 is missing"),
        ((_row(4), _row(5)), 3, None, "steps 1-3 are missing"),
        ((HEADER, _row(1), _row(1), _row(2)), 2, None, "step 1 is logged more than once"),
        ((HEADER, _row(1), "garbage", _row(2)), 2, None, "a line that does not parse: 'garbage'"),
        ((HEADER, _row(1)), 2, 10_000, "it is shorter than at the checkpoint"),
    ]
    for lines, step, length, reason in refused:
        _log(path, *lines)
        before = open(path, "rb").read()
        with pytest.raises(CheckpointError) as e:
            repair_log(path, header, step, length, every_step=True)
        assert reason in str(e.value)
        assert f"move metrics.csv aside to resume with a new log from step {step + 1}" in str(e.value)
        assert open(path, "rb").read() == before


def test_a_cpu_run_predicted_to_take_hours_is_warned_about(tmp_path, capsys, monkeypatch):
    import pyssl.train

    Trainer(make_method(), SMALL, cfg(tmp_path / "fast")).fit()
    assert "warning" not in capsys.readouterr().err  # six tiny steps: seconds, not hours
    monkeypatch.setattr(pyssl.train, "SLOW_RUN_WARNING_S", 0.0)  # every run is "hours" now
    Trainer(make_method(), SMALL, cfg(tmp_path / "slow")).fit()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "images/s the rest of this run takes about" in warnings[0]
    assert "hours on the CPU; a GPU, a smaller backbone or image size, or fewer epochs" in warnings[0]
