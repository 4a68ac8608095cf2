"""One worker's whole job: data, model under the strategy scope, fit, export, report.

The same ``run(cfg)`` serves every launcher: ``imdb-dist train`` calls it in
process (default or Mirrored strategy), and each Ray Train worker calls it
under MultiWorkerMirroredStrategy. Side effects on the run directory happen
on the chief only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tensorflow as tf
import tf_keras as keras

from imdb_dist import __version__, rundir
from imdb_dist.callbacks import Backup, EpochMetrics, FiniteLoss, read_metrics
from imdb_dist.config import Config, to_dict
from imdb_dist.curves import plot_curves
from imdb_dist.data import pipeline, shards
from imdb_dist.data.sources import Reviews, load_reviews
from imdb_dist.distribute import (
    is_chief,
    make_strategy,
    precision_policy,
    resolve_precision,
    worker_index,
)
from imdb_dist.errors import ConfigError, DataError
from imdb_dist.evaluate import metrics, score_texts
from imdb_dist.export import export_model, load_model
from imdb_dist.interrupt import StopRequest
from imdb_dist.model import build_model, compile_model, min_length

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


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """Where this worker's examples come from: reviews in memory, or prepared shards."""

    n_train: int
    n_val: int
    # (num_workers, worker index) -> that worker's (text, label) examples.
    train_examples: Callable[[int, int], tf.data.Dataset]
    val_examples: Callable[[], tf.data.Dataset]
    val_reviews: Callable[[], Reviews]
    train_texts: Callable[[], tf.data.Dataset]


def in_memory_data(cfg: Config) -> TrainingData:
    """Read the configured source now (raising DataError on bad data)."""
    train, val = load_reviews(cfg.data, "train"), load_reviews(cfg.data, "validation")

    def train_examples(num_workers: int, index: int) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices((train.texts, train.labels)).shard(num_workers, index)

    return TrainingData(
        n_train=len(train),
        n_val=len(val),
        train_examples=train_examples,
        val_examples=lambda: tf.data.Dataset.from_tensor_slices((val.texts, val.labels)),
        val_reviews=lambda: val,
        train_texts=lambda: tf.data.Dataset.from_tensor_slices(train.texts),
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
        train_examples=lambda num_workers, index: shards.examples(train_files, num_workers, index),
        val_examples=lambda: shards.examples(val_files),
        val_reviews=lambda: shards.load_split(directory, "validation"),
        train_texts=lambda: shards.examples(train_files).map(lambda text, _: text),
    )


def run(
    cfg: Config,
    *,
    prepared: Path | None = None,
    backup_dir: Path | None = None,
    after_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
    stop: StopRequest | None = None,
) -> Path:
    """Train, export and evaluate as ``cfg`` says; return the run directory.

    Args:
        cfg: the job.
        prepared: read examples from these prepared shards instead of the
            configured source (multi-worker runs; see ``imdb_dist.launch``,
            which then owns the run directory's resume checks and config).
        backup_dir: where checkpoints live (default ``run_dir/checkpoints``).
        after_checkpoint: called with the latest metrics on every worker right
            after each checkpoint is written.
        extra_callbacks: more Keras callbacks for ``fit`` (run before checkpointing).
        stop: a signal-driven stop request (``imdb_dist.interrupt``): when it
            is set during training, checkpoint after the current step and raise
            ``Interrupted``.

    Raises:
        InputError: bad config, data or output directory (nothing is written).
        RunError: the loss diverged or a checkpoint could not be written (the
            last good checkpoint is kept); ``Interrupted`` after a stop request.
    """
    started = time.perf_counter()
    worker = _start_worker(cfg)
    run_dir = Path(cfg.run.output_dir)
    if prepared is not None:
        # The launcher has checked and opened the run dir before starting the
        # workers: deciding again here would race with the other workers.
        data = prepared_data(prepared)
        _check_sizes(cfg, data)
    else:
        if _already_complete(cfg, run_dir):
            return run_dir
        # Read and check the data before creating anything: bad data leaves no run dir.
        data = in_memory_data(cfg)
        _check_sizes(cfg, data)
        if worker.chief:
            rundir.begin(run_dir, cfg)
    vectorizer = _vectorizer(cfg, run_dir, data, worker)
    # Last of the callbacks, so an epoch's checkpoint is written only after its
    # metrics line: a crash in between re-runs that epoch, and EpochMetrics drops
    # the stale line. Under MultiWorkerMirroredStrategy, non-chief workers write
    # their copy to temporary dirs that are removed after each save.
    checkpoints = Backup(
        str(backup_dir or run_dir / rundir.CHECKPOINTS),
        cfg.run.checkpoint_steps,
        after_save=after_checkpoint,
        stop=stop,
    )
    model = _fit(cfg, worker, run_dir, vectorizer, data, [*extra_callbacks, checkpoints])
    if worker.chief:
        _finish(cfg, worker, run_dir, vectorizer, model, data.val_reviews(), time.perf_counter() - started)
    return run_dir


