"""Command line: ``pyssl train``, ``pyssl eval``, ``pyssl plot`` (also ``python -m pyssl``).

Configuration errors (unknown method, batch larger than the data set, missing or corrupt data
files, bad checkpoints) are reported as one line, ``pyssl: error: ...``, before training starts.

Data-parallel training: under ``torchrun --nproc-per-node N -m pyssl train ...`` every worker
joins the process group from torchrun's environment; ``pyssl train --nproc N`` starts N local
workers itself (Gloo on the CPU, NCCL on CUDA, one GPU each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

#: ``pyssl train --method``: every registered method (a test checks this against the registry,
#: which the parser does not import: ``--help`` stays fast).
METHODS = {
    "simclr": "SimCLR",
    "moco": "MoCo v1",
    "mocov2": "MoCo v2",
    "mocov3": "MoCo v3, a momentum teacher and in-batch keys",
    "byol": "BYOL, a momentum teacher without negatives",
    "simsiam": "SimSiam, BYOL without the teacher",
    "barlow_twins": "Barlow Twins, cross-correlation to the identity",
    "vicreg": "VICReg, variance-invariance-covariance",
    "dino": "DINO, multi-crop self-distillation",
    "swav": "SwAV, online clustering with swapped predictions",
    "mae": "MAE, masked autoencoder on a ViT",
    "clip": "CLIP, image-text pairs",
    "rotnet": "rotation prediction",
    "jigsaw": "jigsaw puzzles",
    "relative_patch": "relative patch position",
    "colorization": "colourisation",
    "split_brain": "split-brain autoencoder",
    "inpainting": "context encoder",
    "cpc": "contrastive predictive coding",
    "video_colorization": "video colourisation, on videos",
}


class CLIError(Exception):
    """Reported as one line without a traceback."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; says how far the run got and how to resume it."""

    def __init__(self, out: str, step: int, total: int, checkpoint_step: int | None):
        super().__init__(out, step, total, checkpoint_step)
        self.out, self.step, self.total, self.checkpoint_step = out, step, total, checkpoint_step


def _interrupted_message(e: Interrupted, argv: list[str]) -> str:
    head = f"pyssl: interrupted at step {e.step} of {e.total}"
    if e.checkpoint_step is None:
        return (
            f"{head}, before the first checkpoint: nothing to resume (run the command with --overwrite to start over)"
        )
    resume = ["pyssl", *(a for a in argv if a != "--overwrite"), *([] if "--resume" in argv else ["--resume"])]
    import shlex

    return f"{head}; {e.out} holds the checkpoint of step {e.checkpoint_step}. Resume with:\n  {shlex.join(resume)}"


def _expected_errors():
    from pyssl.data import DataError
    from pyssl.launch import LaunchError
    from pyssl.methods import MethodError
    from pyssl.models import ModelError
    from pyssl.plot import PlotError
    from pyssl.train import CheckpointError, ConfigError

    return (CLIError, DataError, MethodError, ModelError, ConfigError, CheckpointError, LaunchError, PlotError)


def _fractions(text: str) -> list[float]:
    """ "0.01,0.1,1" or "1%,10%,100%"."""
    try:
        values = [float(v.strip()[:-1]) / 100 if v.strip().endswith("%") else float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"fractions must be numbers like 0.01,0.1,1, got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must lie in (0, 1], got {text!r}")
    return values


def _at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _default_device() -> str:
    from pyssl.config import default_device

    return default_device()


