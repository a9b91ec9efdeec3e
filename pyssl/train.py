"""A thin trainer for the self-supervised methods.

AMP, gradient clipping, SGD / LARS / AdamW, a per-step cosine schedule with linear warm-up,
checkpoints every N steps written atomically (temporary file, fsync, ``os.replace``) and an
exact resume: model (with the MoCo queue and the momentum encoder, which are buffers and
sub-modules of the method), optimiser, scheduler, AMP scaler, RNG states and the position inside
the epoch (the batch order of an epoch is fixed by the seed and the epoch number) are restored,
so a resumed run's losses equal an uninterrupted run's step for step.

Logs: ``metrics.csv`` (step, epoch, loss, lr, images/s), ``knn.csv`` (epoch, kNN accuracy),
TensorBoard events when tensorboard is installed, a tqdm progress bar when tqdm is installed.
A checkpoint is written only once the logs are on disk, and records their lengths; a resumed run
cuts them back to those, so a run killed at any instant resumes with each step logged once.

Data: an :class:`~pyssl.data.ImageDataset` held in memory (on the device or the host), or a
:class:`~pyssl.data.StreamingImageDataset` whose files DataLoader workers decode as they are
trained on; both give the same batches, so the step function and the exact resume are shared.

Data parallel (inside an initialised ``torch.distributed`` group, see :mod:`pyssl.distributed`):
each global batch of ``batch_size`` images is cut into one contiguous shard per rank; all ranks
start from rank 0's parameters and buffers, draw their own augmentations (seed offset by rank),
and average their gradients after each backward; only rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import csv
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch import Tensor, nn

from pyssl import distributed
from pyssl.data import ImageDataset, StreamingImageDataset, batches
from pyssl.data.streaming import MAX_BAD_FILES
from pyssl.run_log import LOGS, CsvLog, CsvRunLog, ProgressRunLog, RunLog, RunLogs, StepRecord, TensorBoardRunLog

CHECKPOINT_NAME = "checkpoint.pt"
TEMPORARY_SUFFIX = ".tmp-"

#: Crash tests: the instants of a checkpoint at which a probe is called (see ``Trainer``), in order.
CHECKPOINT_INSTANTS = (
    "checkpoint-start",
    "logs-synced",
    "checkpoint-written",
    "checkpoint-replaced",
    "checkpoint-done",
)


class ConfigError(ValueError):
    """Training cannot start with this configuration (raised before any step runs)."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or from an incompatible run."""


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256
    optimizer: str = "sgd"  # sgd | lars | adamw
    lr: float = 0.12
    weight_decay: float = 5e-4
    momentum: float = 0.9  # SGD/LARS momentum; AdamW's beta1
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    clip_grad: float | None = None  # max global gradient norm
    amp: bool = False  # float16 autocast + loss scaling on CUDA, bfloat16 autocast on CPU
    device: str = "cpu"
    seed: int = 0
    out_dir: str = "runs/pyssl"
    checkpoint_every: int = 0  # steps; 0 = at the end of each epoch only
    log_every: int = 10
    knn_every: int = 0  # epochs; 0 = never (needs a test set)
    knn_k: int = 200
    knn_t: float = 0.1
    tensorboard: bool = True
    progress: bool = True
    # SyncBatchNorm across ranks; None: on when distributed on CUDA (NCCL only: not on the CPU),
    # unless the method opts out (see use_sync_bn).
    sync_bn: bool | None = None
    # Where the data set lives: "device" (batches never leave the GPU), "cpu" (host memory, each
    # batch copied over; for data sets larger than the GPU's memory) or "auto" (see data_device).
    data_on: str = "auto"
    # Image files decoded as they are trained on (pyssl.data.streaming) rather than all up front:
    # None streams a folder or list whose decoded size exceeds the memory budget; True/False force
    # it. Read where the data is loaded (pyssl.config.resolve); the trainer streams whatever
    # StreamingImageDataset it is given.
    stream: bool | None = None
    data_workers: int | None = None  # streaming: DataLoader worker processes (None: one a core, at most 8)
    max_bad_files: float = MAX_BAD_FILES  # streaming: share of the files that may fail to decode (skipped, warned)

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ConfigError(f"batch size must be >= 2, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ConfigError(f"warm-up epochs must lie in [0, epochs], got {self.warmup_epochs}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError(f"clip_grad must be > 0, got {self.clip_grad}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        try:
            dev = torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"bad device {self.device!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device} requested but CUDA is not available")
        ranks = distributed.world_size()
        if self.batch_size % ranks:
            raise ConfigError(
                f"batch size {self.batch_size} must be divisible by the number of processes "
                f"({ranks}): each process trains on an equal shard of every batch"
            )
        if self.data_on not in ("auto", "device", "cpu"):
            raise ConfigError(f"data_on must be auto, device or cpu, got {self.data_on!r}")
        if self.stream not in (None, True, False):
            raise ConfigError(f"stream must be True, False or None (choose by size), got {self.stream!r}")
        if self.data_workers is not None and (not isinstance(self.data_workers, int) or self.data_workers < 0):
            raise ConfigError(
                f"data_workers must be an integer >= 0 (0: decode in the training process), got {self.data_workers!r}"
            )
        if not (isinstance(self.max_bad_files, (int, float)) and 0 <= self.max_bad_files <= 1):
            raise ConfigError(f"max_bad_files must be a share of the files in [0, 1], got {self.max_bad_files!r}")
        if self.sync_bn and dev.type != "cuda":
            raise ConfigError(f"sync_bn needs CUDA devices (SyncBatchNorm does not run on {dev.type})")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---- optimisers ----------------------------------------------------------------------------------


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017), as in SimCLR:
    each weight's update is scaled by ``eta * ||w|| / ||g + wd * w||``.  Groups with
    ``lars_exclude=True`` (biases, norm layers) get plain SGD without weight decay."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["lars_exclude"]:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm)
                    )
                    g = g.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def _param_groups(model: nn.Module, weight_decay: float, lars: bool):
    """Biases and normalisation parameters get no weight decay (and no LARS adaptation)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    extra = {"lars_exclude": True} if lars else {}
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0, **extra}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(_param_groups(model, cfg.weight_decay, False), lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "lars":
        return LARS(_param_groups(model, cfg.weight_decay, True), lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(_param_groups(model, cfg.weight_decay, False), lr=cfg.lr, betas=(cfg.momentum, 0.999))


OPTIMIZERS = ("sgd", "lars", "adamw")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate factor: linear warm-up from ~0 to 1, then cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---- checkpoints ---------------------------------------------------------------------------------


def save_atomic(obj, path: str, probe: Callable[[str], None] | None = None) -> None:
    """Writes ``obj`` to ``path`` so that ``path`` is always either the previous complete file
    or the new complete file: write a temporary file beside it, fsync, then ``os.replace``.
    ``probe`` (crash tests) is called with ``"checkpoint-written"`` once the temporary file is
    complete and with ``"checkpoint-replaced"`` right after the rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}{TEMPORARY_SUFFIX}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if probe is not None:
            probe("checkpoint-written")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if probe is not None:
        probe("checkpoint-replaced")
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Makes a rename inside ``directory`` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def remove_stale_temporaries(path: str) -> None:
    """Removes the temporary files of :func:`save_atomic` calls that a kill interrupted."""
    directory, name = os.path.split(os.path.abspath(path))
    if os.path.isdir(directory):
        for entry in os.listdir(directory):
            if entry.startswith(name + TEMPORARY_SUFFIX):
                os.remove(os.path.join(directory, entry))


