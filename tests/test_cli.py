"""CLI: --help everywhere, one-line errors before any training, train -> eval -> plot."""

import csv
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from pyssl.cli import main

TINY = [
    "--image-size",
    "8",
    "--backbone",
    "convnet-small",
    "--hidden-dim",
    "16",
    "--device",
    "cpu",
    "--no-progress",
    "--no-tensorboard",
]


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"], ["plot", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "usage: pyssl" in capsys.readouterr().out


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "pyssl", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--method" in r.stdout and "--resume" in r.stdout


def _write_cifar(root, corrupt=False):
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(root, name), "wb") as f:
            if corrupt and name == "data_batch_2":
                f.write(b"garbage")
            else:
                pickle.dump(
                    {
                        b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8),
                        b"labels": rng.integers(0, 10, 8).tolist(),
                    },
                    f,
                )


def _error_cases(tmp_path):
    _write_cifar(tmp_path / "bad", corrupt=True)
    cases = [
        (["train", "--method", "swav2"], "unknown method 'swav2'"),
        (["train", "--batch-size", "5000", *TINY], "batch size 5000 is larger than the data set (1258 images)"),
        (["train", "--data", f"cifar10:{tmp_path}/missing", *TINY], "does not exist"),
        (["train", "--data", f"cifar10:{tmp_path}/bad", *TINY], "corrupt data file"),
        (["train", "--data", "imagenet:/x", *TINY], "unknown data set"),
        (["train", "--backbone", "resnet99", "--device", "cpu"], "unknown backbone"),
        (["train", "--resume", *TINY], "no checkpoint"),
        (
            ["train", "--method", "simclr", "--queue-size", "64", *TINY],
            "not an option of simclr (it is one of moco, mocov2, swav)",
        ),
        (["train", "--method", "simclr", "--data", "videos", *TINY], "simclr trains on images"),
        (
            ["train", "--method", "simclr", "--bn-splits", "2", *TINY],
            "not an option of simclr (it is one of moco, mocov2)",
        ),
        (["train", "--method", "simclr", "--lock-image", *TINY], "not an option of simclr (it is one of clip)"),
        (["train", "--method", "clip", "--data", "digits", *TINY], "digits has no captions"),
        (["eval", str(tmp_path / "nothing")], "no checkpoint"),
        (["plot", str(tmp_path / "nothing")], "does not exist"),
    ]
    if not torch.cuda.is_available():
        cases.append((["train", "--device", "cuda"], "CUDA is not available"))
    return cases


def test_configuration_errors_are_one_line_before_training(tmp_path, capsys):
    for argv, message in _error_cases(tmp_path):
        out = tmp_path / "run"
        rc = main(argv + (["--out", str(out)] if argv[0] == "train" else []))
        err = capsys.readouterr().err
        assert rc == 2, argv
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pyssl: error:") and message in lines[0], (argv, err)
        assert not os.path.exists(out / "metrics.csv")  # nothing trained


def test_error_in_a_subprocess_has_no_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pyssl", "train", "--data", f"cifar10:{tmp_path}/nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"pyssl: error: data path {tmp_path}/nope does not exist"]


