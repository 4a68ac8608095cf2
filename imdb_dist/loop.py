"""The training loop: epochs of planned batches, validation, checkpoints, early stopping, stop requests.

``keras.Model.fit`` keeps the resume position in its callbacks' private
state, so a resumed run cannot start at an exact (epoch, step). This loop
owns that state (:class:`imdb_dist.checkpoint.ResumeState`): the run's
batches are one stream, ``batches(epoch, step)``, entered once at the
position the run starts from and read to its end (no iterator is built or
torn down at an epoch's end), and the loop decides when to checkpoint — every ``checkpoint_steps`` optimizer steps, at
every epoch end, and when a stop is requested — whatever
``steps_per_execution`` is. It reuses the model's own ``train_step`` and
Keras callbacks (TensorBoard, the progress bar, ours), and scores
validation itself, in equal padded blocks (:func:`make_evaluate_function`).

The host never waits for a step except at a step point
(``Schedule.log_every``, a checkpoint, a stop request, an epoch's end):
only there does it read the step's metrics, which waits for the device,
and call the Keras batch-end hooks (batch-begin hooks run before every
execution: they read nothing from the device). Between points the next
execution is queued while the device still runs the last, so a GPU never
idles on Python. The loss guard checks the running loss at each point,
before any checkpoint is written.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import tensorflow as tf
import tf_keras as keras

from imdb_dist.checkpoint import Checkpointer, ResumeState
from imdb_dist.data.plan import replica_rows
from imdb_dist.digest import BatchDigest, host_rows_sums
from imdb_dist.distribute import local_replicas
from imdb_dist.interrupt import Interrupted, StopRequest
from imdb_dist.timings import Timings

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How long the run is and how often it saves itself."""

    epochs: int
    steps_per_epoch: int
    steps_per_execution: int = 1
    # 0: checkpoint at epoch ends only; N: also after every N-th optimizer step.
    checkpoint_steps: int = 0
    # 0: no early stopping; N: stop after N epochs without a lower val_loss.
    patience: int = 0
    # The step points: the host reads the training metrics (and runs the
    # Keras batch-end hooks) only after an execution that reaches a multiple
    # of this global step, a checkpoint, a stop or the epoch's last step.
    log_every: int = 1


def build_metrics(model: keras.Model, targets: tf.Tensor) -> None:
    """Create the compiled loss and metric trackers now, so a checkpoint can restore them before step 1."""
    with model.distribute_strategy.scope():
        predictions = tf.zeros_like(targets, dtype=tf.float32)
        model.compiled_loss.build(predictions)
        model.compiled_metrics.build(predictions, targets)


def replica_slicer(strategy: tf.distribute.Strategy, block: Any) -> Callable[[Any], Any]:
    """The function cutting a local replica's slice from this worker's block (:func:`imdb_dist.data.plan.replica_rows`)."""
    replicas_here = local_replicas(strategy)

    def replica_batch(context: tf.distribute.experimental.ValueContext) -> Any:
        # Global replica ids number a worker's replicas consecutively.
        local = context.replica_id_in_sync_group % replicas_here
        return tf.nest.map_structure(lambda part: replica_rows(part, local, replicas_here), block)

    return replica_batch


def per_replica(strategy: tf.distribute.Strategy, block: Any) -> Any:
    """Each local replica's slice of this worker's block, in the graph."""
    return strategy.experimental_distribute_values_from_function(replica_slicer(strategy, block))


def traced(fn: Callable[..., Any], **options: Any) -> Any:
    """``tf.function(fn, **options)`` for a function built for one run (a closure over its model or strategy).

    TensorFlow counts traces per code object, not per function: the sixth run
    in one process (a sweep's trials, a benchmark's rounds, the tests) warned
    that the same closure "triggered tf.function retracing", though each run
    traces its own functions once. A partial has no code object of its own,
    so each run's function is counted apart.
    """
    return tf.function(functools.partial(fn), **options)


