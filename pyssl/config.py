"""Run configuration: what a training run is, resolved and validated before any step.

``resolve(method, data, **overrides) -> RunConfig`` and ``build_trainer(run) -> Trainer`` are what
the CLI, the demo, the benchmarks and the tests use to set up a run; the CLI only turns its
arguments into ``overrides``. Defaults are declared beside what they describe, weakest first:

1. the data set's (``register_data(..., defaults=...)`` in :mod:`pyssl.data.specs`: backbone,
   image size, batch, epochs, learning rate per method, kNN schedule);
2. the method's ``spec.run_defaults`` (:class:`pyssl.methods.MethodSpec`; the pretext tasks'
   small encoders and AdamW rates, for instance);
3. what the method derives from the data (``Method.run_defaults_for``: MoCo's queue, CLIP's
   vocabulary);
4. the overrides.

An override names a constructor argument of the method (validated against its signature), a
field of :class:`pyssl.train.TrainConfig`, or one of the run keys ``image_size``, ``out`` and
``init_backbone``. A name both the method and the trainer know (MoCo's key-encoder ``momentum``
against the optimiser's) goes to the method; ``train={"momentum": 0.9}`` reaches the trainer.

    >>> run = resolve("mocov2", "digits", epochs=1, queue_size=256)   # doctest: +SKIP
    >>> build_trainer(run).fit()                                      # doctest: +SKIP
"""

from __future__ import annotations

import ast
import inspect
import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from pyssl.data import ImageDataset, data_defaults, open_data
from pyssl.methods import MethodError, available_methods, build_method, method_class, method_preset
from pyssl.train import CHECKPOINT_NAME, CheckpointError, ConfigError, TrainConfig, Trainer, load_checkpoint

DEFAULT_RUN_DIR = "runs"
#: Overrides that belong to the run itself rather than to the method or the trainer.
RUN_KEYS = ("image_size", "out", "init_backbone")
#: TrainConfig fields a run sets itself (out_dir: from ``out``).
_DERIVED_TRAIN_FIELDS = ("out_dir",)
# What every method is built with: from the data (channels, statistics) and the run's image size.
_DATA_DERIVED = ("image_size", "in_channels", "mean", "std")


@dataclass
class RunConfig:
    """A resolved run: which method with which constructor arguments, on which data, trained how.

    ``method_cfg`` is exactly what ``build_method(method, **method_cfg)`` receives (and what a
    checkpoint stores to rebuild the method); ``train`` is the trainer's configuration;
    ``train_set``/``test_set`` the loaded data (not part of the configuration's text form; a
    :class:`~pyssl.data.StreamingImageDataset` where the data streams, see ``TrainConfig.stream``).
    """

    method: str
    data: str
    method_cfg: dict
    train: TrainConfig
    init_backbone: str | None = None
    train_set: ImageDataset | None = field(default=None, repr=False, compare=False)
    test_set: ImageDataset | None = field(default=None, repr=False, compare=False)

    @property
    def out(self) -> str:
        return self.train.out_dir

    @property
    def image_size(self) -> int:
        return self.method_cfg["image_size"]

    def to_dict(self) -> dict:
        """The configuration as JSON-able data (config.json of a run)."""
        return {
            "method": self.method,
            "data": self.data,
            "method_cfg": self.method_cfg,
            "train": asdict(self.train),
            "init_backbone": self.init_backbone,
        }

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """The inverse of :meth:`to_dict` (the data is loaded again by :func:`build_trainer`)."""
        return cls(
            method=d["method"],
            data=d["data"],
            method_cfg=dict(d["method_cfg"]),
            train=TrainConfig.from_dict(d["train"]),
            init_backbone=d.get("init_backbone"),
        )


def method_options(name: str) -> dict[str, Any]:
    """The constructor arguments of registered method ``name`` with their defaults (its
    registration preset applied); ``inspect.Parameter.empty`` for a required one."""
    cls = method_class(name)
    preset = method_preset(name)
    options = {}
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        options[p.name] = preset.get(p.name, p.default)
    return options


def _accepts_anything(name: str) -> bool:
    params = inspect.signature(method_class(name).__init__).parameters.values()
    return any(p.kind == p.VAR_KEYWORD for p in params)


def train_options() -> tuple[str, ...]:
    return tuple(f.name for f in fields(TrainConfig) if f.name not in _DERIVED_TRAIN_FIELDS)


