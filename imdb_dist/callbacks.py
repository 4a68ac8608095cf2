"""Keras callbacks for the run's side effects: the epoch and step metrics logs and the loss guard.

The logs are the run directory's (:class:`imdb_dist.rundir.JsonLog`): these
callbacks say what a record holds and when, the run directory writes it.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tensorflow as tf
import tf_keras as keras

from imdb_dist.digest import BatchDigest
from imdb_dist.errors import RunError
from imdb_dist.rundir import JsonLog

log = logging.getLogger(__name__)


class EpochMetrics(keras.callbacks.Callback):
    """Logs one line per epoch and, on the chief, appends it to the run's ``metrics.jsonl`` (``records``).

    ``examples_per_s`` counts the training steps this process ran in the
    epoch (fewer after a mid-epoch resume) times the global batch, over the
    training part of the epoch only (up to the start of validation).
    """

    def __init__(self, records: JsonLog | None, global_batch: int) -> None:
        super().__init__()
        self.records = records
        self.global_batch = global_batch
        self._steps = 0
        self._start = self._train_end = self._run_start = 0.0
        self._first_epoch = True
        self._wall_offset = 0.0  # wall time of the epochs done before a resume

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._run_start = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self._first_epoch and self.records is not None:
            # Resuming at `epoch`: lines for it and later came from the lost attempt.
            kept = self.records.drop_after("epoch", epoch)
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
        if self.records is not None:
            self.records.append(record)


POINTS_PER_EPOCH = 40


def log_every(configured: int, steps_per_epoch: int) -> int:
    """The step logging period: as configured, or (0) about :data:`POINTS_PER_EPOCH` points per epoch."""
    return configured or max(1, round(steps_per_epoch / POINTS_PER_EPOCH))


class StepMetrics(keras.callbacks.Callback):
    """Every ``every`` optimizer steps, and at each epoch's last step: a ``steps.jsonl`` record and TensorBoard points.

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
        records: JsonLog,
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
        self.records, self.tensorboard, self.every = records, tensorboard, every
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
                kept = self.records.drop_after("step", done)
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
        self.records.append(record)
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


def run_callbacks(
    model: keras.Model,
    extra: Sequence[keras.callbacks.Callback],
    *,
    chief: bool,
    metrics: JsonLog,
    steps_log: JsonLog,
    tensorboard: Path,
    global_batch: int,
    epochs: int,
    steps_per_epoch: int,
    every: int,
    digest: BatchDigest,
) -> keras.callbacks.CallbackList:
    """The training job's callbacks, then ``extra``, bound to ``model``.

    The loss guard and the epoch lines run on every worker; the logs,
    TensorBoard's events and a terminal's progress bar on the chief only.

    Args:
        metrics: ``metrics.jsonl``; steps_log: ``steps.jsonl`` (:class:`imdb_dist.rundir.JsonLog`).
        tensorboard: TensorBoard's directory in the run directory.
        every: the step logging period (:func:`log_every`).
    """
    callbacks: list[keras.callbacks.Callback] = [FiniteLoss(), EpochMetrics(metrics if chief else None, global_batch)]
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(str(tensorboard), write_graph=False, profile_batch=0))
        callbacks.append(
            StepMetrics(
                steps_log,
                tensorboard,
                every=every,
                steps_per_epoch=steps_per_epoch,
                global_batch=global_batch,
                digest=digest,
                # A terminal has the progress bar; logs (Ray jobs, pods) get a line per point.
                echo=not sys.stdout.isatty(),
            )
        )
    return keras.callbacks.CallbackList(
        [*callbacks, *extra],
        add_progbar=chief and sys.stdout.isatty(),
        model=model,
        verbose=1,
        epochs=epochs,
        steps=steps_per_epoch,
    )