def _per_data(key: str) -> str:
    """A default of the data sets as "40 on digits, 20 on colour_digits/videos, ..."."""
    from pyssl.data import data_defaults, data_kinds

    kinds: dict = {}
    for kind in data_kinds():
        kinds.setdefault(data_defaults(kind)[key], []).append(kind)
    return ", ".join(f"{value} on {'/'.join(names)}" for value, names in kinds.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyssl", description="Self-supervised learning with pyssl's fused kernels.")
    sub = p.add_subparsers(dest="command", metavar="{train,eval,plot}")
    sub.required = True

    t = sub.add_parser(
        "train",
        help="pre-train an encoder",
        description=(
            "Pre-train an encoder with a self-supervised method. Defaults depend on the data: digits "
            "(embedded, no download) trains a small ConvNet on the CPU in minutes; cifar10:PATH runs the "
            "standard protocol (ResNet-18 CIFAR variant, batch 512, 200 epochs, kNN k=200)."
        ),
    )
    t.add_argument(
        "--method", default="simclr", help="; ".join(f"{k} ({v})" for k, v in METHODS.items()) + " (default simclr)"
    )
    t.add_argument(
        "--data",
        default=None,
        help="digits | colour_digits | captioned_digits | videos | cifar10:PATH | cifar100:PATH | "
        "stl10:PATH | folder:PATH | list:FILE.txt (image paths, each optionally TAB label) | "
        "captions:FILE.csv (image-text pairs, for clip) "
        "(default: the method's, digits for most)",
    )
    t.add_argument(
        "--backbone",
        help="small, convnet, convnet-small, resnet-tiny, resnet10-small, resnet18, resnet34, "
        "tv:NAME, timm:NAME (default per data set)",
    )
    t.add_argument("--image-size", type=_at_least(1), help="images are resized to this (default per data set)")
    t.add_argument("--epochs", type=_at_least(1), help=f"passes over the training data (default {_per_data('epochs')})")
    t.add_argument(
        "--batch-size",
        type=_at_least(2),
        help=f"images per optimiser step, over all processes (default {_per_data('batch_size')}, at most the data set)",
    )
    t.add_argument("--optimizer", choices=("sgd", "lars", "adamw"), default=None, help="default: the method's")
    t.add_argument("--lr", type=float, help="peak learning rate (default: the method's base rate x batch/128)")
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up before the cosine decay")
    t.add_argument("--clip-grad", type=float, default=None, help="max gradient norm")
    t.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    t.add_argument("--temperature", type=_positive_float, help="loss temperature (default: the method's)")
    t.add_argument("--queue-size", type=_at_least(1), help="MoCo: negatives in the queue (default min(4096, data/2))")
    t.add_argument("--key-momentum", type=float, help="MoCo: key-encoder momentum (default 0.99)")
    t.add_argument(
        "--bn-splits",
        type=_at_least(1),
        help="MoCo: emulate N devices for Shuffle-BN in each process "
        "(every BatchNorm normalises N chunks of the batch; default 1: off)",
    )
    t.add_argument("--hidden-dim", type=_at_least(1), help="projection head width (default per data set)")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default cuda when available)")
    t.add_argument(
        "--seed",
        type=int,
        default=0,
        help="fixes the initial weights, the batch order and the augmentations: a run repeats exactly (default 0)",
    )
    t.add_argument("--out", default=None, help="run directory (default runs/METHOD-DATA)")
    t.add_argument(
        "--checkpoint-every",
        type=_at_least(0),
        default=0,
        help="steps between checkpoints (default 0: at the end of every epoch)",
    )
    t.add_argument(
        "--knn-every", type=_at_least(0), help="epochs between kNN evaluations on the test split (0: never; default 5)"
    )
    t.add_argument("--knn-k", type=_at_least(1), default=None, help="kNN neighbours (default 200; 20 on digits)")
    t.add_argument(
        "--knn-t",
        type=_positive_float,
        default=0.1,
        help="kNN temperature: neighbours vote with weight exp(similarity / T) (default 0.1)",
    )
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="start over where --out already holds a run (its checkpoint, logs and plots are removed)",
    )
    t.add_argument(
        "--lock-image", action="store_true", help="CLIP: freeze the image backbone (LiT; use with --init-backbone)"
    )
    t.add_argument(
        "--init-backbone",
        metavar="RUN",
        help="start from the backbone of another run (its directory "
        "or checkpoint file), e.g. CLIP's image tower from a SimCLR run; the architectures must match",
    )
    t.add_argument(
        "--nproc",
        type=_at_least(1),
        default=None,
        help="data-parallel worker processes on this machine (one GPU each on CUDA); the batch size "
        "is the global one and must be divisible by N. Under torchrun, leave it out",
    )
    t.add_argument(
        "--data-on",
        choices=("auto", "device", "cpu"),
        default="auto",
        help="where the data set is held: on the GPU (batches never leave it) or in host memory "
        "(each batch copied over; for data sets larger than the GPU). auto: on the GPU while "
        "it takes at most 40%% of its free memory",
    )
    t.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="folder:PATH and list:FILE: decode the image files as they are trained on, in DataLoader "
        "workers, instead of all up front (default: when the decoded images would take more than "
        "25%% of the available memory)",
    )
    t.add_argument(
        "--data-workers",
        type=_at_least(0),
        default=None,
        help="streamed data: decoding worker processes (default one a core, at most 8; 0: in the training process)",
    )
    t.add_argument(
        "--sync-bn",
        choices=("auto", "on", "off"),
        default="auto",
        help="SyncBatchNorm across processes (CUDA only; auto: on when distributed on CUDA, "
        "except for MoCo, whose Shuffle-BN needs per-process statistics)",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files")
    t.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any constructor argument of the method or trainer setting, e.g. --set queue_size=4096 "
        "--set momentum_end=1.0 (values are Python literals or plain text; repeat for more). The "
        "flags above are shorthands for some of these",
    )

    e = sub.add_parser(
        "eval",
        help="evaluate a pre-trained encoder",
        description=(
            "Linear probe and kNN (and, with --finetune, fine-tuning) with fractions of the labels "
            "(class-balanced), for the pre-trained encoder beside a random-init encoder and raw pixels."
        ),
    )
    e.add_argument("run", help="run directory (or checkpoint file) written by pyssl train")
    e.add_argument("--data", help="evaluation data (default: the data the run trained on)")
    e.add_argument(
        "--fractions", type=_fractions, default=[0.01, 0.1, 1.0], help="label fractions (default 0.01,0.1,1)"
    )
    e.add_argument("--protocols", default="linear,knn", help="any of linear,knn,finetune (default linear,knn)")
    e.add_argument(
        "--finetune", action="store_true", help="also fine-tune (slow: minutes where the probes take seconds)"
    )
    e.add_argument("--k", type=_at_least(1), default=None, help="kNN neighbours (default 200; 20 on digits)")
    e.add_argument("--t", type=_positive_float, default=0.1, help="kNN temperature (default 0.1)")
    e.add_argument("--finetune-steps", type=_at_least(1), default=300, help="fine-tuning steps (default 300)")
    e.add_argument(
        "--layer",
        default=None,
        help="probe an intermediate layer: 'mid' (the second-to-last stage) or a module name of the backbone",
    )
    e.add_argument(
        "--grid", type=_at_least(1), default=2, help="with --layer: average-pool its map to GRID x GRID (default 2)"
    )
    e.add_argument("--no-baselines", action="store_true", help="skip the random-init encoder and raw pixels")
    e.add_argument("--device", default=None)
    e.add_argument("--seed", type=int, default=0)

    pl = sub.add_parser(
        "plot",
        help="plot a run",
        description=(
            "Writes loss.png (training loss), knn.png (kNN accuracy over epochs) and embedding.png "
            "(a 2-D map of the test features coloured by class) into the run directory."
        ),
    )
    pl.add_argument("run", help="run directory written by pyssl train")
    pl.add_argument("--out", help="where to write the PNGs (default: the run directory)")
    pl.add_argument(
        "--embedding",
        choices=("tsne", "pca"),
        default="tsne",
        help="how the test features are mapped to 2-D: t-SNE keeps the neighbourhoods kNN sees "
        "(default); PCA is faster but shows the two widest directions only",
    )
    pl.add_argument("--device", default=None)
    return p