def test_train_eval_plot_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--method",
                "mocov2",
                "--epochs",
                "2",
                "--batch-size",
                "256",
                "--knn-every",
                "1",
                "--out",
                str(run),
                *TINY,
            ]
        )
        == 0
    )
    assert {"checkpoint.pt", "metrics.csv", "knn.csv", "config.json"} <= set(os.listdir(run))
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                str(run),
                "--protocols",
                "linear,knn,finetune",
                "--fractions",
                "10%,100%",
                "--k",
                "20",
                "--finetune-steps",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for row in ("mocov2 encoder", "random-init encoder", "raw pixels", "kNN (k=20", "fine-tune"):
        assert row in out
    assert os.path.exists(run / "eval.json")
    capsys.readouterr()
    assert (
        main(["eval", str(run), "--protocols", "linear", "--fractions", "100%", "--layer", "mid", "--device", "cpu"])
        == 0
    )
    captured = capsys.readouterr()
    assert "features of 'mid' pooled to 2x2" in captured.err and "mocov2 encoder" in captured.out
    assert main(["eval", str(run), "--layer", "no.such.layer", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no module 'no.such.layer'" in err[0]
    assert main(["plot", str(run), "--device", "cpu"]) == 0
    for png in ("loss.png", "knn.png", "embedding.png"):
        with open(run / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_train_on_cifar_files_and_resume_finished_run(tmp_path):
    _write_cifar(tmp_path / "c")
    run = tmp_path / "run"
    argv = [
        "train",
        "--method",
        "simclr",
        "--data",
        f"cifar10:{tmp_path}/c",
        "--image-size",
        "8",
        "--backbone",
        "convnet-small",
        "--hidden-dim",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--knn-every",
        "1",
        "--knn-k",
        "5",
        "--device",
        "cpu",
        "--no-progress",
        "--no-tensorboard",
        "--out",
        str(run),
    ]
    assert main(argv) == 0
    assert main(argv + ["--resume"]) == 0  # nothing left to do, but a valid resume


def test_training_stack_is_imported_lazily():
    code = (
        "import sys, pyssl; assert not any(m in sys.modules for m in ('pyssl.train', 'pyssl.methods', "
        "'pyssl.data', 'sklearn')); m = pyssl.methods; assert 'simclr' in m.available_methods()"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_cifar10_defaults_are_the_standard_protocol(tmp_path):
    from pyssl.config import build_trainer, resolve

    root = tmp_path / "cifar-10-batches-py"
    _write_cifar(root)
    trainer = build_trainer(resolve("simclr", f"cifar10:{tmp_path}", device="cpu", out=str(tmp_path / "run")))
    cfg, backbone = trainer.cfg, trainer.method.backbone
    assert cfg.epochs == 200 and cfg.knn_k == 200 and cfg.knn_t == 0.1 and cfg.knn_every > 0
    assert cfg.batch_size == 40  # 512, capped by this 40-image stand-in
    assert cfg.optimizer == "sgd" and cfg.lr == pytest.approx(0.06 * 40 / 128)
    assert trainer.method.build_spec["cfg"]["backbone"] == "resnet18" and backbone.out_dim == 512
    assert backbone.stem[0].kernel_size == (3, 3) and backbone.stem[0].stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in backbone.modules())


def test_init_backbone_starts_from_another_runs_backbone(tmp_path, capsys):
    from pyssl.config import build_trainer, resolve
    from pyssl.train import load_checkpoint

    first = tmp_path / "simclr"
    common = [
        "--data",
        "captioned_digits",
        "--image-size",
        "16",
        "--backbone",
        "convnet-small",
        "--epochs",
        "1",
        "--batch-size",
        "256",
        "--no-progress",
        "--no-tensorboard",
        "--knn-every",
        "0",
    ]
    assert main(["train", "--method", "simclr", *common, "--out", str(first)]) == 0
    saved = load_checkpoint(str(first / "checkpoint.pt"))["backbone"]
    for method in ("clip", "mocov2"):
        run = resolve(
            method,
            "captioned_digits",
            image_size=16,
            backbone="convnet-small",
            epochs=1,
            batch_size=256,
            knn_every=0,
            out=str(tmp_path / method),
            init_backbone=str(first),
        )
        trainer = build_trainer(run)
        copies = [trainer.method.backbone] + ([trainer.method.backbone_momentum] if method == "mocov2" else [])
        for module in copies:
            for name, value in module.state_dict().items():
                assert torch.equal(value.cpu(), saved[name]), (method, name)
        assert trainer.extra["init_backbone"] == str(first)
    capsys.readouterr()
    rc = main(
        [
            "train",
            "--method",
            "clip",
            "--data",
            "captioned_digits",
            "--image-size",
            "16",
            "--backbone",
            "resnet-tiny",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "bad"),
            "--init-backbone",
            str(first),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "does not fit this method's" in err[0] and "--backbone" in err[0]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
        (["train", "--batch-size", "0"], "argument --batch-size: must be >= 2, got 0"),
        (["train", "--image-size", "0"], "argument --image-size: must be >= 1, got 0"),
        (["train", "--epochs", "-3"], "argument --epochs: must be >= 1, got -3"),
        (["train", "--hidden-dim", "0"], "argument --hidden-dim: must be >= 1, got 0"),
        (["train", "--knn-k", "0"], "argument --knn-k: must be >= 1, got 0"),
        (["train", "--knn-t", "0"], "argument --knn-t: must be > 0, got 0"),
        (["train", "--epochs", "two"], "argument --epochs: must be an integer, got 'two'"),
        (["train", "--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
        (["eval", "run", "--k", "0"], "argument --k: must be >= 1, got 0"),
    ],
)
def test_zero_sizes_are_refused_not_replaced_by_defaults(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_help_lists_every_method_and_the_defaults(capsys):
    from pyssl.cli import METHODS
    from pyssl.methods import available_methods

    assert sorted(METHODS) == available_methods()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split()).partition("options:")[2]  # argparse wraps lines
    assert all(f"{name} (" in text for name in METHODS)
    for flag, default in (
        ("--epochs", "40 on digits"),
        ("--batch-size", "128 on digits"),
        ("--seed", "(default 0)"),
        ("--knn-t", "(default 0.1)"),
    ):
        assert default in text[text.index(f"{flag} {flag[2:].upper().replace('-', '_')}") :][:400], flag


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pyssl: error:"), err
    return err[0]


def test_a_run_is_never_overwritten_without_being_asked(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--epochs", "1", "--batch-size", "256", "--knn-every", "0", "--out", str(run), *TINY]
    os.makedirs(run / "tb")
    files = {
        "checkpoint.pt": b"a finished run",
        "metrics.csv": b"step\n",
        "eval.json": b"{}",
        "tb/events.out.tfevents.1.old": b"old events",
    }
    for name, content in files.items():
        (run / name).write_bytes(content)
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert f"{run} already holds a run with a checkpoint" in line and "--resume" in line and "--overwrite" in line
    assert all((run / name).read_bytes() == content for name, content in files.items())
    (run / "checkpoint.pt").unlink()  # a run stopped before its first checkpoint: only --overwrite helps
    assert main(argv) == 2
    assert "logs of a run stopped before its first checkpoint; pass --overwrite" in _one_error_line(capsys)
    assert main(argv + ["--resume"]) == 2
    assert "stopped before the first checkpoint; pass --overwrite" in _one_error_line(capsys)
    assert main(argv + ["--overwrite"]) == 0
    assert not os.path.exists(run / "eval.json") and os.listdir(run / "tb") == []  # the old run's, gone
    assert [r["step"] for r in csv.DictReader(open(run / "metrics.csv"))] == ["1", "2", "3", "4"]


def test_ctrl_c_says_how_to_resume_and_resume_says_where_it_starts(tmp_path, capsys, monkeypatch):
    import shlex

    import pyssl.train

    def interrupt_at(step, at="step"):
        def probe(instant, now):
            if instant == at and now == step:
                raise KeyboardInterrupt

        return lambda: probe

    run = tmp_path / "run"
    argv = [
        "train",
        "--epochs",
        "1",
        "--batch-size",
        "256",
        "--knn-every",
        "0",
        "--checkpoint-every",
        "2",
        "--out",
        str(run),
        *TINY,
    ]
    monkeypatch.setattr(pyssl.train, "crash_probe_from_env", interrupt_at(1))
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "pyssl: interrupted at step 1 of 4, before the first checkpoint: nothing to resume" in err
    # Ctrl-C right after the first checkpoint's file is in place, before the trainer records it:
    # there is a checkpoint to resume from (it used to say there was none and to --overwrite it).
    monkeypatch.setattr(pyssl.train, "crash_probe_from_env", interrupt_at(2, "checkpoint-replaced"))
    assert main(argv + ["--overwrite"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-2].endswith("holds the checkpoint of step 2. Resume with:")
    monkeypatch.setattr(pyssl.train, "crash_probe_from_env", interrupt_at(3))
    assert main(argv + ["--overwrite"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2] == f"pyssl: interrupted at step 3 of 4; {run} holds the checkpoint of step 2. Resume with:"
    resume = shlex.split(err[-1])
    assert resume[0] == "pyssl" and resume[1:] == argv + ["--resume"]  # --overwrite would start over
    monkeypatch.setattr(pyssl.train, "crash_probe_from_env", lambda: None)
    assert main(resume[1:]) == 0
    assert "resuming from step 2 of 4" in capsys.readouterr().err
    assert [r["step"] for r in csv.DictReader(open(run / "metrics.csv"))] == ["1", "2", "3", "4"]


def test_unlabelled_image_folder_trains_without_knn(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    run = tmp_path / "run"
    argv = ["train", "--data", f"folder:{tmp_path}", "--epochs", "1", "--batch-size", "16", "--out", str(run), *TINY]
    assert main(argv + ["--knn-every", "1"]) == 2
    assert "knn_every 1: folder:" in _one_error_line(capsys)
    assert main(argv) == 0
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 2 and not list(csv.DictReader(open(run / "knn.csv")))


def test_plot_names_its_run_counts_steps_in_integers_and_draws_a_damaged_log(tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    run = tmp_path / "mocov2-digits"
    os.makedirs(run)
    # a log of an earlier version killed before its first checkpoint: no header line, a torn last row
    (run / "metrics.csv").write_text("1,0,5.5,0.1,90.0\r\n2,0,5.25,0.1,91.0\r\n3,0,5.2")
    (run / "knn.csv").write_text("step,epoch,knn_accuracy\r\n2,1,0.5\r\n4,2,0.75\r\n")
    saved = {}

    def record(fig, path, **kw):
        ax = fig.axes[0]
        saved[os.path.basename(path)] = (ax.get_title(), ax.xaxis.get_major_locator(), ax.get_lines()[0].get_xdata())

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    assert main(["plot", str(run)]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "metrics.csv: skipped 2 damaged line(s) (no header line)" in err
    title, locator, steps = saved["loss.png"]
    assert title == "training loss (mocov2-digits)" and list(steps) == [1, 2]
    assert locator._integer  # no step 1.5 on the axis
    title, locator, _ = saved["knn.png"]
    assert "mocov2-digits" in title and locator._integer


def test_plot_default_embedding_is_the_demos_tsne():
    from pyssl.cli import build_parser

    assert build_parser().parse_args(["plot", "run"]).embedding == "tsne"


def test_resuming_another_runs_directory_says_what_differs(tmp_path, capsys):
    _write_cifar(tmp_path / "c")
    run = tmp_path / "run"
    argv = [
        "train",
        "--data",
        f"cifar10:{tmp_path}/c",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--knn-every",
        "0",
        "--out",
        str(run),
        *TINY,
    ]
    assert main(argv + ["--method", "simclr"]) == 0
    os.rename(tmp_path / "c", tmp_path / "moved")  # the same data set elsewhere is the same run
    moved = [a.replace(f"{tmp_path}/c", f"{tmp_path}/moved") for a in argv]
    assert main(moved + ["--method", "simclr", "--resume"]) == 0
    capsys.readouterr()
    assert main(moved + ["--method", "mocov2", "--resume"]) == 2
    line = _one_error_line(capsys)
    assert "it holds a simclr run on cifar10:" in line and "method simclr there, mocov2 here" in line
