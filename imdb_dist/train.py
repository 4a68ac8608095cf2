"""One worker's whole job: data, model under the strategy scope, fit, export, report.

The same ``run(cfg)`` serves every launcher: ``imdb-dist train`` calls it in
process (default or Mirrored strategy), and each Ray Train worker calls it
under MultiWorkerMirroredStrategy. Side effects on the run directory happen
on the chief only.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tensorflow as tf
import tf_keras as keras

from imdb_dist import __version__, aggregation, fingerprint, rundir
from imdb_dist.callbacks import (
    EpochMetrics,
    FiniteLoss,
    StepMetrics,
    log_every,
)
from imdb_dist.checkpoint import Checkpointer, ResumeState
from imdb_dist.config import Config, to_dict
from imdb_dist.curves import plot_curves
from imdb_dist.data import pipeline, plan, shards
from imdb_dist.data.pipeline import Tokenizer
from imdb_dist.data.sources import ReadAhead, Reviews, load_training_splits, movies
from imdb_dist.digest import BatchDigest
from imdb_dist.distribute import (
    check_devices,
    is_chief,
    local_devices,
    make_strategy,
    precision_policy,
    resolve_precision,
    worker_index,
)
from imdb_dist.dropout import key_on_step
from imdb_dist.errors import ConfigError, DataError
from imdb_dist.evaluate import SCORE_BATCH, metrics, score_texts
from imdb_dist.export import export_model, load_model
from imdb_dist.interrupt import StopRequest
from imdb_dist.loop import Schedule, TrainingLoop, build_metrics, build_optimizer
from imdb_dist.model import build_model, compile_model, min_length
from imdb_dist.timings import Timings, since_process_start

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Worker:
    """What this process is within the job."""

    strategy: tf.distribute.Strategy
    chief: bool
    num_workers: int
    index: int
    precision: str

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    @property
    def share(self) -> plan.Share:
        """This worker's rows of every global batch."""
        return plan.Share(self.replicas, self.num_workers, self.index)


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """Where the examples come from: reviews in memory, or prepared shards.

    Every worker reads every training example, in the same order (the
    global plan indexes them: :mod:`imdb_dist.data.plan`).
    """

    n_train: int
    n_val: int
    train_examples: Callable[[], tf.data.Dataset]  # (text, label), in the split's order
    val_examples: Callable[[], tf.data.Dataset]
    val_reviews: Callable[[], Reviews]
    # sha256 of the reviews (imdb_dist.fingerprint.data_digest); None for prepared shards (the launcher checks).
    digest: str | None = None
    # How many movies the validation reviews are about, none of them in
    # training, where the source names each review's movie; None where it does not.
    validation_movies: int | None = None


def in_memory_data(cfg: Config, splits: tuple[Reviews, Reviews] | None = None) -> TrainingData:
    """The ``(train, validation)`` reviews given, else the configured source's, read now (DataError on bad data)."""
    train, val = splits if splits is not None else load_training_splits(cfg.data)
    return TrainingData(
        n_train=len(train),
        n_val=len(val),
        train_examples=lambda: tf.data.Dataset.from_tensor_slices((train.texts, train.labels)),
        val_examples=lambda: tf.data.Dataset.from_tensor_slices((val.texts, val.labels)),
        val_reviews=lambda: val,
        digest=fingerprint.data_digest([(train.texts, train.labels), (val.texts, val.labels)]),
        validation_movies=movies(val),
    )


def prepared_data(directory: Path) -> TrainingData:
    """Examples from the TFRecord shards ``imdb_dist.launch`` prepared in ``directory``."""
    manifest = shards.read_manifest(directory)
    if manifest is None:
        raise DataError(f"{directory} holds no prepared data")
    train_files, val_files = shards.split_files(directory, "train"), shards.split_files(directory, "validation")
    return TrainingData(
        n_train=manifest["splits"]["train"]["examples"],
        n_val=manifest["splits"]["validation"]["examples"],
        train_examples=lambda: shards.examples(train_files),
        val_examples=lambda: shards.examples(val_files),
        val_reviews=lambda: shards.load_split(directory, "validation"),
        validation_movies=manifest["meta"].get("validation_movies"),
    )