# ---- train ---------------------------------------------------------------------------------------


#: The flags that set one configuration key each (pyssl.config.resolve's overrides); anything
#: else goes through --set KEY=VALUE. flag -> key
FLAG_SETTINGS = {
    "backbone": "backbone",
    "image_size": "image_size",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "optimizer": "optimizer",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "warmup_epochs": "warmup_epochs",
    "clip_grad": "clip_grad",
    "temperature": "temperature",
    "queue_size": "queue_size",
    "key_momentum": "momentum",
    "bn_splits": "bn_splits",
    "hidden_dim": "hidden_dim",
    "device": "device",
    "seed": "seed",
    "out": "out",
    "checkpoint_every": "checkpoint_every",
    "knn_every": "knn_every",
    "knn_k": "knn_k",
    "knn_t": "knn_t",
    "init_backbone": "init_backbone",
    "data_on": "data_on",
    "stream": "stream",
    "data_workers": "data_workers",
}


def run_overrides(args) -> dict:
    """The configuration keys the command line sets: its flags, then ``--set KEY=VALUE``."""
    from pyssl.config import parse_settings

    found = {key: getattr(args, flag) for flag, key in FLAG_SETTINGS.items() if getattr(args, flag) is not None}
    for flag, key in (("amp", "amp"), ("lock_image", "lock_image")):
        if getattr(args, flag):
            found[key] = True
    if args.no_progress:
        found["progress"] = False
    if args.no_tensorboard:
        found["tensorboard"] = False
    found["sync_bn"] = {"auto": None, "on": True, "off": False}[args.sync_bn]
    for key, value in parse_settings(args.set or []).items():
        if key in found and found[key] != value:
            raise CLIError(f"--set {key}={value!r} contradicts the flag that sets {key} to {found[key]!r}")
        found[key] = value
    return found