def make_train_function(
    model: keras.Model, digest: BatchDigest | None = None
) -> Callable[[Any, int], dict[str, tf.Tensor]]:
    """A function running ``steps`` of ``model.train_step`` on an iterator of this worker's blocks.

    Each block (:func:`imdb_dist.data.plan.stream`) holds the rows of all of
    this worker's replicas; each replica takes its slice
    (:func:`imdb_dist.data.plan.replica_rows`) in the graph, so one plain
    iterator feeds any number of local replicas. Returns the metrics after
    the last step. They are already synchronised
    across replicas (Keras all-reduces metric results in ``train_step``), so
    the first replica's values are the run's. One step and several steps are
    two compiled functions: tracing the model's step is a large part of a
    short run's first epoch, and a run that never groups steps traces it once.
    With ``digest``, each replica also adds its slice to the run's batch
    digest (:mod:`imdb_dist.digest`), locally.
    """
    strategy = model.distribute_strategy

    def replica_step(batch: tuple[tf.Tensor, tf.Tensor], rows_sum: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
        if digest is not None:
            # The step about to run: read before train_step increments it.
            digest.add_rows_sum(rows_sum, model.optimizer.iterations)
        return model.train_step(batch)

    def one_step(iterator: Any) -> dict[str, tf.Tensor]:
        cut = replica_slicer(strategy, next(iterator))
        args = (strategy.experimental_distribute_values_from_function(cut),)
        if digest is not None:
            # Hashed on the host from its copy of the block: tf.fingerprint has no GPU kernel (imdb_dist.digest).
            args += (host_rows_sums(strategy, cut),)
        outputs = strategy.run(replica_step, args=args)
        return tf.nest.map_structure(lambda value: strategy.experimental_local_results(value)[0], outputs)

    # One step has no tensor-dependent Python control flow (the model's layers
    # and the optimizer use tf.cond themselves), so it is traced without
    # AutoGraph's source conversion: 0.7 s less of a cold start here.
    single = traced(one_step, reduce_retracing=True, autograph=False)

    def several_steps(iterator: Any, steps: tf.Tensor) -> dict[str, tf.Tensor]:
        logs = one_step(iterator)
        for _ in tf.range(steps - 1):
            logs = one_step(iterator)
        return logs

    several = traced(several_steps, reduce_retracing=True)

    def train(iterator: Any, steps: int) -> dict[str, tf.Tensor]:
        return single(iterator) if steps == 1 else several(iterator, tf.constant(steps, tf.int64))

    return train


def make_evaluate_function(model: keras.Model, batches: int) -> Callable[[Any], dict[str, tf.Tensor]]:
    """A function scoring ``batches`` blocks of an iterator (:func:`imdb_dist.data.plan.padded_blocks`).

    Each replica scores its slice of every block, as in training; the
    rows' weights keep the padding rows out of the loss and the metrics.
    Keras' ``evaluate`` is not used: it splits a short last batch unevenly
    and can hand a replica zero rows, and it would count padding rows in
    the loss (its loss tracker weighs each batch by its row count).
    Returns the mean loss and the compiled metrics over the weighted rows,
    read across replicas and workers (a collective under several workers).
    """
    strategy = model.distribute_strategy
    with strategy.scope():
        loss = keras.metrics.Mean(name="loss")
    scored = [metric for metric in model.metrics if metric.name != "loss"]

    def score(batch: tuple[tf.Tensor, tf.Tensor, tf.Tensor]) -> None:
        tokens, labels, weights = batch
        # [rows, 1], as the predictions: with sample weights, Keras' metrics
        # broadcast [rows] labels against [rows, 1] predictions instead of matching them.
        labels = tf.reshape(labels, [-1, 1])
        predictions = model(tokens, training=False)
        loss.update_state(model.loss(labels, predictions), sample_weight=weights)
        model.compiled_metrics.update_state(labels, predictions, weights)

    def score_all(iterator: Any) -> None:
        for _ in tf.range(batches):
            strategy.run(score, args=(per_replica(strategy, next(iterator)),))

    run = traced(score_all, reduce_retracing=True)

    def evaluate(iterator: Any) -> dict[str, tf.Tensor]:
        model.reset_metrics()
        loss.reset_state()
        run(iterator)
        return {"loss": loss.result(), **{metric.name: metric.result() for metric in scored}}

    return evaluate


def build_optimizer(model: keras.Model) -> None:
    """Create the optimizer's slot variables now, before the train function's first trace.

    Variables created on a ``tf.function``'s first call make it trace twice
    (once to find them, once to run with them lifted out): building the
    slots first saves one trace of the whole step (0.7 s here), and a
    checkpoint restores them directly.
    """
    with model.distribute_strategy.scope():
        model.optimizer.build(model.trainable_variables)


def _barrier(strategy: tf.distribute.Strategy) -> None:
    """Return once every replica of every worker has called this (one all-reduce of a scalar)."""
    traced(functools.partial(_meet_all, strategy))()


def _meet_all(strategy: tf.distribute.Strategy) -> Any:
    return strategy.run(_meet)


def _meet() -> tf.Tensor:
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, tf.constant(1.0))