def _start_worker(cfg: Config) -> Worker:
    # The strategy comes first: MultiWorkerMirroredStrategy must be created
    # before any other op initialises the TensorFlow runtime.
    strategy = make_strategy(cfg.distribution)
    replicas = strategy.num_replicas_in_sync
    if cfg.train.batch_size % replicas:
        raise ConfigError(
            "train.batch_size",
            f"global batch {cfg.train.batch_size} is not divisible by {replicas} replicas in sync",
        )
    num_workers, index = worker_index(strategy)
    chief = is_chief(strategy)
    precision = resolve_precision(cfg.train.mixed_precision)
    if chief:
        rundir.check_writable(Path(cfg.run.output_dir))
    log.info(
        "strategy %s: %d worker(s), %d replica(s) in sync; precision %s; global batch %d",
        type(strategy).__name__,
        num_workers,
        replicas,
        precision,
        cfg.train.batch_size,
    )
    keras.utils.set_random_seed(cfg.train.seed)
    return Worker(strategy, chief, num_workers, index, precision)


def _already_complete(cfg: Config, run_dir: Path) -> bool:
    """Check a previous run in ``run_dir``; True if it already finished this exact job."""
    if rundir.already_complete(run_dir, cfg):
        log.info("%s already holds a complete run of this config; nothing to do", run_dir)
        return True
    done = read_metrics(run_dir / rundir.METRICS)
    if done:
        log.info("resuming the run in %s after epoch %d, from its last checkpoint", run_dir, done[-1]["epoch"])
    return False


def _check_sizes(cfg: Config, data: TrainingData) -> None:
    if data.n_train < cfg.train.batch_size:
        raise DataError(
            f"{data.n_train} training reviews are fewer than one global batch (train.batch_size {cfg.train.batch_size})"
        )
    if data.n_val == 0:
        raise ConfigError("data.validation_fraction", f"leaves no validation reviews out of {data.n_train}")
    log.info("data: %d training and %d validation reviews", data.n_train, data.n_val)


def _vectorizer(cfg: Config, run_dir: Path, data: TrainingData, worker: Worker) -> keras.layers.TextVectorization:
    """Reuse the run's saved vocabulary when resuming, else adapt on the training split.

    ``adapt`` is deterministic (tokens sorted by count, then by value), so every
    worker derives the same token ids from the same data without talking to the others.
    """
    saved = rundir.read_vocab(run_dir)
    if saved is not None:
        return pipeline.make_vectorizer(cfg.data.vocab_size, saved)
    vectorizer = pipeline.make_vectorizer(cfg.data.vocab_size)
    vectorizer.adapt(data.train_texts().batch(1024))
    if worker.chief:
        rundir.write_vocab(run_dir, pipeline.vocabulary(vectorizer))
    return vectorizer


def _datasets(
    cfg: Config, worker: Worker, vectorizer: keras.layers.TextVectorization, data: TrainingData
) -> tuple[Any, tf.data.Dataset]:
    options = {
        "max_len": cfg.data.max_len,
        "min_len": min_length(cfg.model),
        "bucket_width": cfg.data.bucket_width if cfg.data.bucketing else None,
    }

    def train_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        # One input pipeline per worker, each on its own shard of the reviews,
        # batched per replica.
        return pipeline.batch_examples(
            data.train_examples(context.num_input_pipelines, context.input_pipeline_id),
            vectorizer,
            batch_size=context.get_per_replica_batch_size(cfg.train.batch_size),
            shuffle_seed=cfg.data.seed,
            shuffle_buffer=cfg.data.shuffle_buffer,
            repeat=True,
            **options,
        )

    train = worker.strategy.distribute_datasets_from_function(train_fn)
    # Validation stays a plain dataset of global batches: Keras splits each
    # batch across replicas and workers, and runs it to the end every epoch.
    val = pipeline.batch_examples(data.val_examples(), vectorizer, batch_size=cfg.train.batch_size, **options)
    if cfg.train.steps_per_execution > 1:
        # Keras must know how many validation batches there are to group them
        # into executions; bucketing hides that, so count them (this pass also
        # fills the validation cache).
        batches = int(val.reduce(0, lambda count, _: count + 1))
        val = val.apply(tf.data.experimental.assert_cardinality(batches))
    shard_by_data = tf.data.Options()
    shard_by_data.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return train, val.with_options(shard_by_data)