def prepare_training(args):
    """Everything that can fail (method, data, sizes, checkpoint) is checked here, before training."""
    from pyssl import distributed
    from pyssl.config import build_trainer, check_run_directory, default_out, resolve
    from pyssl.methods import method_class
    from pyssl.train import crash_probe_from_env

    spec = method_class(args.method).spec  # an unknown method is one error line, before anything else
    if args.data is None:  # colour pretext tasks default to colour data, video colorization to videos
        args.data = spec.default_data
    overrides = run_overrides(args)
    overrides.setdefault("out", default_out(args.method, args.data))
    if distributed.is_main_process():  # the other ranks would see the files rank 0 starts writing
        check_run_directory(overrides["out"], args.resume, args.overwrite)
    run = resolve(args.method, args.data, **overrides)
    trainer = build_trainer(run, probe=crash_probe_from_env())
    if args.resume:
        trainer.load()  # checked now, so a bad checkpoint fails before any step
    return trainer


def cmd_train(args) -> int:
    from pyssl import distributed

    device_type = (args.device or _default_device()).partition(":")[0]
    if args.nproc is not None:
        if distributed.launched_by_torchrun():
            raise CLIError("--nproc starts its own workers; under torchrun, leave it out")
        from pyssl.launch import spawn_workers

        nproc, args.nproc, args.device = args.nproc, None, device_type  # the workers train, not spawn
        return spawn_workers(cmd_train, args, nproc, device_type, _expected_errors())
    if distributed.launched_by_torchrun():
        try:
            args.device = str(distributed.init_from_env(device_type))
        except (RuntimeError, ValueError) as e:
            raise CLIError(str(e)) from None
    try:
        return _train(args, distributed.is_main_process())
    finally:
        distributed.shutdown()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _checkpoint_step(trainer) -> int | None:
    """The step of the run's checkpoint: the trainer's record of it or, where a Ctrl-C came after
    a first checkpoint's file was in place but before the trainer recorded it, the file's own
    (the run dir held no checkpoint when training started: a resume or --overwrite)."""
    from pyssl.train import CheckpointError, load_checkpoint

    if trainer.checkpoint_step is not None or not os.path.isfile(trainer.ckpt_path):
        return trainer.checkpoint_step
    try:
        return int(load_checkpoint(trainer.ckpt_path)["step"])
    except (CheckpointError, KeyError):
        return None


def _train(args, is_main: bool) -> int:
    from pyssl import distributed
    from pyssl.config import remove_run_reports, write_run_config

    trainer = prepare_training(args)
    cfg = trainer.cfg
    if is_main:
        ranks = f" x {trainer.world_size} processes" if trainer.world_size > 1 else ""
        print(
            f"pyssl train: {trainer.extra['method']} on {trainer.extra['data']} ({len(trainer.train_data)} images, "
            f"{trainer.train_data.image_size}px{', streamed from files' if trainer.streaming else ''}), {_count(cfg.epochs, 'epoch')} x "
            f"{_count(trainer.steps_per_epoch, 'step')} of {cfg.batch_size}, {cfg.optimizer} lr {cfg.lr:g}, "
            f"device {cfg.device}{ranks} -> {cfg.out_dir}",
            file=sys.stderr,
        )
        if args.resume:
            print(f"resuming from step {trainer.step} of {trainer.total_steps}", file=sys.stderr)
        if args.overwrite:  # the trainer removes the old run's checkpoint and logs; these describe it too
            remove_run_reports(cfg.out_dir)
        write_run_config(trainer.run, trainer, {"args": vars(args)})
    distributed.barrier()  # the run directory exists before any rank writes into it
    try:
        result = trainer.fit(resume=args.resume)
    except KeyboardInterrupt:
        raise Interrupted(cfg.out_dir, trainer.step, trainer.total_steps, _checkpoint_step(trainer)) from None
    if is_main:
        last = result.losses[-1] if result.losses else float("nan")
        knn = f", kNN accuracy {result.knn[-1][1] * 100:.2f}%" if result.knn else ""
        print(f"done: {result.steps} steps, last loss {last:.4f}{knn}; checkpoint {trainer.ckpt_path}", file=sys.stderr)
    return 0