def parse_value(text: str) -> Any:
    """A ``--set KEY=VALUE`` value: a Python literal (``4096``, ``0.99``, ``None``, ``[0.3, 1.0]``,
    ``{"p_flip": 0.0}``, ``true``/``false``) or else the text itself (``resnet18``)."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``["queue_size=4096", "backbone=resnet18"]`` -> ``{"queue_size": 4096, "backbone": "resnet18"}``."""
    found: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        if key in found:
            raise ConfigError(f"--set {key} is given twice")
        found[key] = parse_value(value)
    return found


def _methods_with_option(key: str) -> list[str]:
    return [name for name in available_methods() if key in method_options(name)]


def _unknown_option(method: str, key: str) -> ConfigError:
    others = _methods_with_option(key)
    if others:
        return ConfigError(f"{key} is not an option of {method} (it is one of {', '.join(others)})")
    return ConfigError(
        f"unknown setting {key!r} for {method}: its options are {', '.join(sorted(method_options(method)))}; "
        f"the trainer's are {', '.join(train_options())}; the run's are {', '.join(RUN_KEYS)}"
    )


def _layered_defaults(kind: str, run_defaults: dict) -> dict:
    """The data set's defaults under the method's (a method's None removes the data set's value)."""
    d = data_defaults(kind)
    for key, value in run_defaults.items():
        if value is None:
            d.pop(key, None)
        else:
            d[key] = dict(value) if isinstance(value, dict) else value
    return d


def _given(value, default):
    """A setting left unset (None) takes its default; a zero or empty one is the user's, and is
    validated rather than replaced."""
    return default if value is None else value