@dataclasses.dataclass(frozen=True)
class Launched:
    """What a launcher gives each worker it starts (``imdb_dist.launch``: Ray Train).

    The launcher has checked and prepared the run directory (config,
    vocabulary, TFRecord shards) and holds its lease; deciding again in the
    workers would race with one another.
    """

    lease: str  # the launcher's lease on the run directory: the chief checks it before each write
    checkpoints: Path  # this worker's checkpoint directory (the launcher moves it to and from storage)
    # Called once the strategy has said whether this worker is the chief, with the open run directory.
    on_start: Callable[[bool, rundir.RunDir], None] = lambda chief, run_dir: None


def run(
    cfg: Config,
    *,
    launched: Launched | None = None,
    after_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_now: Callable[[], bool] | None = None,
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
    stop: StopRequest | None = None,
    startup_s: float | None = None,
    reading: ReadAhead | None = None,
    changes: Sequence[str] = (),
) -> Path | None:
    """Train, export and evaluate as ``cfg`` says; return the run directory (None when it is remote).

    ``run.output_dir`` is a local path or a storage URI
    (:mod:`imdb_dist.rundir`): the chief holds its lease for the run, syncs
    it after every checkpoint and publishes the model and report at the end.

    Args:
        cfg: the job.
        launched: this process is a worker a launcher started on a run
            directory it prepared (read the examples from its shards).
        after_checkpoint: called with the latest metrics on every worker right
            after each checkpoint is written (and, on the chief, synced).
        checkpoint_now: asked at every step point, on every worker alike
            (it may be a collective): True saves a checkpoint there, and
            training goes on (under Ray: a preemption notice).
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
    with rundir.RunDir.open(cfg.run.output_dir, retry_s=cfg.run.storage_retry_s) as run_dir:
        with timings.phase("strategy"):
            worker = _start_worker(cfg, ray_worker=launched is not None)
        if worker.chief:
            run_dir.check_writable()
        if launched is not None:
            with timings.phase("data"):
                data = _launched_data(run_dir, launched, chief=worker.chief)
            _check_sizes(cfg, data)
            launched.on_start(worker.chief, run_dir)
            checkpoints = launched.checkpoints
        else:
            opened = _open_run(cfg, run_dir, worker, timings, reading, changes)
            if opened is None:  # already complete
                return None if run_dir.remote else run_dir.work
            data = opened
            checkpoints = run_dir.work / rundir.CHECKPOINTS
        with timings.phase("tokenize"):
            tokenizer, encoded = _tokenize(cfg, run_dir.work, data, worker)

        def saved(metrics: dict[str, Any]) -> None:
            if worker.chief:
                run_dir.sync()  # the checkpoint (if ours to move) and the logs so far
            if after_checkpoint is not None:
                after_checkpoint(metrics)

        model, batches_digest = _train(
            cfg,
            worker,
            run_dir.work,
            tokenizer,
            encoded,
            data,
            checkpoints=checkpoints,
            callbacks=list(extra_callbacks),
            after_save=saved,
            checkpoint_now=checkpoint_now,
            stop=stop,
            timings=timings,
        )
        if worker.chief:
            _finish(
                cfg,
                worker,
                run_dir,
                tokenizer,
                model,
                data.val_reviews(),
                timings,
                time.perf_counter() - started,
                batches_digest=batches_digest,
                validation_movies=data.validation_movies,
            )
        return None if run_dir.remote else run_dir.work


def _start_worker(cfg: Config, *, ray_worker: bool) -> Worker:
    # Devices are read first (that does not initialise the runtime): a job
    # that needs a GPU and has none stops here, before anything is written.
    gpu = check_devices(cfg, ray_worker=ray_worker) and not cfg.distribution.cpu_devices
    # Then the strategy: MultiWorkerMirroredStrategy must be created before
    # any other op initialises the TensorFlow runtime.
    strategy = make_strategy(cfg.distribution)
    replicas = strategy.num_replicas_in_sync
    if cfg.train.batch_size % replicas:
        raise ConfigError(
            "train.batch_size",
            f"global batch {cfg.train.batch_size} is not divisible by {replicas} replicas in sync",
        )
    num_workers, index = worker_index(strategy)
    chief = is_chief(strategy)
    precision = resolve_precision(cfg.train.mixed_precision, gpu=gpu)
    log.info(
        "strategy %s: %d worker(s), %d replica(s) in sync on %s; precision %s; global batch %d",
        type(strategy).__name__,
        num_workers,
        replicas,
        ", ".join(local_devices(strategy)) or "the default device",
        precision,
        cfg.train.batch_size,
    )
    keras.utils.set_random_seed(cfg.train.seed)
    if cfg.train.deterministic:
        # Ops without a deterministic kernel raise instead of varying run to run.
        tf.config.experimental.enable_op_determinism()
    return Worker(strategy, chief, num_workers, index, precision)


def _open_run(
    cfg: Config,
    run_dir: rundir.RunDir,
    worker: Worker,
    timings: Timings,
    reading: ReadAhead | None,
    changes: Sequence[str],
) -> TrainingData | None:
    """Decide new, resume or complete; read and check the data; the chief takes the lease and (re)opens the run.

    Returns the data, or None when the run directory already holds this run, complete.
    """
    if run_dir.holds_complete(cfg, changes):
        return None
    # Read and check the data before creating anything: bad data leaves no run dir.
    with timings.phase("data"):
        data = in_memory_data(cfg, reading.result() if reading is not None else None)
    _check_sizes(cfg, data)
    assert data.digest is not None
    current = fingerprint.Fingerprint.of(cfg, precision=worker.precision, plan_version=plan.PLAN_VERSION,
                                         data=data.digest)
    fingerprint.check(run_dir.work, current, changes)
    if worker.chief and run_dir.take(cfg, current, changes) is None:
        return None
    # Every worker restores the latest checkpoint.
    run_dir.fetch(trees=[rundir.CHECKPOINTS])
    return data


def _launched_data(run_dir: rundir.RunDir, launched: Launched, *, chief: bool) -> TrainingData:
    """The prepared shards a launcher left in the run directory; the chief also gets the logs it continues."""
    run_dir.attach(launched.lease)
    run_dir.fetch([rundir.CONFIG, rundir.VOCAB, rundir.MANIFEST])
    if chief:
        run_dir.fetch([rundir.METRICS, rundir.STEPS, fingerprint.CHANGES, rundir.WORKER_GROUPS])
    manifest = shards.read_manifest(run_dir.work / rundir.PREPARED)
    if manifest is None:
        raise DataError(f"{run_dir}/{rundir.PREPARED} holds no prepared data")
    splits = manifest["splits"]
    run_dir.fetch(f"{rundir.PREPARED}/{name}" for name in [*splits["train"]["files"], *splits["validation"]["files"]])
    return prepared_data(run_dir.work / rundir.PREPARED)


def _check_sizes(cfg: Config, data: TrainingData) -> None:
    if data.n_train < cfg.train.batch_size:
        raise DataError(
            f"{data.n_train} training reviews are fewer than one global batch (train.batch_size {cfg.train.batch_size})"
        )
    if data.n_val == 0:
        raise ConfigError("data.validation_fraction", f"leaves no validation reviews out of {data.n_train}")
    if data.validation_movies is None:
        held_out = "split without movie grouping (the source does not name each review's movie)"
    else:
        held_out = f"the validation reviews' {data.validation_movies} movies are not in training"
    log.info("data: %d training and %d validation reviews; %s", data.n_train, data.n_val, held_out)


def _tokenize(cfg: Config, run_dir: Path, data: TrainingData, worker: Worker) -> tuple[Tokenizer, pipeline.Encoded]:
    """The run's tokenizer and every training example as token ids.

    The tokenizer reuses the run's saved vocabulary when resuming (and under
    ``imdb_dist.launch``, which fits it once before starting the workers),
    else it is fitted on the training split, counted as its reviews are
    split into words. Fitting is deterministic
    (:func:`imdb_dist.data.pipeline.fit_vocabulary`), so workers fitting
    alone derive the same token ids without talking.
    """
    vocabulary = rundir.read_vocab(run_dir)
    words = pipeline.split_examples(data.train_examples(), count=vocabulary is None)
    if vocabulary is None:
        assert words.counts is not None
        vocabulary = pipeline.fit_vocabulary(words.counts, cfg.data.vocab_size)
        if worker.chief:
            rundir.write_vocab(run_dir, vocabulary)
    tokenizer = Tokenizer(vocabulary, cfg.data.vocab_size)
    return tokenizer, pipeline.encode_words(words, tokenizer, cfg.data.max_len)


def _train(
    cfg: Config,
    worker: Worker,
    run_dir: Path,
    tokenizer: Tokenizer,
    encoded: pipeline.Encoded,
    data: TrainingData,
    *,
    checkpoints: Path,
    callbacks: list[keras.callbacks.Callback],
    after_save: Callable[[dict[str, Any]], None] | None,
    checkpoint_now: Callable[[], bool] | None,
    stop: StopRequest | None,
    timings: Timings,
) -> tuple[keras.Model, int | None]:
    """Build the model under the strategy, restore the last checkpoint if any, and train to the end.

    Returns the model and the batch digest of the steps that trained it (:mod:`imdb_dist.digest`).
    """
    global_plan = data_plan(cfg, encoded.lengths)
    steps = global_plan.steps_per_epoch

    def batches(epoch: int, step: int) -> tf.data.Dataset:
        return plan.stream(encoded, global_plan, worker.share, epochs=cfg.train.epochs, start=(epoch, step))

    with timings.phase("build"):
        model, state, checkpointer = _build(cfg, worker, tokenizer.vocabulary_size(), steps, checkpoints)
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
        callback_list = keras.callbacks.CallbackList(
            [*_callbacks(cfg, worker, run_dir, steps, digest), *callbacks],
            add_progbar=worker.chief and sys.stdout.isatty(),
            model=model,
            verbose=1,
            epochs=cfg.train.epochs,
            steps=steps,
        )
    validation, validation_batches = _validation(cfg, worker, tokenizer, data)
    TrainingLoop(
        model,
        schedule=schedule,
        batches=batches,
        validation=validation,
        validation_batches=validation_batches,
        state=state,
        checkpointer=checkpointer,
        callbacks=callback_list,
        after_save=after_save,
        checkpoint_now=checkpoint_now,
        stop=stop or StopRequest(),
        timings=timings,
        digest=digest,
    ).run()
    return model, digest.value


def _build(
    cfg: Config, worker: Worker, vocab: int, steps: int, checkpoints: Path
) -> tuple[keras.Model, ResumeState, Checkpointer]:
    """The compiled model under the strategy, restored from the last checkpoint if there is one."""
    with worker.strategy.scope(), precision_policy(worker.precision):
        model = build_model(cfg.model, vocab_size=vocab)
        decay_steps = steps * cfg.train.epochs if cfg.train.lr_schedule == "cosine" else 0
        compile_model(
            model,
            cfg.train.learning_rate,
            decay_steps=decay_steps,
            dense_sparse_gradients=_dense_embedding_gradient(cfg, worker, vocab),
            transport=cfg.distribution.embedding_transport,
        )
    build_metrics(model, tf.zeros([1, 1], tf.int32))
    build_optimizer(model)
    # Masks keyed on (train.seed, optimizer step, row of the global batch): restored with the step counter.
    key_on_step(model, model.optimizer.iterations, cfg.train.seed)
    state = ResumeState(model, early_stopping=bool(cfg.train.early_stopping_patience))
    checkpointer = Checkpointer(checkpoints, model, state, chief=worker.chief)
    if checkpointer.restore():
        epoch, step = state.position()
        done = int(model.optimizer.iterations.numpy())
        log.info("resuming at epoch %d step %d (optimizer step %d)", epoch + 1, step, done)
    return model, state, checkpointer


def _dense_embedding_gradient(cfg: Config, worker: Worker, vocab: int) -> bool:
    per_replica = cfg.train.batch_size // worker.replicas
    dim, replicas = cfg.model.embedding_dim, worker.replicas
    rows = per_replica * cfg.data.max_len
    transport = cfg.distribution.embedding_transport
    dense = aggregation.dense_embedding_gradient(
        cfg.distribution.embedding_gradient, replicas=replicas, rows=rows, vocab=vocab, dim=dim, transport=transport
    )
    if replicas > 1:
        log.info(
            "embedding gradient: %s all-reduce (%s); per replica and step, gathering a full-length batch "
            "sends %.1f MB, the dense all-reduce in %s %.1f MB",
            f"dense, in {transport}," if dense else "sparse (gathered rows)",
            cfg.distribution.embedding_gradient,
            aggregation.gathered_bytes(rows, dim, replicas) / 1e6,
            transport,
            aggregation.reduced_bytes(vocab, dim, replicas, transport) / 1e6,
        )
    return dense


def _embedding_gradient(model: keras.Model, worker: Worker) -> str | None:
    """``dense, in float32`` / ``dense, in bfloat16`` / ``sparse``, as the run's optimizer reduced it; None: one replica."""
    if worker.replicas == 1:
        return None
    optimizer = model.optimizer
    if isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return f"dense, in {optimizer.transport}" if optimizer.dense_sparse_gradients else "sparse"