def load_checkpoint(path: str) -> dict:
    """Loads a checkpoint written by :func:`save_atomic`; raises :class:`CheckpointError` with a
    one-line reason if it is missing or unreadable (never returns a partial state)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"corrupt checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "pyssl-checkpoint-1":
        raise CheckpointError(f"{path} is not a pyssl checkpoint")
    return ckpt


def _rng_state() -> dict:
    st = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": list(random.getstate()[1]) + [random.getstate()[2] if random.getstate()[2] is not None else -1],
        "numpy": [torch.from_numpy(st[1].astype(np.int64)), int(st[2]), int(st[3]), float(st[4])],
    }


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    py = s["python"]
    random.setstate((3, tuple(py[:-1]), None if py[-1] == -1 else py[-1]))
    arr, pos, has_gauss, cached = s["numpy"]
    np.random.set_state(("MT19937", arr.numpy().astype(np.uint32), pos, has_gauss, cached))


# ---- logs ----------------------------------------------------------------------------------------


def _parse_row(line: str, width: int) -> list[str] | None:
    """A log row's fields, or None unless the line is ``width`` numbers, the first two integers."""
    fields = next(csv.reader([line.rstrip("\r\n")]), [])
    if len(fields) != width:
        return None
    try:
        int(fields[0]), int(fields[1])
        [float(v) for v in fields[2:]]
    except ValueError:
        return None
    return fields


