"""What a training run reports, behind one interface: the CSV logs, TensorBoard and the progress
display are each a :class:`RunLog`, and the trainer talks to all of them through :class:`RunLogs`.

The trainer reads its losses and metrics back from the device every few steps, in one copy; the
logs then get those steps at once (:meth:`RunLog.steps`). Before a checkpoint is written the logs
are made durable (:meth:`RunLog.sync`), and the CSV logs' lengths go into the checkpoint, so a
resumed run can cut them back to it.
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass

#: The CSV logs of a run and their columns. Every step has one row in metrics.csv; knn.csv has
#: one row per kNN evaluation.
LOGS = {"metrics.csv": ["step", "epoch", "loss", "lr", "images_per_s"], "knn.csv": ["step", "epoch", "knn_accuracy"]}


@dataclass(frozen=True)
class StepRecord:
    """One optimiser step as the logs see it, once its loss is back on the host."""

    step: int  # completed steps, 1-based
    epoch: int  # 0-based
    loss: float
    lr: float


class RunLog:
    """The interface (every method a no-op by default)."""

    def steps(self, records: list[StepRecord], images_per_s: float, metrics: dict[str, float]) -> None:
        """Steps read back; ``metrics``: the last step's (its loss among them)."""

    def epoch_end(self, epoch: int, epochs: int, step: int, loss: float, lr: float, images_per_s: float) -> None:
        """``epoch`` (1-based) of ``epochs`` is complete."""

    def knn(self, step: int, epoch: int, accuracy: float) -> None:
        """A kNN evaluation after ``epoch`` (1-based) epochs."""

    def message(self, text: str) -> bool:
        """Shows a line to the user; whether this log showed it."""
        return False

    def sync(self) -> dict[str, int]:
        """Makes everything logged so far durable; the lengths of files a resume cuts back to."""
        return {}

    def close(self) -> None:
        pass


class CsvLog:
    """An append-only CSV log. Rows are buffered; :meth:`sync` makes every row written so far
    durable and returns the file's length, which the checkpoint records: on resume the log is cut
    back to that length, so that it holds each step up to the checkpoint exactly once."""

    def __init__(self, path: str, header: list[str]):
        fresh = not os.path.exists(path) or os.path.getsize(path) == 0
        self.file = open(path, "a", newline="")
        self.writer = csv.writer(self.file)
        if fresh:
            self.writer.writerow(header)

    def write(self, row: list) -> None:
        self.writer.writerow(row)

    def sync(self) -> int:
        self.file.flush()
        os.fsync(self.file.fileno())
        return os.fstat(self.file.fileno()).st_size

    def close(self) -> None:
        self.file.close()


class CsvRunLog(RunLog):
    """``metrics.csv`` (a row per step) and ``knn.csv`` (a row per kNN evaluation) in ``out_dir``."""

    def __init__(self, out_dir: str):
        self.files = {name: CsvLog(os.path.join(out_dir, name), header) for name, header in LOGS.items()}

    def steps(self, records, images_per_s, metrics):
        for r in records:
            self.files["metrics.csv"].write([r.step, r.epoch, repr(r.loss), f"{r.lr:.6g}", f"{images_per_s:.1f}"])

    def knn(self, step, epoch, accuracy):
        self.files["knn.csv"].write([step, epoch, f"{accuracy:.6f}"])

    def sync(self):
        return {name: log.sync() for name, log in self.files.items()}

    def close(self):
        for log in self.files.values():
            log.close()


class TensorBoardRunLog(RunLog):
    """TensorBoard events under ``out_dir/tb``: loss and learning rate per step, throughput and
    the method's other metrics per read-back, kNN accuracy per evaluation."""

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, out_dir: str, step: int) -> TensorBoardRunLog | None:
        """None where tensorboard is not installed."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:
            return None
        return cls(SummaryWriter(os.path.join(out_dir, "tb"), purge_step=step or None))

    def steps(self, records, images_per_s, metrics):
        for r in records:
            self.writer.add_scalar("train/loss", r.loss, r.step)
            self.writer.add_scalar("train/lr", r.lr, r.step)
        last = records[-1].step
        self.writer.add_scalar("train/images_per_s", images_per_s, last)
        for name, value in metrics.items():
            if name != "loss":
                self.writer.add_scalar(f"train/{name}", value, last)

    def knn(self, step, epoch, accuracy):
        self.writer.add_scalar("eval/knn_accuracy", accuracy, step)

    def close(self):
        self.writer.close()


class ProgressRunLog(RunLog):
    """A tqdm bar on a terminal; elsewhere (or without tqdm) one line per epoch. Messages (kNN
    results, warnings) are shown either way; ``enabled=False`` leaves out the bar and the epoch
    lines only."""

    def __init__(self, total_steps: int, step: int, enabled: bool):
        self.enabled, self.bar = enabled, None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def steps(self, records, images_per_s, metrics):
        if self.bar is not None:
            self.bar.update(len(records))
            self.bar.set_postfix(
                loss=f"{records[-1].loss:.4f}", img_s=f"{images_per_s:.0f}", epoch=records[-1].epoch + 1
            )

    def epoch_end(self, epoch, epochs, step, loss, lr, images_per_s):
        if self.bar is None and self.enabled:
            print(
                f"epoch {epoch}/{epochs}: step {step}, loss {loss:.4f}, lr {lr:.4g}, {images_per_s:.0f} images/s",
                file=sys.stderr,
                flush=True,
            )

    def message(self, text):
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)
        return True

    def close(self):
        if self.bar is not None:
            self.bar.close()


class RunLogs(RunLog):
    """All of a run's logs as one (rank 0 has them; the other ranks an empty set)."""

    def __init__(self, logs: list[RunLog] | None = None):
        self.logs = [log for log in logs or [] if log is not None]

    def steps(self, records, images_per_s, metrics):
        for log in self.logs:
            log.steps(records, images_per_s, metrics)

    def epoch_end(self, epoch, epochs, step, loss, lr, images_per_s):
        for log in self.logs:
            log.epoch_end(epoch, epochs, step, loss, lr, images_per_s)

    def knn(self, step, epoch, accuracy):
        for log in self.logs:
            log.knn(step, epoch, accuracy)

    def message(self, text):
        shown = False
        for log in self.logs:
            shown = log.message(text) or shown
        if not shown:  # the other ranks, or no display: still to stderr
            print(text, file=sys.stderr, flush=True)
        return True

    def sync(self):
        lengths = {}
        for log in self.logs:
            lengths.update(log.sync())
        return lengths

    def close(self):
        for log in self.logs:
            log.close()