def default_out(method: str, data: str) -> str:
    """Where a run writes when not told: ``runs/METHOD-KIND`` (KIND: the data set's name)."""
    return os.path.join(DEFAULT_RUN_DIR, f"{method}-{data.partition(':')[0].lower()}")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve(
    method: str = "simclr",
    data: str | None = None,
    *,
    train: dict | None = None,
    datasets: tuple[ImageDataset, ImageDataset | None] | None = None,
    **overrides,
) -> RunConfig:
    """Resolves and validates a run; every error a run could meet before its first step is raised
    here (``ConfigError``, ``MethodError``, ``DataError``, ``ModelError``), as one line.

    Args:
        method: a registered method name.
        data: a data spec (``digits``, ``cifar10:PATH``, ...); default: the method's.
        train: TrainConfig fields, for names the method also uses (``momentum``).
        datasets: an already loaded ``(train, test)`` pair to use instead of loading ``data``
            (``data`` then only names it in logs and checkpoints).
        overrides: method constructor arguments, TrainConfig fields and run keys (see the module).
    """
    if method not in available_methods():
        raise ConfigError(f"unknown method {method!r} (choose from {', '.join(available_methods())})")
    cls = method_class(method)
    spec = cls.spec
    data = data or spec.default_data
    kind = data.partition(":")[0].lower()
    d = _layered_defaults(kind, spec.run_defaults)

    options = method_options(method)
    open_signature = _accepts_anything(method)
    method_over, train_over, run_over = {}, dict(train or {}), {}
    unknown_train = set(train_over) - set(train_options())
    if unknown_train:
        raise ConfigError(f"train: unknown trainer setting(s) {', '.join(sorted(unknown_train))}")
    misplaced = []  # reported after the data is checked: wrong data is the more basic mistake
    for key, value in overrides.items():
        if key in RUN_KEYS:
            run_over[key] = value
        elif key in _DATA_DERIVED:
            misplaced.append(ConfigError(f"{key} comes from the data; set image_size, or load other data"))
        elif key in options or (open_signature and key not in train_options()):
            method_over[key] = value
        elif key in train_options():
            train_over[key] = value
        else:
            misplaced.append(_unknown_option(method, key))

    image_size = _given(run_over.get("image_size"), d["image_size"])
    if datasets is not None:
        train_set, test_set = datasets
    else:
        # Large image folders and file lists stream (pyssl.data.streaming); the rest as before.
        stream = train_over.get("stream")
        if stream not in (None, True, False):
            raise ConfigError(f"stream must be True, False or None (choose by size), got {stream!r}")
        train_set, test_set = open_data(
            data, image_size, stream, train_over.get("max_bad_files", TrainConfig.max_bad_files)
        )
    if kind == "videos" and spec.inputs != "videos":
        raise ConfigError(
            f"videos holds clips of several frames stacked as channels; {method} trains on "
            f"images (video_colorization is the method for videos)"
        )
    if spec.needs_texts and train_set.texts is None:
        raise ConfigError(
            f"{method} trains on image-text pairs and {kind} has no captions (use --data {spec.default_data})"
        )
    if misplaced:
        raise misplaced[0]
    labelled = bool((train_set.labels >= 0).any()) and test_set is not None and bool((test_set.labels >= 0).any())
    if not labelled and train_over.get("knn_every"):
        raise ConfigError(f"knn_every {train_over['knn_every']}: {data} has no labels to measure kNN accuracy with")
    batch_size = _given(train_over.get("batch_size"), min(d["batch_size"], len(train_set)))
    if batch_size > len(train_set):
        raise ConfigError(f"batch size {batch_size} is larger than the data set ({len(train_set)} images)")

    mean, std = train_set.mean_std()
    method_cfg: dict[str, Any] = {
        "backbone": d["backbone"],
        "image_size": image_size,
        "in_channels": train_set.channels,
        "mean": list(mean),
        "std": list(std),
    }
    # The data set's sizes apply where the method has such an argument.
    for key in ("hidden_dim", "augment_kwargs"):
        if d.get(key) is not None and key in options:
            method_cfg[key] = dict(d[key]) if isinstance(d[key], dict) else d[key]
    if method in d.get("temperature", {}) and "temperature" in options:
        method_cfg["temperature"] = d["temperature"][method]
    method_cfg.update(cls.run_defaults_for(train_set, batch_size))
    method_cfg.update(method_over)

    tdef = spec.train_defaults
    if "lr" in train_over:
        lr = train_over.pop("lr")
    elif "lr" in d:  # tuned per method for the data set's default batch size; linear scaling otherwise
        lr = d["lr"].get(method, d["lr"]["*"]) * batch_size / d["batch_size"]
    else:
        lr = tdef["lr"] * batch_size / 128
    epochs = _given(train_over.pop("epochs", None), d["epochs"])
    device = _given(train_over.pop("device", None), default_device())
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device} requested but CUDA is not available")
    knn_every = train_over.pop("knn_every", None)
    warmup = train_over.pop("warmup_epochs", None)
    train_cfg = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        optimizer=_given(train_over.pop("optimizer", None), tdef["optimizer"]),
        lr=lr,
        weight_decay=train_over.pop("weight_decay", tdef["weight_decay"]),
        momentum=train_over.pop("momentum", tdef.get("momentum", 0.9)),
        warmup_epochs=warmup if warmup is not None else min(d.get("warmup_epochs", 0.0), epochs / 10),
        device=device,
        out_dir=run_over.get("out") or default_out(method, data),
        knn_every=knn_every if knn_every is not None else d["knn_every"] if labelled else 0,
        knn_k=_given(train_over.pop("knn_k", None), d.get("knn_k", 200)),
        **{k: v for k, v in train_over.items() if k != "batch_size"},
    )
    train_cfg.validate()
    return RunConfig(
        method=method,
        data=data,
        method_cfg=method_cfg,
        train=train_cfg,
        init_backbone=run_over.get("init_backbone"),
        train_set=train_set,
        test_set=test_set,
    )


def build_method_of(run: RunConfig):
    """The run's method, with the run's seed fixing its initial weights."""
    torch.manual_seed(run.train.seed)
    method = build_method(run.method, **run.method_cfg)
    if run.init_backbone:
        init_backbone(method, run.init_backbone)
    return method


def build_trainer(run: RunConfig, *, callbacks=None, probe=None, logs=None) -> Trainer:
    """The trainer of a resolved run (its method built with the run's seed)."""
    if run.train_set is None:  # a RunConfig made by hand, or read back from JSON
        run.train_set, run.test_set = open_data(run.data, run.image_size, run.train.stream, run.train.max_bad_files)
    method = build_method_of(run)
    extra = {"data": run.data, "method": run.method, "image_size": run.image_size}
    if run.init_backbone:
        extra["init_backbone"] = os.path.abspath(run.init_backbone)
    trainer = Trainer(
        method, run.train_set, run.train, run.test_set, callbacks=callbacks, extra=extra, probe=probe, logs=logs
    )
    trainer.run = run
    return trainer


# ---- runs on disk ----------------------------------------------------------------------------------