@dataclasses.dataclass
class TrainingLoop:
    """Trains ``model`` from ``state``'s position to the end of ``schedule`` (or an early stop).

    Attributes:
        batches: ``(epoch, step)`` → the run's stream of this worker's
            blocks from there (0-based) to the end of the last epoch.
        validation: this worker's padded validation blocks
            (:func:`imdb_dist.data.plan.padded_blocks`), scored after every epoch.
        validation_batches: how many blocks ``validation`` holds.
        after_save: called on every worker after each checkpoint, with the
            latest metrics (the Ray launcher reports the checkpoint there).
        checkpoint_now: asked at every step point inside an epoch, on every
            worker (the points are the same on all, so it may be a
            collective): True saves a checkpoint at once and training goes on
            (the Ray launcher asks whether a node of the job is being
            preempted). The epoch's last step is not asked: its checkpoint
            follows the validation.
        stop: a signal-driven stop request, honoured after the current
            execution: a checkpoint, then :class:`Interrupted`.
        digest: the run's batch digest (:mod:`imdb_dist.digest`): added to
            by every step, read at every step point (before the batch-end
            hooks, which may record it), folded into ``state`` at every checkpoint.
        timings: where the loop's time goes: ``meet`` (waiting for every
            worker before the first step), ``first_step`` (tracing and
            compiling the step, and running it), ``steps`` (the other
            training steps), ``plan`` (the run's plan and its stream),
            ``callbacks`` (metrics lines, step points,
            TensorBoard), ``epoch_metrics`` (reading the epoch's training
            metrics: across workers, a collective that waits for every
            worker's last step), ``validation``, ``checkpoints`` and
            ``after_checkpoint`` (``after_save``: under Ray, handing the
            checkpoint to Ray Train, a barrier of all workers), and
            ``checkpoint_now`` (under Ray: asking for a preemption notice, a
            barrier of all workers at every step point).
    """

    model: keras.Model
    schedule: Schedule
    batches: Callable[[int, int], tf.data.Dataset]
    validation: tf.data.Dataset
    validation_batches: int
    state: ResumeState
    checkpointer: Checkpointer
    callbacks: keras.callbacks.CallbackList
    after_save: Callable[[dict[str, Any]], None] | None = None
    checkpoint_now: Callable[[], bool] | None = None
    stop: StopRequest = dataclasses.field(default_factory=StopRequest)
    timings: Timings = dataclasses.field(default_factory=Timings)
    digest: BatchDigest | None = None

    def run(self) -> None:
        """Train to the end; with early stopping, leave the best epoch's weights in the model.

        Raises:
            Interrupted: a stop was requested (a checkpoint was saved first).
            RunError: a checkpoint could not be written, or a callback stopped the run.
        """
        train = make_train_function(self.model, self.digest)
        evaluate = make_evaluate_function(self.model, self.validation_batches)
        with self.timings.phase("plan"):
            iterator = iter(self.batches(*self.state.position()))
        # Workers get here at different times (process start, tokenizing the
        # reviews): meet before the clock starts, or the first step's all-reduce
        # absorbs the wait and the early worker's first epoch reads slower.
        with self.timings.phase("meet"):
            _barrier(self.model.distribute_strategy)
        with self.timings.phase("callbacks"):
            self.callbacks.on_train_begin()
        self.stop.deferring = True
        try:
            while not bool(self.state.stopped.numpy()) and self.state.position()[0] < self.schedule.epochs:
                self._epoch(train, evaluate, iterator)
            with self.timings.phase("callbacks"):
                self.callbacks.on_train_end()
        finally:
            self.stop.deferring = False
        if self.schedule.patience:
            self.state.restore_best(self.model)

    def _epoch(
        self,
        train: Callable[[Any, int], dict[str, tf.Tensor]],
        evaluate: Callable[[Any], dict[str, tf.Tensor]],
        iterator: Any,
    ) -> None:
        """The rest of ``state``'s epoch: training steps, validation, early stopping, the epoch-end checkpoint."""
        epoch = self.state.position()[0]
        train_logs = self._train_steps(train, iterator)
        with self.timings.phase("validation"):
            self.callbacks.on_test_begin()
            scores = {name: float(value) for name, value in evaluate(iter(self.validation)).items()}
            self.callbacks.on_test_end(scores)
        logs = {**train_logs, **{f"val_{name}": value for name, value in scores.items()}}
        if self.schedule.patience:
            self.state.record_validation(self.model, epoch, logs["val_loss"], self.schedule.patience)
        self.state.epoch.assign(epoch + 1)
        self.state.step.assign(0)
        # The metrics line first, then the checkpoint: a crash in between
        # re-runs the epoch, and its stale line is dropped then.
        with self.timings.phase("callbacks"):
            self.callbacks.on_epoch_end(epoch, logs)
        self._save(f"end of epoch {epoch + 1}", {"epoch": epoch + 1, **logs})
        if self.stop.requested:
            last = epoch + 1 >= self.schedule.epochs or bool(self.state.stopped.numpy())
            where = "after the last epoch" if last else f"at the end of epoch {epoch + 1}"
            self._interrupted(where, "export" if last else "resume")

    def _train_steps(self, train: Callable[[Any, int], dict[str, tf.Tensor]], iterator: Any) -> dict[str, float]:
        """The epoch's training steps from the saved step on; returns the epoch's training metrics."""
        epoch, step = self.state.position()
        steps, every = self.schedule.steps_per_epoch, self.schedule.checkpoint_steps
        if step == 0:
            self.model.reset_metrics()  # else: the checkpoint restored this epoch's running metrics
        with self.timings.phase("callbacks"):
            self.callbacks.on_epoch_begin(epoch)
        # The optimizer step, counted here: reading the variable every step would sync on it.
        done = int(self.model.optimizer.iterations.numpy())
        while step < steps:
            count = min(self.schedule.steps_per_execution, steps - step)
            if every:
                # Land exactly on every checkpoint_steps-th optimizer step.
                count = min(count, every - done % every)
            with self.timings.phase("callbacks"):
                self._batch_hook("on_train_batch_begin", step, None)
            with self.timings.phase("steps" if "first_step" in self.timings.seconds else "first_step"):
                outputs = train(iterator, count)
            step += count
            done += count
            periodic = every and done % every == 0 and step < steps
            reached = epoch * steps + step  # the global step, as the step metrics count it
            point = step == steps or reached // self.schedule.log_every > (reached - count) // self.schedule.log_every
            if not (point or periodic or self.stop.requested):
                # No host sync: the next execution is queued behind this one.
                continue
            with self.timings.phase("steps"):
                # Reading the metrics waits for the device to finish the steps.
                logs = {name: float(value) for name, value in outputs.items()}
                if self.digest is not None:
                    self.digest.read()  # a collective: every worker is at this point
            with self.timings.phase("callbacks"):
                self._batch_hook("on_train_batch_end", step - 1, logs)
            notice = False
            if point and step < steps and self.checkpoint_now is not None:
                with self.timings.phase("checkpoint_now"):
                    notice = self.checkpoint_now()
            if periodic or self.stop.requested or notice:
                where = f"epoch {epoch + 1} step {step}"
                self.state.step.assign(step)
                self._save(where, {"epoch": epoch + 1, "step": step, **logs})
                if self.stop.requested:
                    self._interrupted(f"at {where}", "resume")
        # From the metrics themselves: also right when a resume starts at the epoch's last step.
        # Reading them is a collective: it waits for every worker's last step.
        with self.timings.phase("epoch_metrics"):
            return {metric.name: float(metric.result()) for metric in self.model.metrics}

    def _batch_hook(self, hook: str, step: int, logs: dict[str, float] | None) -> None:
        """Call each callback's batch ``hook`` directly, not through ``CallbackList``.

        ``CallbackList`` times the first batch hooks against the batch and
        warns when a hook is slower than a step; here an end hook runs once
        per step point, covering many steps, so that warning would be noise.
        """
        for callback in self.callbacks.callbacks:
            getattr(callback, hook)(step, logs)

    def _save(self, what: str, logs: dict[str, Any]) -> None:
        with self.timings.phase("checkpoints"):
            if self.digest is not None:
                self.digest.fold()
            self.checkpointer.save(what)
        if self.after_save is not None:
            with self.timings.phase("after_checkpoint"):
                self.after_save(logs)

    def _interrupted(self, where: str, todo: str) -> None:
        raise Interrupted(
            self.stop.signum or 0,
            f"stopped by {self.stop.signal_name} {where}; checkpoint saved in {self.checkpointer.directory}: "
            f"run the same command again to {todo}",
        )
