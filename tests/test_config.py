"""pyssl.config: runs resolved from layered defaults, validated overrides, and the CLI's --set."""

from __future__ import annotations

import json

import pytest
import torch

from pyssl.config import RunConfig, build_trainer, method_options, parse_settings, parse_value, resolve
from pyssl.methods import MethodError
from pyssl.train import ConfigError


def test_the_data_sets_defaults_apply_under_the_methods_and_the_overrides():
    run = resolve("simclr", "digits", device="cpu")
    assert run.method_cfg["backbone"] == "convnet-small" and run.method_cfg["image_size"] == 16
    assert run.method_cfg["temperature"] == 0.2  # tuned for SimCLR on digits
    assert run.train.lr == 0.5 and run.train.batch_size == 128 and run.train.epochs == 40
    # the pretext tasks' spec wins over the data set's sizes: small encoder, AdamW, no projection width
    rot = resolve("rotnet", device="cpu")
    assert rot.data == "digits" and rot.method_cfg["backbone"] == "small" and "hidden_dim" not in rot.method_cfg
    assert rot.train.optimizer == "adamw" and rot.train.lr == pytest.approx(2e-3) and rot.train.epochs == 20
    # the user's settings win over both; the learning rate scales with the batch only when defaulted
    mine = resolve("simclr", "digits", device="cpu", batch_size=64, temperature=0.3, backbone="resnet-tiny")
    assert mine.train.lr == pytest.approx(0.25) and mine.method_cfg["temperature"] == 0.3
    assert mine.method_cfg["backbone"] == "resnet-tiny"
    assert resolve("simclr", "digits", device="cpu", batch_size=64, lr=0.01).train.lr == 0.01


def test_a_method_derives_its_own_defaults_from_the_data():
    moco = resolve("mocov2", "digits", device="cpu")
    assert moco.method_cfg["queue_size"] == 512  # 128 doubled while at most min(4096, 1258 // 2)
    assert resolve("mocov2", "digits", device="cpu", queue_size=64).method_cfg["queue_size"] == 64
    clip = resolve("clip", device="cpu")
    assert clip.data == "captioned_digits" and clip.method_cfg["context_length"] == clip.train_set.texts.shape[1]


def test_a_name_both_the_method_and_the_trainer_know_goes_to_the_method():
    run = resolve("mocov2", "digits", device="cpu", momentum=0.9, train={"momentum": 0.5})
    assert run.method_cfg["momentum"] == 0.9 and run.train.momentum == 0.5
    assert resolve("simclr", "digits", device="cpu", momentum=0.8).train.momentum == 0.8  # SimCLR has none


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"queue_size": 64}, "queue_size is not an option of simclr (it is one of moco, mocov2, swav)"),
        ({"lock_image": True}, "lock_image is not an option of simclr (it is one of clip)"),
        ({"no_such_thing": 1}, "unknown setting 'no_such_thing' for simclr: its options are"),
        ({"in_channels": 1}, "in_channels comes from the data"),
        ({"batch_size": 5000}, "batch size 5000 is larger than the data set (1258 images)"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"train": {"out_dir": "x"}}, "train: unknown trainer setting(s) out_dir"),
    ],
)
def test_bad_settings_are_one_clear_error_naming_the_setting(overrides, message):
    with pytest.raises(ConfigError) as e:
        resolve("simclr", "digits", device="cpu", **overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_wrong_data_is_reported_before_a_misplaced_setting():
    with pytest.raises(ConfigError, match="digits has no captions"):
        resolve("clip", "digits", device="cpu", hidden_dim=16)
    with pytest.raises(ConfigError, match="unknown method 'byol2'"):
        resolve("byol2")
    with pytest.raises(MethodError, match="queue_size"):  # the method's own validation still speaks
        build_trainer(resolve("mocov2", "digits", device="cpu", queue_size=0))


def test_every_option_of_every_method_is_known_to_the_configuration():
    options = method_options("mocov2")
    assert options["version"] == 2 and options["queue_size"] == 65536 and "self" not in options
    assert method_options("moco")["version"] == 1


def test_a_run_round_trips_through_json_and_builds_the_same_method(tmp_path):
    run = resolve("mocov2", "digits", device="cpu", epochs=1, seed=3, out=str(tmp_path / "run"))
    again = RunConfig.from_dict(json.loads(json.dumps(run.to_dict())))
    assert again == run
    a, b = build_trainer(run).method, build_trainer(again).method
    assert a.build_spec == b.build_spec
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize(
    "text,value",
    [
        ("4096", 4096),
        ("0.99", 0.99),
        ("None", None),
        ("true", True),
        ("resnet18", "resnet18"),
        ("[0.3, 1.0]", [0.3, 1.0]),
    ],
)
def test_set_values_are_literals_or_text(text, value):
    assert parse_value(text) == value


def test_set_parses_keys_and_refuses_what_it_cannot_read():
    assert parse_settings(["queue-size=64", "momentum_end=1.0"]) == {"queue_size": 64, "momentum_end": 1.0}
    for bad, message in ((["queue_size"], "KEY=VALUE"), (["a=1", "a=2"], "given twice"), (["1x=2"], "KEY=VALUE")):
        with pytest.raises(ConfigError, match=message):
            parse_settings(bad)


def test_cli_set_reaches_the_method_and_contradicting_a_flag_is_an_error(tmp_path, capsys):
    from pyssl.cli import build_parser, main, prepare_training

    common = ["train", "--method", "mocov2", "--device", "cpu", "--out", str(tmp_path / "run")]
    args = build_parser().parse_args([*common, "--set", "queue_size=256", "--set", "momentum_end=1.0"])
    method = prepare_training(args).method
    assert method.criterion.queue.shape[0] == 256 and method.momentum_end == 1.0
    assert main([*common, "--queue-size", "128", "--set", "queue_size=256"]) == 2
    assert "contradicts the flag" in capsys.readouterr().err
