"""The trainer's logs behind one interface: a RunLog of one's own sees what the CSV log sees."""

from __future__ import annotations

import csv

from pyssl.config import build_trainer, resolve
from pyssl.run_log import RunLog


class Recording(RunLog):
    def __init__(self):
        self.steps_seen, self.metrics, self.epochs, self.knns, self.syncs, self.closed = [], [], [], [], 0, False

    def steps(self, records, images_per_s, metrics):
        assert images_per_s > 0
        self.steps_seen += [(r.step, r.epoch, r.loss) for r in records]
        self.metrics.append(dict(metrics))

    def epoch_end(self, epoch, epochs, step, loss, lr, images_per_s):
        self.epochs.append((epoch, step))

    def knn(self, step, epoch, accuracy):
        self.knns.append((step, epoch))

    def sync(self):
        self.syncs += 1
        return {}

    def close(self):
        self.closed = True


def test_a_run_log_of_ones_own_sees_every_step_once_with_the_metrics(tmp_path):
    run = resolve(
        "rotnet", epochs=2, batch_size=256, out=str(tmp_path), knn_every=1, checkpoint_every=3, progress=False
    )
    log = Recording()
    trainer = build_trainer(run, logs=[log])
    result = trainer.fit()
    steps = trainer.steps_per_epoch * 2
    assert [s for s, _, _ in log.steps_seen] == list(range(1, steps + 1))
    assert [loss for _, _, loss in log.steps_seen] == result.losses
    with open(tmp_path / "metrics.csv") as f:
        assert [float(r["loss"]) for r in csv.DictReader(f)] == result.losses  # what the CSV log got
    assert all(set(m) == {"loss", "rotation_acc"} for m in log.metrics)
    assert log.epochs == [(1, steps // 2), (2, steps)] and log.knns == [(steps // 2, 1), (steps, 2)]
    assert log.syncs == steps // 3 + 2 and log.closed  # before every checkpoint: every 3 steps and each epoch end
