"""One worker's whole job: data, model under the strategy scope, fit, export, report.

The same ``run(cfg)`` serves every launcher: ``imdb-dist train`` calls it in
process (default or Mirrored strategy), and each Ray Train worker calls it
under MultiWorkerMirroredStrategy (:class:`Launched`: the launcher's hooks).
Side effects on the run directory happen on the chief only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import tf_keras as keras

from imdb_dist import fingerprint, report, rundir, tracking
from imdb_dist.build import data_plan, prepared_inputs, restored_model, tokenized
from imdb_dist.callbacks import log_every, run_callbacks
from imdb_dist.config import Config
from imdb_dist.data import plan
from imdb_dist.data.pipeline import Tokenizer
from imdb_dist.data.sources import ReadAhead
from imdb_dist.data.training import (
    TrainingData,
    check_sizes,
    in_memory_data,
    validation_blocks,
)
from imdb_dist.digest import BatchDigest
from imdb_dist.distribute import Worker, start_worker
from imdb_dist.evaluate import SCORE_BATCH
from imdb_dist.interrupt import Interrupted, StopRequest
from imdb_dist.loop import Schedule, TrainingLoop
from imdb_dist.timings import Timings

log = logging.getLogger(__name__)


class Launched(Protocol):
    """A worker a launcher started (``imdb_dist.launch``: Ray Train), and the launcher's four hooks into its job.

    The launcher has checked and prepared the run directory (config,
    vocabulary, token store) and holds its lease; deciding again in the
    workers would race with one another.
    """

    lease: str  # the launcher's lease on the run directory: the chief checks it before each write
    checkpoints: Path  # this worker's checkpoint directory (the launcher moves it to and from storage)

    def on_start(self, chief: bool, run_dir: rundir.RunDir) -> None:
        """Called once the strategy has said whether this worker is the chief, with the open run directory."""

    def checkpoint_now(self) -> bool:
        """Asked at every step point, on every worker alike (it may be a collective): True checkpoints there."""

    def after_checkpoint(self, metrics: dict[str, Any]) -> None:
        """Called with the latest metrics on every worker right after each checkpoint (on the chief: synced)."""


def run(
    cfg: Config,
    *,
    launched: Launched | None = None,
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
    stop: StopRequest | None = None,
    startup_s: float | None = None,
    reading: ReadAhead | None = None,
    changes: Sequence[str] = (),
    tracked_under: str | None = None,
) -> Path | None:
    """Train, export and evaluate as ``cfg`` says; return the run directory (None when it is remote).

    ``run.output_dir`` is a local path or a storage URI
    (:mod:`imdb_dist.rundir`): the chief holds its lease for the run, syncs
    it after every checkpoint and publishes the model and report at the end.

    Args:
        cfg: the job.
        launched: this process is a worker a launcher started on a run
            directory it prepared (read its rows of the token store), with its hooks.
        extra_callbacks: more Keras callbacks for the training loop (run before checkpointing).
        stop: a signal-driven stop request (``imdb_dist.interrupt``): when it
            is set during training, checkpoint after the current step and raise
            ``Interrupted``.
        startup_s: seconds from the process's start to this call, when the
            process exists for this run (``imdb-dist train``): the report's
            ``start-up`` phase. A process that runs several jobs (a bench, a
            tune trial, a Ray worker) has no start-up of its own to report.
        reading: the training splits, already being read
            (:func:`imdb_dist.data.sources.read_ahead`), instead of reading
            the configured source here.
        changes: model-defining keys this command means to change in a run
            it resumes (``--change``; :mod:`imdb_dist.fingerprint`).
        tracked_under: the MLflow run (a sweep's trial) this run's MLflow
            run nests under, with ``tracking`` on (:mod:`imdb_dist.tracking`).

    Raises:
        InputError: bad config, data or output directory (nothing is written),
            or another live run holds the run directory.
        RunError: the loss diverged, a checkpoint could not be written, or the
            storage failed after its retries (the last good checkpoint is
            kept); ``Interrupted`` after a stop request.
    """
    started = time.perf_counter()
    timings = Timings()
    if startup_s is not None:
        timings.add("start-up", startup_s)  # interpreter, imports, config
    if launched is None:
        tracking.check(cfg.tracking)  # a launcher checked it before starting the workers
    with rundir.RunDir.open(cfg.run.output_dir, retry_s=cfg.run.storage_retry_s) as run_dir:
        with timings.phase("strategy"):
            worker = start_worker(cfg, ray_worker=launched is not None)
        if worker.chief:
            run_dir.check_writable()
        if launched is not None:
            with timings.phase("data"):
                data = prepared_inputs(run_dir, launched.lease, chief=worker.chief)
            check_sizes(data, cfg.train.batch_size)
            launched.on_start(worker.chief, run_dir)
            checkpoints = launched.checkpoints
        else:
            opened = _open_run(cfg, run_dir, worker, timings, reading, changes, tracked_under)
            if opened is None:  # already complete
                if worker.chief:
                    tracking.catch_up(cfg, run_dir)
                return None if run_dir.remote else run_dir.work
            data, checkpoints = opened, run_dir.work / rundir.CHECKPOINTS
        with timings.phase("tokenize"):
            tokenizer, examples = tokenized(cfg, run_dir, data, chief=worker.chief)
        global_plan = data_plan(cfg, examples.lengths)
        tracker = None
        if worker.chief and cfg.tracking.enabled:
            tracker = tracking.Tracker(cfg, run_dir, global_plan.steps_per_epoch, tags=tracking.machine_tags(worker))

        def saved(metrics: dict[str, Any]) -> None:
            if worker.chief:
                run_dir.sync()  # the checkpoint (if ours to move) and the logs so far
            if launched is not None:
                launched.after_checkpoint(metrics)
            if tracker is not None:
                # Durable now: a local checkpoint once written; a Ray one once Ray Train collected it, which
                # only the next report shows (imdb_dist.tracking.Tracker.mirror).
                tracker.mirror(one_behind=launched is not None)

        try:
            model, batches_digest = _train(
                cfg, worker, run_dir, tokenizer, examples, data, global_plan,
                checkpoints=checkpoints,
                callbacks=extra_callbacks,
                after_save=saved,
                checkpoint_now=launched.checkpoint_now if launched is not None else None,
                stop=stop or StopRequest(),
                timings=timings,
            )
            if worker.chief:
                report.finish(cfg, worker, run_dir, tokenizer, model, data, timings, time.perf_counter() - started,
                              batches_digest=batches_digest)
        except BaseException as exc:
            if tracker is not None:
                # A stop to resume later, or a failure: what the last checkpoint made durable is queued;
                # a short wait (a pod's grace period is short), the next attempt sends the rest.
                tracker.close("KILLED" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "FAILED", wait_s=5.0)
            raise
        if tracker is not None:
            version = json.loads((run_dir.work / rundir.REPORT).read_text())["model_version"]
            tracker.finish(run_dir.work / rundir.MODEL / str(version))
        return None if run_dir.remote else run_dir.work


def _open_run(
    cfg: Config,
    run_dir: rundir.RunDir,
    worker: Worker,
    timings: Timings,
    reading: ReadAhead | None,
    changes: Sequence[str],
    tracked_under: str | None,
) -> TrainingData | None:
    """Decide new, resume or complete; read and check the data; the chief takes the lease and (re)opens the run.

    Returns the data, or None when the run directory already holds this run, complete.
    """
    if run_dir.holds_complete(cfg, changes):
        return None
    # Read and check the data before creating anything: bad data leaves no run dir.
    with timings.phase("data"):
        data = in_memory_data(cfg.data, reading.result() if reading is not None else None)
    check_sizes(data, cfg.train.batch_size)
    assert data.reviews is not None
    digest = fingerprint.data_digest([(split.texts, split.labels) for split in data.reviews])
    current = fingerprint.Fingerprint.of(cfg, precision=worker.precision, plan_version=plan.PLAN_VERSION, data=digest)
    run_dir.check_fingerprint(current, changes)
    if worker.chief and run_dir.take(cfg, current, changes) is None:
        return None
    if worker.chief:
        tracking.open_run(cfg, run_dir, parent=tracked_under)
    # Every worker restores the latest checkpoint.
    run_dir.fetch(trees=[rundir.CHECKPOINTS])
    return data


def _train(
    cfg: Config,
    worker: Worker,
    run_dir: rundir.RunDir,
    tokenizer: Tokenizer,
    examples: plan.Examples,
    data: TrainingData,
    global_plan: plan.GlobalPlan,
    *,
    checkpoints: Path,
    callbacks: Sequence[keras.callbacks.Callback],
    after_save: Callable[[dict[str, Any]], None],
    checkpoint_now: Callable[[], bool] | None,
    stop: StopRequest,
    timings: Timings,
) -> tuple[keras.Model, int | None]:
    """Build the model under the strategy, restore the last checkpoint if any, and train to the end.

    Returns the model and the batch digest of the steps that trained it (:mod:`imdb_dist.digest`).
    """
    steps = global_plan.steps_per_epoch
    share = plan.Share(worker.replicas, worker.num_workers, worker.index)  # this worker's rows of every batch
    with timings.phase("build"):
        model, state, checkpointer = restored_model(cfg, worker, tokenizer.vocabulary_size(), steps, checkpoints)
        digest = BatchDigest(worker.strategy, state.batches_digest)
    schedule = Schedule(
        epochs=cfg.train.epochs,
        steps_per_epoch=steps,
        steps_per_execution=cfg.train.steps_per_execution,
        checkpoint_steps=cfg.run.checkpoint_steps,
        patience=cfg.train.early_stopping_patience,
        # Every worker stops at the same points: the loss guard raises on all of them together.
        log_every=log_every(cfg.run.log_every_steps, steps),
    )
    with timings.phase("callbacks"):
        callback_list = run_callbacks(
            model,
            callbacks,
            chief=worker.chief,
            metrics=run_dir.log(rundir.METRICS),
            steps_log=run_dir.log(rundir.STEPS),
            tensorboard=run_dir.work / rundir.TENSORBOARD,
            global_batch=cfg.train.batch_size,
            epochs=cfg.train.epochs,
            steps_per_epoch=steps,
            every=schedule.log_every,
            digest=digest,
        )
    # Validation in global batches as large as the export's scoring (the LSTM's time loop costs per batch:
    # best.yaml's batch of 32 would take 8x the loops).
    validation, validation_batches = validation_blocks(
        data, tokenizer, max_len=cfg.data.max_len, batch_size=max(cfg.train.batch_size, SCORE_BATCH), share=share
    )
    TrainingLoop(
        model,
        schedule=schedule,
        batches=lambda epoch, step: plan.stream(examples, global_plan, share, epochs=cfg.train.epochs,
                                                start=(epoch, step)),
        validation=validation,
        validation_batches=validation_batches,
        state=state,
        checkpointer=checkpointer,
        callbacks=callback_list,
        after_save=after_save,
        checkpoint_now=checkpoint_now,
        stop=stop,
        timings=timings,
        digest=digest,
    ).run()
    return model, digest.value
