"""Resume state and the checkpoint that holds it: written and read by this project, nothing else.

One TensorFlow checkpoint (``tf.train.Checkpoint`` + ``CheckpointManager``)
holds everything a resume needs: the model, the optimizer (its step counter,
Adam's slots, and under mixed_float16 the loss scale), the running training
metrics of the current epoch, and :class:`ResumeState` — where the run is
(epoch, step) and early stopping's state and best weights. A run resumed
from it continues exactly where the saved one was: with the data order of
:mod:`imdb_dist.data.plan`'s global plan and step-keyed dropout, it
trains on the same batches with the same masks.

Under MultiWorkerMirroredStrategy every worker saves (reading the metrics'
per-replica values is a collective), but only the chief into the real
directory; the others write to a temporary directory that is removed after
each save.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path

import tensorflow as tf
import tf_keras as keras

from imdb_dist.errors import RunError, write_failure

log = logging.getLogger(__name__)


class ResumeState(tf.Module):
    """Where a run is and what early stopping knows, as checkpointed variables.

    ``epoch`` (0-based) and ``step`` name the next step to run: ``(2, 0)``
    after two whole epochs, ``(1, 37)`` after step 37 of the second.
    """

    def __init__(self, model: keras.Model, early_stopping: bool) -> None:
        super().__init__(name="resume_state")
        # Plain (non-distributed) variables: created outside any strategy scope.
        with tf.init_scope():
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
            self.stopped = tf.Variable(False, trainable=False)
            self.best_val_loss = tf.Variable(math.inf, dtype=tf.float64, trainable=False)
            self.best_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)  # 1-based; 0: none yet
            self.wait = tf.Variable(0, dtype=tf.int64, trainable=False)
            # The batch digest of every step up to this checkpoint (imdb_dist.digest).
            self.batches_digest = tf.Variable(0.0, dtype=tf.float64, trainable=False)
            # The best epoch's weights, only kept when early stopping restores them.
            self.best_weights = (
                [tf.Variable(tf.zeros(w.shape, w.dtype), trainable=False) for w in model.weights]
                if early_stopping
                else []
            )

    def position(self) -> tuple[int, int]:
        return int(self.epoch.numpy()), int(self.step.numpy())

    def record_validation(self, model: keras.Model, epoch: int, val_loss: float, patience: int) -> None:
        """Early stopping's bookkeeping after ``epoch`` (0-based); sets ``stopped`` when training should end.

        As Keras' ``EarlyStopping(monitor="val_loss")``: an epoch improves when
        its val_loss is below the best so far; ``patience`` epochs in a row
        without improvement stop the run.
        """
        if val_loss < float(self.best_val_loss.numpy()):
            self.best_val_loss.assign(val_loss)
            self.best_epoch.assign(epoch + 1)
            self.wait.assign(0)
            for best, weight in zip(self.best_weights, model.weights, strict=True):
                best.assign(weight.read_value())
            return
        self.wait.assign_add(1)
        if int(self.wait.numpy()) >= patience:
            self.stopped.assign(True)

    def restore_best(self, model: keras.Model) -> None:
        """Put the best epoch's weights back into ``model`` (no-op before any epoch was scored)."""
        if self.best_weights and int(self.best_epoch.numpy()) > 0:
            model.set_weights([best.numpy() for best in self.best_weights])


def saved_position(directory: Path) -> tuple[int, int]:
    """``(epoch, step)`` the latest checkpoint in ``directory`` resumes at (0-based epoch); ``(0, 0)`` if none.

    Read from the checkpoint's :class:`ResumeState` variables without building a model.
    """
    latest = tf.train.latest_checkpoint(str(directory))
    if latest is None:
        return 0, 0
    reader = tf.train.load_checkpoint(latest)
    return tuple(int(reader.get_tensor(f"state/{name}/.ATTRIBUTES/VARIABLE_VALUE")) for name in ("epoch", "step"))


class Checkpointer:
    """Saves and restores the run's one checkpoint (model, optimizer, metrics, :class:`ResumeState`).

    Args:
        directory: where checkpoints are read from (and, on the chief, written).
        model: a compiled model whose metrics are built (see ``imdb_dist.loop``).
        state: the run's position and early-stopping state.
        chief: whether this worker writes ``directory``; others save to a
            temporary directory, removed after each save.
    """

    def __init__(self, directory: Path, model: keras.Model, state: ResumeState, *, chief: bool) -> None:
        self.directory = directory
        self.chief = chief
        self._checkpoint = tf.train.Checkpoint(
            model=model, optimizer=model.optimizer, metrics=list(model.metrics), state=state
        )

    def restore(self) -> bool:
        """Load the latest checkpoint in ``directory``; False if there is none (a new run)."""
        latest = tf.train.latest_checkpoint(str(self.directory))
        if latest is None:
            return False
        self._checkpoint.read(latest).assert_existing_objects_matched()
        log.info("restored %s", latest)
        return True

    def save(self, what: str) -> None:
        """Write a checkpoint; ``what`` names it in errors (e.g. "epoch 2 step 40").

        Raises:
            RunError: the write failed (disk full, quota, read-only); the
                previous checkpoint is untouched and stays the latest.
        """
        target = self.directory if self.chief else Path(tempfile.mkdtemp(prefix="imdb-dist-workertemp-"))
        # A manager per save: it only lists what is in `target`, and keeps one.
        manager = tf.train.CheckpointManager(self._checkpoint, str(target), max_to_keep=1)
        try:
            manager.save()
        except (OSError, tf.errors.OpError) as exc:
            _remove_partial_checkpoints(target)
            raise RunError(
                f"cannot write a checkpoint in {target} ({what}): {write_failure(exc)}; the previous checkpoint is kept"
            ) from None
        finally:
            if not self.chief:
                shutil.rmtree(target, ignore_errors=True)


def _remove_partial_checkpoints(directory: Path) -> None:
    """Drop what a failed save left: TensorFlow stages each checkpoint in ``<prefix>_temp/``."""
    for leftover in directory.glob("**/*_temp*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