def _fit(
    cfg: Config,
    worker: Worker,
    run_dir: Path,
    vectorizer: keras.layers.TextVectorization,
    data: TrainingData,
    last_callbacks: list[keras.callbacks.Callback],
) -> keras.Model:
    train_ds, val_ds = _datasets(cfg, worker, vectorizer, data)
    # Every worker runs the same number of steps, whatever the size of its shard.
    steps = math.ceil(data.n_train / cfg.train.batch_size)
    with worker.strategy.scope(), precision_policy(worker.precision):
        model = build_model(cfg.model, vocab_size=vectorizer.vocabulary_size())
        decay_steps = steps * cfg.train.epochs if cfg.train.lr_schedule == "cosine" else 0
        compile_model(model, cfg.train.learning_rate, cfg.train.steps_per_execution, decay_steps)
    callbacks = _callbacks(cfg, worker, run_dir, steps * cfg.train.batch_size) + last_callbacks
    model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=cfg.train.epochs,
        steps_per_epoch=steps,
        callbacks=callbacks,
        verbose=1 if worker.chief and sys.stdout.isatty() else 0,
    )
    return model


def _callbacks(cfg: Config, worker: Worker, run_dir: Path, examples_per_epoch: int) -> list[keras.callbacks.Callback]:
    callbacks: list[keras.callbacks.Callback] = [
        FiniteLoss(),
        EpochMetrics(run_dir / rundir.METRICS if worker.chief else None, examples_per_epoch),
    ]
    if cfg.train.early_stopping_patience:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=cfg.train.early_stopping_patience, restore_best_weights=True
            )
        )
    if worker.chief:
        callbacks.append(
            keras.callbacks.TensorBoard(str(run_dir / rundir.TENSORBOARD), write_graph=False, profile_batch=0)
        )
    return callbacks


def _finish(
    cfg: Config,
    worker: Worker,
    run_dir: Path,
    vectorizer: keras.layers.TextVectorization,
    model: keras.Model,
    val_set: Reviews,
    wall_s: float,
) -> None:
    """Export a float32 copy of the model, score the validation split with it, write the report."""
    # A fresh float32 model outside any strategy: the export then holds plain
    # variables and serves at full speed on CPUs, whatever the training policy.
    serving = build_model(cfg.model, vocab_size=vectorizer.vocabulary_size())
    serving.set_weights(model.get_weights())
    metadata = {
        "max_len": cfg.data.max_len,
        "validation_fraction": cfg.data.validation_fraction,
        "seed": cfg.data.seed,
        "imdb_dist_version": __version__,
    }
    export = export_model(run_dir / rundir.MODEL, vectorizer, serving, cfg.data.max_len, metadata)
    # Scored through the export itself: the report describes what users will serve.
    validation = metrics(score_texts(load_model(export), val_set.texts), val_set.labels)
    records = read_metrics(run_dir / rundir.METRICS)
    plot_curves(records, run_dir / rundir.CURVES)
    report = {
        "validation": validation,
        "epochs": len(records),
        "stopped_early": len(records) < cfg.train.epochs,
        "optimizer_steps": int(model.optimizer.iterations.numpy()),
        "examples_per_s_median": statistics.median(r["examples_per_s"] for r in records) if records else None,
        "wall_s": wall_s,
        "strategy": type(worker.strategy).__name__,
        "workers": worker.num_workers,
        "replicas": worker.replicas,
        "precision": worker.precision,
        "config": to_dict(cfg),
        "versions": {"imdb_dist": __version__, "tensorflow": tf.__version__, "python": platform.python_version()},
    }
    rundir.write_json(run_dir / rundir.REPORT, report)
    log.info(
        "done: validation accuracy %.4f auc %.4f (n=%d); model at %s",
        validation["accuracy"],
        validation["auc"],
        validation["n"],
        export,
    )