def data_plan(cfg: Config, lengths: Any) -> plan.GlobalPlan:
    """The run's global plan over training examples of these token counts."""
    bucketed = cfg.data.bucketing and cfg.data.bucket_width < cfg.data.max_len
    return plan.GlobalPlan(
        lengths,
        batch_size=cfg.train.batch_size,
        seed=cfg.data.seed,
        max_len=cfg.data.max_len,
        min_len=min_length(cfg.model),
        bucket_width=cfg.data.bucket_width if bucketed else None,
    )


def _validation(cfg: Config, worker: Worker, tokenizer: Tokenizer, data: TrainingData) -> tuple[tf.data.Dataset, int]:
    """This worker's validation blocks (:func:`imdb_dist.data.plan.padded_blocks`), and how many there are.

    Reviews padded to max_len, as the export serves them, in global batches
    as large as its scoring's (the LSTM's time loop costs per batch: best.yaml's
    batch of 32 would take 8x the loops), rounded up to split evenly among
    the replicas.
    """
    size = -(-max(cfg.train.batch_size, SCORE_BATCH) // worker.replicas) * worker.replicas
    batches = pipeline.batch_examples(data.val_examples(), tokenizer, max_len=cfg.data.max_len, batch_size=size)
    return plan.padded_blocks(batches, size, worker.share), -(-data.n_val // size)


def _callbacks(
    cfg: Config, worker: Worker, run_dir: Path, steps: int, digest: BatchDigest
) -> list[keras.callbacks.Callback]:
    callbacks: list[keras.callbacks.Callback] = [
        FiniteLoss(),
        EpochMetrics(run_dir / rundir.METRICS if worker.chief else None, cfg.train.batch_size),
    ]
    if worker.chief:
        callbacks.append(
            keras.callbacks.TensorBoard(str(run_dir / rundir.TENSORBOARD), write_graph=False, profile_batch=0)
        )
        callbacks.append(
            StepMetrics(
                run_dir / rundir.STEPS,
                run_dir / rundir.TENSORBOARD,
                every=log_every(cfg.run.log_every_steps, steps),
                steps_per_epoch=steps,
                global_batch=cfg.train.batch_size,
                digest=digest,
                # A terminal has the progress bar; logs (Ray jobs, pods) get a line per point.
                echo=not sys.stdout.isatty(),
            )
        )
    return callbacks


def _finish(
    cfg: Config,
    worker: Worker,
    run_dir: rundir.RunDir,
    tokenizer: Tokenizer,
    model: keras.Model,
    val_set: Reviews,
    timings: Timings,
    wall_s: float,
    *,
    batches_digest: int | None,
    validation_movies: int | None,
) -> None:
    """Export a float32 copy of the model, score it on the validation split, draw the curves, report, publish."""
    work = run_dir.work
    with timings.phase("export"):
        export = _export(cfg, work, tokenizer, model, version=run_dir.next_model_version())
    with timings.phase("score"):
        # Scored through the export itself: the report describes what users will serve.
        validation = metrics(score_texts(load_model(export), val_set.texts), val_set.labels)
    # Drawn after, not in a thread beside the export: the two are mostly
    # Python, and sharing the GIL made the export 3x slower (measured).
    with timings.phase("curves"):
        records = rundir.read_metrics(work / rundir.METRICS)
        plot_curves(records, rundir.read_metrics(work / rundir.STEPS), work / rundir.CURVES)
    process_s = since_process_start()
    report = {
        "validation": validation,
        # Deliberate changes made on resumes (--change), oldest first.
        "changes": fingerprint.read_changes(work),
        # Under Ray: every worker group that trained it (size, cause: start, shrunk, grown, restarted, resubmitted).
        "worker_groups": rundir.read_worker_groups(work),
        # The version of model/ this run published (TF-Serving layout).
        "model_version": int(export.name),
        # A run directory on remote storage: what this process uploaded at each sync (every checkpoint).
        "uploads": run_dir.uploaded,
        "epochs": len(records),
        "stopped_early": len(records) < cfg.train.epochs,
        "optimizer_steps": int(model.optimizer.iterations.numpy()),
        # Every step's global batch that made the model, in order (imdb_dist.digest):
        # equal in two runs that trained the same batches at the same steps, whatever their topology.
        "batches_digest": batches_digest,
        "examples_per_s_median": statistics.median(r["examples_per_s"] for r in records) if records else None,
        "wall_s": wall_s,
        # Seconds per phase of this process (a resumed run: of the resuming
        # process), and from its start to the report.
        "timings": {"phases_s": dict(timings.seconds), "process_s": process_s},
        "strategy": type(worker.strategy).__name__,
        "workers": worker.num_workers,
        "replicas": worker.replicas,
        # Movies of the validation reviews, held out of training as a whole
        # (the source named them); null: the split may share movies.
        "validation_movies": validation_movies,
        "precision": worker.precision,
        # How the replicas all-reduced the embedding gradient (null: one replica, nothing to reduce).
        "embedding_gradient": _embedding_gradient(model, worker),
        "config": to_dict(cfg),
        "versions": {
            "imdb_dist": __version__,
            "data_plan": plan.PLAN_VERSION,
            "tensorflow": tf.__version__,
            "python": platform.python_version(),
        },
    }
    rundir.write_json(work / rundir.REPORT, report)
    with timings.phase("publish"):
        run_dir.publish()
    log.info(
        "time: %s%s",
        timings.summary(),
        f"; {process_s:.1f} s from process start to the report" if process_s is not None else "",
    )
    log.info(
        "done: validation accuracy %.4f auc %.4f (n=%d); model at %s",
        validation["accuracy"],
        validation["auc"],
        validation["n"],
        run_dir.location.child(rundir.MODEL, export.name),
    )


def _export(cfg: Config, run_dir: Path, tokenizer: Tokenizer, model: keras.Model, *, version: int) -> Path:
    # A fresh float32 model outside any strategy: the export then holds plain
    # variables and serves at full speed on CPUs, whatever the training policy.
    serving = build_model(cfg.model, vocab_size=tokenizer.vocabulary_size())
    serving.set_weights(model.get_weights())
    metadata = {
        "max_len": cfg.data.max_len,
        "validation_fraction": cfg.data.validation_fraction,
        "folds": cfg.data.folds,
        "fold": cfg.data.fold,
        "seed": cfg.data.seed,
        "imdb_dist_version": __version__,
    }
    return export_model(run_dir / rundir.MODEL, tokenizer, serving, cfg.data.max_len, metadata, version=version)