def read_log(path: str, header: list[str]) -> tuple[list[dict], list[str]]:
    """The rows of a CSV log that parse (dicts keyed by ``header``) and what is wrong with the
    rest (a missing header, torn or garbled lines), for readers that show what is there."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines(keepends=True)
    problems = []
    if lines and lines[0].rstrip("\r\n") == ",".join(header):
        lines = lines[1:]
    elif lines:
        problems.append("no header line")
    rows = []
    for line in lines:
        fields = _parse_row(line, len(header))
        if fields is None:
            problems.append(f"a line that does not parse: {line.strip()[:60]!r}")
        else:
            rows.append(dict(zip(header, fields)))
    return rows, problems


def _steps(steps: list[int]) -> str:
    """[1, 2, 3, 7] -> "steps 1-3, 7 are", [4] -> "step 4 is"."""
    out, start = [], None
    for i, s in enumerate(steps):
        if start is None:
            start = s
        if i + 1 == len(steps) or steps[i + 1] != s + 1:
            out.append(str(start) if start == s else f"{start}-{s}")
            start = None
    return f"step {out[0]} is" if len(steps) == 1 else f"steps {', '.join(out)} are"


def repair_log(path: str, header: list[str], step: int, length: int | None, every_step: bool) -> list[str]:
    """Makes the log at ``path`` hold exactly its rows of the first ``step`` steps, as the
    checkpoint of ``step`` found it, and returns what it repaired beyond that (empty: nothing).

    ``length``: the log's length when the checkpoint was written (None in checkpoints from before
    it was recorded: then rows are kept by their step). Rows written after the checkpoint are
    dropped; a missing header and a line torn by a kill are repaired. A log shorter than at the
    checkpoint, lacking rows of its steps (``every_step``: the log has a row for every step) or
    with lines that do not parse among them raises :class:`CheckpointError` and is left as it is.
    """
    name = os.path.basename(path)

    def damaged(reason: str) -> CheckpointError:
        return CheckpointError(
            f"cannot resume from step {step}: {path} does not match the checkpoint ({reason}); "
            f"move {name} aside to resume with a new log from step {step + 1}"
        )

    with open(path, "rb") as f:
        original = f.read()
    if length is not None and len(original) < length:
        raise damaged(f"it is shorter than at the checkpoint: {len(original)} bytes, not {length}")
    lines = original[:length].decode("utf-8", errors="replace").splitlines(keepends=True)
    repairs = []
    if lines and lines[0].rstrip("\r\n") == ",".join(header):
        lines = lines[1:]
    elif lines:
        repairs.append("added the missing header line")
    kept = []
    for number, line in enumerate(lines, start=1):
        fields = _parse_row(line, len(header)) if line.endswith("\n") else None
        if fields is None:
            if length is None and number == len(lines):
                repairs.append(f"dropped a torn last line {line.strip()[:60]!r}")
                continue
            raise damaged(f"a line that does not parse: {line.strip()[:60]!r}")
        if int(fields[0]) <= step:
            kept.append((int(fields[0]), line))
    if every_step:
        steps = [s for s, _ in kept]
        if steps != list(range(1, step + 1)):
            missing = sorted(set(range(1, step + 1)) - set(steps))
            repeated = sorted({s for s in steps if steps.count(s) > 1})
            reasons = [
                f"{_steps(missing)} missing" if missing else "",
                f"{_steps(repeated)} logged more than once" if repeated else "",
            ]
            raise damaged("; ".join(r for r in reasons if r) or "its steps are out of order")
    content = (",".join(header) + "\r\n" + "".join(line for _, line in kept)).encode()
    if content != original:
        tmp = f"{path}{TEMPORARY_SUFFIX}{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(os.path.dirname(os.path.abspath(path)))
    return [f"{name}: {r}" for r in repairs]


# ---- the trainer ---------------------------------------------------------------------------------


def use_sync_bn(requested: bool | None, method: nn.Module, world_size: int, device_type: str) -> bool:
    """Whether the trainer converts the method's BatchNorm layers to SyncBatchNorm.

    ``requested`` (``TrainConfig.sync_bn``) wins when set. Unset: on when distributed on CUDA,
    unless the method's ``sync_bn_by_default`` attribute is False: MoCo with Shuffle-BN sets it
    so, since its shuffle only works while each rank normalises its own shard.
    """
    if requested is not None:
        return bool(requested)
    return world_size > 1 and device_type == "cuda" and bool(getattr(method, "sync_bn_by_default", True))


#: A CPU run whose first steps predict at least this many more seconds gets a warning.
SLOW_RUN_WARNING_S = 3600.0

#: "auto" keeps the data set on the GPU while it takes at most this share of the free memory.
DATA_ON_DEVICE_SHARE = 0.4


def data_device(data_on: str, device: torch.device, nbytes: int, free_bytes: int | None = None) -> torch.device:
    """Where the trainer holds the data set (``TrainConfig.data_on``): on the training device, or
    on the CPU, whence each batch is copied. ``"auto"``: on the device while ``nbytes`` is at most
    ``DATA_ON_DEVICE_SHARE`` of its free memory (``free_bytes``, else asked of CUDA), leaving the
    rest to the model and its activations."""
    if device.type != "cuda" or data_on == "device":
        return device
    if data_on == "cpu":
        return torch.device("cpu")
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    return device if nbytes <= DATA_ON_DEVICE_SHARE * free_bytes else torch.device("cpu")


def crash_probe_from_env():
    """Crash tests: ``PYSSL_CRASH_AT=INSTANT:STEP`` makes the process SIGKILL itself at that
    instant of training (``step``, after the step, or one of ``pyssl.train.CHECKPOINT_INSTANTS``
    of the checkpoint at that step); ``PYSSL_CRASH_AT_STEP=N`` is ``step:N``."""
    spec = os.environ.get("PYSSL_CRASH_AT") or (
        f"step:{os.environ['PYSSL_CRASH_AT_STEP']}" if os.environ.get("PYSSL_CRASH_AT_STEP") else ""
    )
    if not spec:
        return None
    instant, _, at = spec.rpartition(":")
    if instant not in ("step", *CHECKPOINT_INSTANTS) or not at.isdigit():
        raise ConfigError(
            f"PYSSL_CRASH_AT must be INSTANT:STEP with INSTANT one of step, "
            f"{', '.join(CHECKPOINT_INSTANTS)}; got {spec!r}"
        )

    def probe(now: str, step: int) -> None:
        if now == instant and step >= int(at):
            os.kill(os.getpid(), signal.SIGKILL)

    return probe


class StopTraining(Exception):
    """Raised by a step callback to end training at once (no final checkpoint), like a kill."""


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # this session's losses, one per step
    # the metrics of the method's StepOutput (loss among them) at the last step read back
    metrics: dict[str, float] = field(default_factory=dict)
    knn: list[tuple[int, float]] = field(default_factory=list)
    stopped: bool = False


@dataclass
class _Pace:
    """The steps of a fit not yet read back from the device, and its throughput."""

    start_step: int
    pending: list = field(default_factory=list)  # (step, epoch, loss tensor, lr)
    metrics: dict = field(default_factory=dict)  # the last step's, as tensors
    images: int = 0  # trained since the last read-back
    images_per_s: float = 0.0
    since: float = field(default_factory=time.perf_counter)
    started: float = field(default_factory=time.perf_counter)
    timed: bool = False


class Trainer:
    """Trains ``method`` on ``train`` (an :class:`ImageDataset`, or a
    :class:`~pyssl.data.StreamingImageDataset` of files decoded as they are trained on; labels
    unused) per ``config``.

    ``callbacks``: functions ``f(trainer, step, loss)`` called after every optimiser step
    (``step`` counts completed steps); raising :class:`StopTraining` ends the run abruptly.
    ``method_spec``: ``{"name": ..., "cfg": {...}}`` stored in checkpoints so that ``pyssl eval``
    can rebuild the method; ``extra``: any more JSON-like info to store (data spec ...).
    ``logs``: more :class:`pyssl.run_log.RunLog` s beside the CSV logs, TensorBoard and the
    progress display (rank 0 only), e.g. an adapter to an experiment tracker.
    ``probe`` (crash tests): a function ``f(instant, step)`` called after every step
    (``"step"``) and at each of the ``CHECKPOINT_INSTANTS`` of every checkpoint, so that a test
    can kill the process at an exact instant; unlike a callback it changes nothing else.
    """

    def __init__(
        self,
        method: nn.Module,
        train: ImageDataset,
        config: TrainConfig,
        test: ImageDataset | None = None,
        callbacks: list[Callable] | None = None,
        method_spec: dict | None = None,
        extra: dict | None = None,
        probe: Callable[[str, int], None] | None = None,
        logs: list[RunLog] | None = None,
    ):
        config.validate()
        if config.batch_size > len(train):
            raise ConfigError(f"batch size {config.batch_size} is larger than the data set ({len(train)} images)")
        self.cfg, self.method, self.callbacks = config, method, list(callbacks or [])
        self.method_spec = method_spec or getattr(method, "build_spec", None) or {}
        self.extra = extra or {}
        self.device = torch.device(config.device)
        # A StreamingImageDataset stays where it is: files, decoded batch by batch (_epoch_batches).
        self.streaming = isinstance(train, StreamingImageDataset)
        nbytes = sum(d.images.numel() for d in (train, test) if isinstance(d, ImageDataset))
        self.data_device = data_device(config.data_on, self.device, nbytes)
        self.train_data = train if self.streaming else train.to(self.data_device)
        self.test_data = test.to(self.data_device) if isinstance(test, ImageDataset) else test
        self.steps_per_epoch = len(train) // config.batch_size
        self.total_steps = self.steps_per_epoch * config.epochs
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        self.sync_bn = use_sync_bn(config.sync_bn, method, self.world_size, self.device.type)
        if self.sync_bn and self.world_size > 1:
            # In place below the root (a method is never a BatchNorm itself).
            nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
        self.method.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest convolutions once
        self.optimizer = build_optimizer(self.method, config)
        warmup = round(config.warmup_epochs * self.steps_per_epoch)
        ratio = config.min_lr / config.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, self.total_steps, warmup, ratio)
        )
        use_cuda_amp = config.amp and self.device.type == "cuda"
        self.amp_dtype = torch.float16 if use_cuda_amp else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_cuda_amp)
        self.step = 0
        self.ckpt_path = os.path.join(config.out_dir, CHECKPOINT_NAME)
        self._loaded_from: str | None = None
        self.probe = probe
        self.checkpoint_step: int | None = None  # of the last checkpoint written or loaded
        self.logs = RunLogs()  # open while fit runs (rank 0: CSV, TensorBoard, progress, and `logs`)
        self.extra_logs = list(logs or [])
        self._pace: _Pace | None = None
        self.run = None  # the pyssl.config.RunConfig it was built from, if any

    # -- state --

    def state_dict(self) -> dict:
        """The checkpoint's content. Distributed, a collective: every rank must call it."""
        state = {
            "format": "pyssl-checkpoint-1",
            "method": self.method_spec,
            "model": self.method.state_dict(),
            "backbone": self.method.backbone.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            # each rank draws its own augmentations: an exact resume needs every rank's RNG
            # (one process: a list of one)
            "rng_per_rank": distributed.all_gather_objects(_rng_state()),
            "config": asdict(self.cfg),
            "extra": self.extra,
        }
        if self.world_size > 1:
            # lets anyone check (e.g. the tests) that the ranks trained in lockstep; a SHA-1 over
            # every parameter, so only where there are ranks to compare
            state["parameter_digest_per_rank"] = distributed.all_gather_objects(
                distributed.parameter_digest(self.method)
            )
        return state

    def _probe(self, instant: str) -> None:
        if self.probe is not None:
            self.probe(instant, self.step)

    def save(self) -> str:
        """Writes the checkpoint (rank 0). Distributed: every rank must call it (the RNG states
        are gathered), and returns once the file is complete.

        The logs are made durable first and their lengths recorded in the checkpoint: whenever a
        run is killed, the logs hold at least the rows of the checkpoint's steps, and resume cuts
        them back to exactly those."""
        self._probe("checkpoint-start")
        log_lengths = self.logs.sync()
        self._probe("logs-synced")
        state = self.state_dict()
        if log_lengths:
            state["log_lengths"] = log_lengths
        if self.is_main:
            save_atomic(state, self.ckpt_path, probe=self._probe)
        distributed.barrier()
        self.checkpoint_step = self.step
        self._probe("checkpoint-done")
        return self.ckpt_path

    def _differences(self, ckpt: dict) -> list[str]:
        """What makes the run of ``ckpt`` another run than this trainer's, as "KEY X there, Y here"."""
        found, wanted = [], []
        old_spec, spec = ckpt.get("method") or {}, self.method_spec
        if "name" in old_spec and "name" in spec:
            found.append(("method", old_spec["name"], spec["name"]))
            old_cfg, cfg = old_spec.get("cfg", {}), spec.get("cfg", {})
            found += [
                (k, old_cfg.get(k), cfg.get(k)) for k in sorted(set(old_cfg) | set(cfg)) if k not in ("mean", "std")
            ]
        old_data, data = (ckpt.get("extra") or {}).get("data"), self.extra.get("data")
        if old_data is not None and data is not None:  # the kind: a data set may have moved since
            found.append(("data", old_data.partition(":")[0], data.partition(":")[0]))
        found += [(k, ckpt["config"].get(k), getattr(self.cfg, k)) for k in ("batch_size", "seed", "epochs")]
        for key, there, here in found:
            if there != here:
                wanted.append(
                    f"{key} {there if there is not None else '(unset)'} there, "
                    f"{here if here is not None else '(unset)'} here"
                )
        return wanted

    def _describe(self, ckpt: dict) -> str:
        name = (ckpt.get("method") or {}).get("name", "a")
        data = (ckpt.get("extra") or {}).get("data")
        return f"{name} run{f' on {data}' if data else ''} at step {ckpt['step']}"

    def load(self, path: str | None = None) -> None:
        path = path or self.ckpt_path
        ckpt = load_checkpoint(path)
        differences = self._differences(ckpt)
        if differences:
            raise CheckpointError(
                f"cannot resume {path}: it holds a {self._describe(ckpt)}, which differs from this "
                f"one: {'; '.join(differences)}"
            )
        try:
            self.method.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(
                f"cannot resume {path}: it belongs to another model ({str(e).splitlines()[0][:200]})"
            ) from None
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        per_rank = ckpt.get("rng_per_rank") or [ckpt["rng"]]  # "rng": checkpoints from before rng_per_rank
        if len(per_rank) == self.world_size:
            _set_rng_state(per_rank[self.rank])
        else:  # another number of processes: the shards differ anyway, so no exact resume
            self._seed_rngs(self.cfg.seed + 7919 * self.step)
        if self.is_main:
            self._repair_logs(ckpt.get("log_lengths"))
        self._loaded_from, self.checkpoint_step = path, self.step

    # -- logs --

    def _repair_logs(self, lengths: dict | None) -> None:
        """Cuts the logs back to the checkpoint a resumed run starts from (see :func:`repair_log`)."""
        remove_stale_temporaries(self.ckpt_path)
        for name, header in LOGS.items():
            path = os.path.join(self.cfg.out_dir, name)
            remove_stale_temporaries(path)
            if not os.path.exists(path):
                if name == "metrics.csv" and self.step:
                    print(f"note: {path} is missing; a new log starts at step {self.step + 1}", file=sys.stderr)
                continue
            length = (lengths or {}).get(name)
            for repair in repair_log(path, header, self.step, length, every_step=name == "metrics.csv"):
                print(f"note: repaired {repair}", file=sys.stderr)

    def _remove_previous_run(self) -> None:
        """A fresh run in a used directory: the previous run's checkpoint, logs and TensorBoard
        events go, so that none of them is mistaken for this run's."""
        remove_stale_temporaries(self.ckpt_path)
        for name in (CHECKPOINT_NAME, *LOGS):
            path = os.path.join(self.cfg.out_dir, name)
            if os.path.exists(path):
                os.remove(path)
        tb = os.path.join(self.cfg.out_dir, "tb")
        if os.path.isdir(tb):
            for entry in os.listdir(tb):
                if entry.startswith("events.out.tfevents."):
                    os.remove(os.path.join(tb, entry))

    # -- training --

    def _seed_rngs(self, seed: int) -> None:
        seed += self.rank  # ranks share the parameters (broadcast), not the augmentations
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)

    def fit(self, resume: bool = False) -> TrainResult:
        self._begin(resume)
        result = TrainResult(steps=self.step)
        self.logs = self._open_logs()
        self.method.train()
        self._pace = _Pace(self.step)
        try:
            while self.step < self.total_steps:
                self._train_epoch(result)
                self._end_epoch(result)
        except StopTraining:
            result.stopped = True
        finally:
            self.logs.close()
            self.logs = RunLogs()
        result.steps = self.step
        return result

    def _begin(self, resume: bool) -> None:
        """Continues from the checkpoint (``resume``, or one already loaded) or starts afresh, and
        gives every rank rank 0's parameters."""
        if self.is_main:
            os.makedirs(self.cfg.out_dir, exist_ok=True)
        if resume and self._loaded_from is None and os.path.exists(self.ckpt_path):
            self.load()
        elif self._loaded_from is None:  # a fresh run (resume without a checkpoint starts one too)
            self._seed_rngs(self.cfg.seed)
            if self.is_main:
                self._remove_previous_run()
        distributed.broadcast_module(self.method)

    def _open_logs(self) -> RunLogs:
        if not self.is_main:
            return RunLogs()
        cfg = self.cfg
        return RunLogs(
            [
                CsvRunLog(cfg.out_dir),
                TensorBoardRunLog.open(cfg.out_dir, self.step) if cfg.tensorboard else None,
                ProgressRunLog(self.total_steps, self.step, cfg.progress),
                *self.extra_logs,
            ]
        )

    def _batch(self, index: Tensor):
        """This rank's shard of the batch of data-set rows ``index``, on the training device."""
        shard = self.cfg.batch_size // self.world_size
        # On the host, a batch is gathered there and copied over: uint8 images make that copy a
        # few milliseconds, small beside a training step.
        rows = index[self.rank * shard : (self.rank + 1) * shard].to(self.data_device)
        batch = self.train_data.images[rows].to(self.device)
        if self.train_data.texts is not None:  # image-text data (CLIP) trains on (images, captions) pairs
            batch = (batch, self.train_data.texts[rows].to(self.device))
        return batch

    def _epoch_batches(self, epoch: int, first: int):
        """This rank's batches of epoch ``epoch`` from its batch ``first`` on, on the training
        device: gathered from the data set in memory, or decoded from files by the streaming data
        set's DataLoader workers. Either way the batches of ``batches(n, batch_size, epoch, seed)``."""
        cfg = self.cfg
        if self.streaming:
            return self.train_data.epoch_batches(
                cfg.batch_size,
                epoch,
                cfg.seed,
                first,
                self.rank,
                self.world_size,
                device=self.device,
                workers=cfg.data_workers,
                max_bad_files=cfg.max_bad_files,
            )
        return (self._batch(index) for index in batches(len(self.train_data), cfg.batch_size, epoch, cfg.seed)[first:])

    def _train_epoch(self, result: TrainResult) -> None:
        """The rest of the current epoch, step by step."""
        cfg, pace = self.cfg, self._pace
        epoch, first = divmod(self.step, self.steps_per_epoch)
        for batch in self._epoch_batches(epoch, first):
            loss, metrics = self._train_step(batch)
            self.step += 1
            pace.pending.append((self.step, epoch, loss.detach(), self.optimizer.param_groups[0]["lr"]))
            pace.metrics = metrics
            pace.images += cfg.batch_size
            checkpoint_due = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
            if (
                len(pace.pending) >= cfg.log_every
                or self.step % self.steps_per_epoch == 0
                or self.callbacks
                or checkpoint_due
            ):
                self._read_back(result)
            if checkpoint_due:
                self.save()
            for cb in self.callbacks:
                cb(self, self.step, result.losses[-1])
            self._probe("step")
            if not pace.timed:
                pace.timed = not self.is_main or self.device.type != "cpu" or self._warn_if_slow(pace)

    def _read_back(self, result: TrainResult) -> None:
        """The pending steps' losses and the last step's metrics, in one copy to the host: the
        only point where the loop waits for the device. A non-finite loss stops the run."""
        pace = self._pace
        now = time.perf_counter()
        pace.images_per_s = pace.images / max(now - pace.since, 1e-9)
        pace.since, pace.images = now, 0
        losses = [p[2].float() for p in pace.pending]
        names = [n for n in pace.metrics if n != "loss"]
        device = losses[-1].device
        host = torch.stack(losses + [pace.metrics[n].to(device).float().reshape(()) for n in names]).cpu()
        values = host[: len(losses)].tolist()
        records = []
        for (step, epoch, _, lr), value in zip(pace.pending, values):
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at step {step}; lower the learning rate or disable AMP")
            records.append(StepRecord(step, epoch, value, lr))
        result.losses += values
        result.metrics = {"loss": values[-1], **dict(zip(names, host[len(losses) :].tolist()))}
        self.logs.steps(records, pace.images_per_s, result.metrics)
        pace.pending = []

    def _end_epoch(self, result: TrainResult) -> None:
        """The epoch line, the kNN monitor when it is due, and the end-of-epoch checkpoint."""
        cfg = self.cfg
        epoch_done = self.step // self.steps_per_epoch
        if result.losses:
            lr = self.optimizer.param_groups[0]["lr"]
            self.logs.epoch_end(epoch_done, cfg.epochs, self.step, result.losses[-1], lr, self._pace.images_per_s)
        if (
            self.is_main
            and cfg.knn_every
            and self.test_data is not None
            and (epoch_done % cfg.knn_every == 0 or self.step == self.total_steps)
        ):
            acc = self.knn_accuracy()
            result.knn.append((epoch_done, acc))
            self.logs.knn(self.step, epoch_done, acc)
            self.logs.message(f"epoch {epoch_done}: kNN accuracy {acc * 100:.2f}%")
        self.save()

    def _warn_if_slow(self, pace: _Pace) -> bool:
        """Once the first steps are timed, warns if the rest of the run would take hours on the
        CPU (a large model, as the defaults of real data sets are, runs at a few images/s there).
        Returns whether the first steps are timed."""
        elapsed, steps = time.perf_counter() - pace.started, self.step - pace.start_step
        if elapsed < 5 and steps < 5:
            return False
        remaining = elapsed / steps * (self.total_steps - self.step)
        if remaining >= SLOW_RUN_WARNING_S:
            self.logs.message(
                f"warning: at {steps * self.cfg.batch_size / elapsed:.1f} images/s the rest of this run takes "
                f"about {remaining / 3600:.1f} hours on the CPU; a GPU, a smaller backbone or image size, or "
                f"fewer epochs would shorten it"
            )
        return True

    def _train_step(self, batch: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        self.method.set_progress(self.step, self.total_steps)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.cfg.amp):
            out = self.method.training_step(batch)
        # A pyssl Method returns a StepOutput; any module whose training_step returns the loss works too.
        loss, metrics = (out, {}) if isinstance(out, Tensor) else (out.loss, out.metrics)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        # Before clipping: the norm to clip is the averaged gradient's, the same on every rank.
        distributed.all_reduce_gradients(self.method.parameters())
        if self.cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.method.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        # every rank logs (and checks for NaN) the same loss, so all stop together; the other
        # metrics are the rank's own
        return distributed.mean_over_ranks(loss), metrics

    @torch.no_grad()
    def knn_accuracy(self) -> float:
        from pyssl.eval import extract_features, knn_predict

        was = self.method.training
        self.method.eval()
        try:
            tr, tr_labels = self._features(self.train_data, extract_features)
            te, te_labels = self._features(self.test_data, extract_features)
            pred = knn_predict(
                tr,
                tr_labels.to(tr.device),
                te,
                k=self.cfg.knn_k,
                t=self.cfg.knn_t,
                num_classes=self.train_data.num_classes,
            )
            return (pred == te_labels.to(pred.device)).float().mean().item()
        finally:
            self.method.train(was)

    def _features(self, data, extract_features) -> tuple[Tensor, Tensor]:
        """(features, labels) of every image of ``data``; a streamed data set is decoded batch by
        batch (its order, with any undecodable file replaced as in training)."""
        if isinstance(data, ImageDataset):
            return extract_features(self.method.backbone, data.images, self.method.normalize), data.labels
        features, labels = [], []
        for batch in data.sequential_batches(device=self.device, workers=self.cfg.data_workers):
            features.append(extract_features(self.method.backbone, batch.images, self.method.normalize))
            labels.append(batch.labels)
        return torch.cat(features), torch.cat(labels)


__all__ = [
    "TrainConfig",
    "Trainer",
    "TrainResult",
    "LARS",
    "ConfigError",
    "CheckpointError",
    "StopTraining",
    "save_atomic",
    "load_checkpoint",
    "remove_stale_temporaries",
    "CsvLog",
    "read_log",
    "repair_log",
    "build_optimizer",
    "warmup_cosine",
    "use_sync_bn",
    "data_device",
    "CHECKPOINT_NAME",
    "LOGS",
    "CHECKPOINT_INSTANTS",
    "crash_probe_from_env",
]
