"""Keras callbacks for the run's side effects: the epoch and step metrics files and the loss guard."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import tensorflow as tf
import tf_keras as keras

from imdb_dist.digest import BatchDigest
from imdb_dist.errors import RunError
from imdb_dist.rundir import atomic_write, read_metrics

log = logging.getLogger(__name__)


class EpochMetrics(keras.callbacks.Callback):
    """Logs one line per epoch and, on the chief, appends it to ``metrics.jsonl``.

    ``examples_per_s`` counts the training steps this process ran in the
    epoch (fewer after a mid-epoch resume) times the global batch, over the
    training part of the epoch only (up to the start of validation).
    """

    def __init__(self, path: Path | None, global_batch: int) -> None:
        super().__init__()
        self.path = path
        self.global_batch = global_batch
        self._steps = 0
        self._start = self._train_end = self._run_start = 0.0
        self._first_epoch = True
        self._wall_offset = 0.0  # wall time of the epochs done before a resume

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._run_start = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self._first_epoch and self.path is not None:
            # Resuming at `epoch`: lines for it and later came from the lost attempt.
            kept = drop_epochs_from(self.path, epoch + 1)
            self._wall_offset = kept[-1]["wall_s"] if kept else 0.0
        self._first_epoch = False
        self._start = time.perf_counter()
        self._train_end = 0.0
        self._steps = 0
        self._first_step: int | None = None

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self._first_step is None:
            self._first_step = batch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        # One call per execution, with its last step's index.
        self._steps = batch + 1 - (self._first_step or 0)

    def on_test_begin(self, logs: dict | None = None) -> None:
        if not self._train_end:
            self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        now = time.perf_counter()
        train_s = (self._train_end or now) - self._start
        record: dict[str, Any] = {"epoch": epoch + 1}
        record.update({k: float(v) for k, v in (logs or {}).items()})
        record["examples_per_s"] = self._steps * self.global_batch / train_s if train_s > 0 else 0.0
        record["wall_s"] = self._wall_offset + now - self._run_start
        log.info(
            "epoch %d: %s",
            epoch + 1,
            " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"),
        )
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


POINTS_PER_EPOCH = 40


def log_every(configured: int, steps_per_epoch: int) -> int:
    """The step logging period: as configured, or (0) about :data:`POINTS_PER_EPOCH` points per epoch."""
    return configured or max(1, round(steps_per_epoch / POINTS_PER_EPOCH))


class StepMetrics(keras.callbacks.Callback):
    """Every ``every`` optimizer steps, and at each epoch's last step: one ``steps.jsonl`` line and TensorBoard points.

    Each point holds the training loss and accuracy *over the steps since the
    previous point*, the learning rate, and the examples per second over
    those steps, at the global optimizer step ``epoch * steps_per_epoch +
    step``. The window means come from the running epoch means Keras returns
    with every step (already reduced across workers, so the chief alone can
    log them without a collective of its own); they are exact as every step
    holds a full global batch (:mod:`imdb_dist.data.plan`), up to float
    rounding. On a
    resume, points past the restored step (from the lost attempt) are
    dropped first, and the first point after a mid-epoch resume holds the
    epoch's running mean. Used on the chief only.
    """

    def __init__(
        self,
        path: Path,
        tensorboard: Path | None,
        *,
        every: int,
        steps_per_epoch: int,
        global_batch: int,
        digest: BatchDigest | None = None,
        echo: bool = True,
    ) -> None:
        super().__init__()
        self.digest = digest
        self.path, self.tensorboard, self.every = path, tensorboard, every
        self.steps_per_epoch, self.global_batch, self.echo = steps_per_epoch, global_batch, echo
        self._writer: Any = None
        self._resumed = False
        self._epoch = 0
        self._run_start = 0.0
        self._wall_offset = 0.0

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._run_start = time.perf_counter()
        if self.tensorboard is not None:
            self._writer = tf.summary.create_file_writer(str(self.tensorboard / "train"))

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch
        self._window: tuple[int, dict[str, float]] | None = None  # (step in epoch, running means) at the last point
        self._window_start = time.perf_counter()

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self._window is None:
            self._window = (batch, {})
            if not self._resumed:
                self._resumed = True
                done = self._epoch * self.steps_per_epoch + batch
                kept = drop_records_after(self.path, "step", done)
                self._wall_offset = kept[-1]["wall_s"] if kept else 0.0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        step_in_epoch = batch + 1
        start, before = self._window or (0, {})
        steps = step_in_epoch - start
        last_of_epoch = step_in_epoch == self.steps_per_epoch
        step = self._epoch * self.steps_per_epoch + step_in_epoch
        # A point when an `every` boundary falls inside this execution's steps.
        if steps <= 0 or not (last_of_epoch or step // self.every > (step - steps) // self.every):
            return
        now = time.perf_counter()
        running = {name: float(value) for name, value in (logs or {}).items()}
        record: dict[str, Any] = {"step": step, "epoch": self._epoch + 1, "epoch_step": step_in_epoch}
        for name, mean in running.items():
            if before:
                # The mean over (start, step_in_epoch] from the running means at both ends,
                # which float32 rounding can push a hair past a bound: 1.0000001 accuracy.
                window = (mean * step_in_epoch - before[name] * start) / steps
                record[name] = min(max(window, 0.0), 1.0) if name == "accuracy" else window
            else:
                record[name] = mean
        # A plain or mirrored variable, or a schedule's tensor: read locally, no collective.
        record["learning_rate"] = float(keras.backend.get_value(self.model.optimizer.learning_rate))
        record["examples_per_s"] = steps * self.global_batch / (now - self._window_start)
        record["wall_s"] = self._wall_offset + now - self._run_start
        if self.digest is not None and self.digest.value is not None:
            # Read by the loop on every worker at this point (imdb_dist.digest).
            record["batches_digest"] = self.digest.value
        self._window, self._window_start = (step_in_epoch, running), now
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            with self._writer.as_default(step=step):
                for name in ("loss", "accuracy", "learning_rate", "examples_per_s"):
                    if name in record:
                        tf.summary.scalar(f"step_{name}", record[name])
            self._writer.flush()
        if self.echo:
            log.info(
                "step %d (epoch %d, %d/%d): %s",
                step,
                self._epoch + 1,
                step_in_epoch,
                self.steps_per_epoch,
                " ".join(f"{k}={record[k]:.4g}" for k in ("loss", "accuracy", "learning_rate", "examples_per_s")
                         if k in record),
            )

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._writer is not None:
            self._writer.close()


def drop_records_after(path: Path, key: str, value: int) -> list[dict[str, Any]]:
    """Remove the records of a JSON-lines file whose ``key`` is above ``value``; returns those kept."""
    records = read_metrics(path)
    kept = [r for r in records if r[key] <= value]
    if len(kept) != len(records):
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def drop_epochs_from(path: Path, epoch: int) -> list[dict[str, Any]]:
    """Remove records of ``epoch`` and later, so a resumed run never counts an epoch twice.

    Returns the records kept.
    """
    return drop_records_after(path, "epoch", epoch - 1)


class FiniteLoss(keras.callbacks.Callback):
    """Stops the run with an error naming epoch and step once the loss is not finite.

    It reads the epoch's running mean loss at each step point (the training
    loop calls batch-end hooks only there, :mod:`imdb_dist.loop`): a step's
    nan or inf stays in that mean, so it is caught at the next point, which
    comes before any checkpoint.

    The last checkpoint is left as it was, so the run can be resumed, e.g.
    with a lower learning rate named as a deliberate change (``--change``,
    :mod:`imdb_dist.fingerprint`).
    """

    def __init__(self) -> None:
        super().__init__()
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            raise RunError(
                f"training loss became {loss} by epoch {self._epoch + 1} step {batch + 1}; the last checkpoint "
                "is kept: to resume from it with a lower learning rate, run again with "
                "--set train.learning_rate=<lower> --change train.learning_rate"
            )
