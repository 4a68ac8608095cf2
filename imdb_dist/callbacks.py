"""Keras callbacks for the run's side effects: the epoch log/metrics file and the loss guard."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import tf_keras as keras

from imdb_dist.errors import RunError
from imdb_dist.rundir import atomic_write

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
