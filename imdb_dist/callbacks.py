"""Keras callbacks for the run's side effects: the epoch log/metrics file, the loss guard, checkpoints."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tensorflow as tf
import tf_keras as keras

from imdb_dist.errors import RunError, write_failure
from imdb_dist.interrupt import Interrupted, StopRequest
from imdb_dist.rundir import atomic_write

log = logging.getLogger(__name__)


class EpochMetrics(keras.callbacks.Callback):
    """Logs one line per epoch and, on the chief, appends it to ``metrics.jsonl``.

    ``examples_per_s`` counts training examples over the training part of the
    epoch only (up to the start of validation), across all replicas.
    """

    def __init__(self, path: Path | None, examples_per_epoch: int) -> None:
        super().__init__()
        self.path = path
        self.examples = examples_per_epoch
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

    def on_test_begin(self, logs: dict | None = None) -> None:
        if not self._train_end:
            self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        now = time.perf_counter()
        train_s = (self._train_end or now) - self._start
        record: dict[str, Any] = {"epoch": epoch + 1}
        record.update({k: float(v) for k, v in (logs or {}).items()})
        record["examples_per_s"] = self.examples / train_s if train_s > 0 else 0.0
        record["wall_s"] = self._wall_offset + now - self._run_start
        log.info(
            "epoch %d: %s",
            epoch + 1,
            " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"),
        )
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The epoch records of ``metrics.jsonl`` (empty if it does not exist).

    Lines are appended, so a process killed mid-write can leave a torn last
    line: it is dropped (that epoch has no checkpoint yet and will re-run).
    """
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise
            log.warning("%s: dropping a torn last line (an interrupted write)", path)
    return records


def drop_epochs_from(path: Path, epoch: int) -> list[dict[str, Any]]:
    """Remove records of ``epoch`` and later, so a resumed run never counts an epoch twice.

    Returns the records kept.
    """
    records = read_metrics(path)
    kept = [r for r in records if r["epoch"] < epoch]
    if len(kept) != len(records):
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


class FiniteLoss(keras.callbacks.Callback):
    """Stops the run with an error naming epoch and step as soon as the loss is not finite.

    The checkpoint of the last finished epoch is left as it was, so the run
    can be resumed (e.g. with a lower learning rate in a new run dir).
    """

    def __init__(self) -> None:
        super().__init__()
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            raise RunError(f"training loss became {loss} at epoch {self._epoch + 1} step {batch + 1}")


class Backup(keras.callbacks.BackupAndRestore):
    """tf_keras BackupAndRestore that checkpoints every epoch, every N steps, and on a stop request.

    The stock callback with an integer ``save_freq`` saves only every N
    batches, so the end of an epoch may go unsaved; this one always saves at
    epoch end too. ``after_save(logs)`` runs on every worker right after each
    periodic save (the Ray launcher hands the checkpoint to Ray Train there),
    so it is called equally often everywhere.

    With a ``stop`` request (:mod:`imdb_dist.interrupt`), a signal during
    training is answered at the end of the current step: a mid-epoch
    checkpoint is saved and :class:`~imdb_dist.interrupt.Interrupted` raised;
    a restore then continues with the next step of that epoch.

    A failed write (disk full, quota, read-only mount) raises ``RunError``;
    TensorFlow's checkpoint manager only points at a checkpoint once it is
    complete, so the previous one stays the one a resume reads.

    Relies on tf_keras' private ``_batches_count``, ``_current_epoch`` and
    ``_backup`` (tf_keras is in maintenance mode, so these are stable).
    """

    def __init__(
        self,
        backup_dir: str,
        every_steps: int = 0,
        after_save: Callable[[dict[str, Any]], None] | None = None,
        stop: StopRequest | None = None,
    ) -> None:
        # Always an integer save_freq: it makes tf_keras record the step in
        # each checkpoint and resume mid-epoch from it; "never" is a count no
        # epoch reaches, the epoch-end saves being this class's own.
        super().__init__(backup_dir, save_freq=every_steps or _NEVER, delete_checkpoint=False)
        self.after_save = after_save
        self.stop = stop

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        if self.stop is not None:
            self.stop.deferring = True

    def on_train_end(self, logs: dict | None = None) -> None:
        super().on_train_end(logs)
        if self.stop is not None:
            self.stop.deferring = False
            if self.stop.requested:
                # It came during the last validation: the final epoch is saved,
                # and export can wait for the rerun rather than the grace period.
                raise Interrupted(
                    self.stop.signum,
                    f"stopped by {self.stop.signal_name} after the last epoch; checkpoint saved in "
                    f"{self.backup_dir}: run the same command again to export",
                )

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        count = self._batches_count
        super().on_train_batch_end(batch, logs)
        # The parent resets its counter to 0 exactly when it has just saved.
        saved = count + 1 >= self.save_freq
        if saved and self.after_save:
            self.after_save({"epoch": self._current_epoch + 1, "step": batch + 1, **(logs or {})})
        if self.stop is not None and self.stop.requested:
            self.stop.deferring = False
            if not saved:
                self._backup(epoch=self._current_epoch, batch=batch)
            raise Interrupted(
                self.stop.signum,
                f"stopped by {self.stop.signal_name} at epoch {self._current_epoch + 1} step {batch + 1}; "
                f"checkpoint saved in {self.backup_dir}: run the same command again to resume",
            )

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        # The saved batch is the epoch's last, so a restore starts the next epoch.
        self._batches_count = 0
        self._backup(epoch=epoch)
        if self.after_save:
            self.after_save({"epoch": epoch + 1, **(logs or {})})
        if self.stop is not None and self.stop.requested and epoch + 1 < self.params.get("epochs", 0):
            # It came during validation: this epoch's checkpoint is the one to resume from.
            self.stop.deferring = False
            raise Interrupted(
                self.stop.signum,
                f"stopped by {self.stop.signal_name} at the end of epoch {epoch + 1}; checkpoint saved in "
                f"{self.backup_dir}: run the same command again to resume",
            )

    def _backup(self, epoch: int, batch: int = 0) -> None:
        try:
            super()._backup(epoch, batch)
        except (OSError, tf.errors.OpError) as exc:
            _remove_partial_checkpoints(Path(self.backup_dir))
            raise RunError(
                f"cannot write a checkpoint in {self.backup_dir} (epoch {epoch + 1}): {write_failure(exc)}; "
                "the previous checkpoint is kept"
            ) from None


# A save frequency in steps that no run reaches.
_NEVER = 2**62


def _remove_partial_checkpoints(directory: Path) -> None:
    """Drop what a failed save left: TensorFlow stages each checkpoint in ``<prefix>_temp/``."""
    for leftover in directory.glob("**/*_temp*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