#: What a run directory holds beside its checkpoint: a new run refuses to start where one of these,
#: or a checkpoint, exists unless told.
RUN_FILES = ("metrics.csv", "knn.csv", "config.json", "tb")
#: Outputs of ``pyssl eval`` and ``pyssl plot`` about a run, removed when it is overwritten.
RUN_REPORTS = ("eval.json", "loss.png", "knn.png", "embedding.png")


def check_run_directory(out: str, resume: bool, overwrite: bool) -> None:
    """A run starts only where no run is, unless told to continue it (``--resume``) or to
    start it over (``--overwrite``)."""
    has_checkpoint = os.path.exists(os.path.join(out, CHECKPOINT_NAME))
    if resume and not has_checkpoint:
        before = any(os.path.exists(os.path.join(out, name)) for name in RUN_FILES)
        raise CheckpointError(
            f"--resume: no checkpoint in {out}"
            + (
                " (its run was stopped before the first checkpoint; pass --overwrite to start it over)"
                if before
                else ""
            )
        )
    if resume or overwrite:
        return
    if has_checkpoint:
        raise ConfigError(
            f"{out} already holds a run with a checkpoint; pass --resume to continue it or --overwrite "
            f"to start it over (or choose another --out)"
        )
    if any(os.path.exists(os.path.join(out, name)) for name in RUN_FILES):
        raise ConfigError(
            f"{out} already holds the logs of a run stopped before its first checkpoint; pass "
            f"--overwrite to start it over (or choose another --out)"
        )


def remove_run_reports(out: str) -> None:
    """An overwritten run's reports (eval.json, plots) go with it: they describe the old run."""
    for name in RUN_REPORTS:
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def write_run_config(run: RunConfig, trainer: Trainer, extra: dict | None = None) -> str:
    """Writes ``config.json`` into the run directory: the resolved run, the trainer's
    configuration and how to rebuild the method (``extra``: more to record, e.g. the command line)."""
    os.makedirs(run.out, exist_ok=True)
    path = os.path.join(run.out, "config.json")
    content = {
        **(extra or {}),
        "run": run.to_dict(),
        "train": asdict(trainer.cfg),
        "method": trainer.method_spec,
        "world_size": trainer.world_size,
    }
    with open(path, "w") as f:
        json.dump(content, f, indent=1, default=str)
    return path


def checkpoint_file(path: str) -> str:
    """A run directory's checkpoint, or ``path`` itself when it names a file."""
    return os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else path


def init_backbone(method, path: str) -> None:
    """Loads the backbone weights of the run at ``path`` into ``method.backbone`` and into every
    momentum teacher of it (``spec.teachers``), which must start equal. A mismatch is a one-line
    CheckpointError."""
    ckpt_path = checkpoint_file(path)
    state = load_checkpoint(ckpt_path).get("backbone")
    if not state:
        raise CheckpointError(f"--init-backbone: {ckpt_path} holds no backbone weights")
    teachers = [teacher for teacher, student in type(method).spec.teachers if student == "backbone"]
    for name in ("backbone", *teachers):
        try:
            getattr(method, name).load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(
                f"--init-backbone: the backbone of {ckpt_path} does not fit this method's "
                f"({str(e).splitlines()[0][:160]}); pass the same --backbone"
            ) from None


def load_run(path: str, device: str):
    """(method with the trained weights, a fresh random-init copy, checkpoint dict) of a run."""
    ckpt_path = checkpoint_file(path)
    ckpt = load_checkpoint(ckpt_path)
    spec = ckpt.get("method") or {}
    if "name" not in spec:
        raise CheckpointError(f"{ckpt_path} does not record how to rebuild its method")
    torch.manual_seed(12345)
    try:
        method = build_method(spec["name"], **spec["cfg"])
        random_init = build_method(spec["name"], **spec["cfg"])
    except MethodError as e:
        raise CheckpointError(f"{ckpt_path}: its method cannot be rebuilt here ({e})") from None
    method.load_state_dict(ckpt["model"])
    return method.to(device).eval(), random_init.to(device).eval(), ckpt


__all__ = [
    "RunConfig",
    "resolve",
    "build_trainer",
    "build_method_of",
    "method_options",
    "train_options",
    "parse_value",
    "parse_settings",
    "init_backbone",
    "write_run_config",
    "load_run",
    "checkpoint_file",
    "check_run_directory",
    "remove_run_reports",
    "RUN_FILES",
    "RUN_REPORTS",
    "default_device",
    "default_out",
    "DEFAULT_RUN_DIR",
    "RUN_KEYS",
]