# ---- eval ----------------------------------------------------------------------------------------


def cmd_eval(args) -> int:
    import torch

    from pyssl.config import load_run
    from pyssl.data import data_defaults, load_data
    from pyssl.eval import PROTOCOLS, evaluate_encoders, format_table, resolve_layer

    device = args.device or _default_device()
    protocols = tuple(p.strip() for p in args.protocols.split(",") if p.strip())
    if args.finetune and "finetune" not in protocols:
        protocols += ("finetune",)
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise CLIError(f"unknown protocol {bad[0] if bad else ''!r} (choose from {', '.join(PROTOCOLS)})")
    method, random_init, ckpt = load_run(args.run, device)
    extra = ckpt.get("extra", {})
    spec = args.data or extra.get("data", "digits")
    train, test = load_data(spec, extra.get("image_size"))
    from pyssl.train import data_device

    held_on = data_device("auto", torch.device(device), train.images.numel() + test.images.numel())
    train, test = train.to(held_on), test.to(held_on)
    if bool((train.labels < 0).all()) or bool((test.labels < 0).all()):
        raise CLIError(
            f"pyssl eval: {spec} has no labels, so there is nothing to probe; pass a labelled data "
            f"set with --data (e.g. --data colour_digits, or a captions file with a label column)"
        )
    k = args.k or data_defaults(spec.partition(":")[0].lower()).get("knn_k", 200)
    trained_name = f"{extra.get('method', 'trained')} encoder"
    encoders = {trained_name: method.backbone}
    if not args.no_baselines:
        encoders.update({"random-init encoder": random_init.backbone, "raw pixels": None})
    try:  # checked before any feature is extracted, so a typo costs nothing
        resolve_layer(method.backbone, args.layer)
    except ValueError as e:
        raise CLIError(f"--layer: {e}") from None
    where = f", features of {args.layer!r} pooled to {args.grid}x{args.grid}" if args.layer else ""
    print(
        f"pyssl eval: {spec}, {len(train)} train / {len(test)} test images, label fractions "
        f"{', '.join(f'{f:.0%}' for f in args.fractions)}{where}",
        file=sys.stderr,
    )
    results = evaluate_encoders(
        encoders,
        method.normalize,
        train,
        test,
        fractions=args.fractions,
        protocols=protocols,
        k=k,
        t=args.t,
        finetune_steps=args.finetune_steps,
        seed=args.seed,
        log=lambda s: print("  " + s, file=sys.stderr),
        layer=args.layer,
        grid=args.grid,
    )
    print(format_table(results, k=k, t=args.t))
    if hasattr(method, "zero_shot_classifier"):  # image-text methods: classes from prompts, no label used
        from pyssl.eval.zero_shot import zero_shot_comparison

        try:
            prompts, trained, untrained = zero_shot_comparison(method, random_init, test, spec)
        except ValueError as e:
            print(f"zero-shot classification skipped: {e}", file=sys.stderr)
        else:
            print(
                f"zero-shot accuracy (prompts such as {prompts[0][0]!r}, no labels): {trained * 100:.1f}% "
                f"(random init {untrained * 100:.1f}%, chance {100 / len(prompts):.1f}%)"
            )
            for name, acc in ((trained_name, trained), ("random-init encoder", untrained)):
                results.setdefault(name, {})["zero_shot"] = {0.0: acc}  # no label fraction: no label used
    run_dir = args.run if os.path.isdir(args.run) else os.path.dirname(args.run)
    with open(os.path.join(run_dir, "eval.json"), "w") as f:
        json.dump(
            {n: {p: {str(fr): a for fr, a in r.items()} for p, r in v.items()} for n, v in results.items()}, f, indent=1
        )
    return 0


# ---- plot ----------------------------------------------------------------------------------------


def cmd_plot(args) -> int:
    from pyssl.plot import plot_run

    written = plot_run(args.run, args.out, args.embedding, args.device)
    print(f"wrote {', '.join(written)}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        import pyssl  # noqa: F401  (the extension: fail here with its own message)

        return {"train": cmd_train, "eval": cmd_eval, "plot": cmd_plot}[args.command](args)
    except _expected_errors() as e:
        print(f"pyssl: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(_interrupted_message(e, argv), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("pyssl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
