"""What a worker trains: its inputs, tokenized; the model built under its strategy and restored; the data plan.

The model is compiled for the run's schedule and aggregation route, its
metrics and optimizer slots are built before the restore (so that the
checkpoint restores them all), and its dropout is keyed on the optimizer
step, which the restore sets. :func:`imdb_dist.train.run` calls these.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import tensorflow as tf
import tf_keras as keras

from imdb_dist import rundir
from imdb_dist.checkpoint import Checkpointer, ResumeState
from imdb_dist.config import Config
from imdb_dist.data import plan, shards, store
from imdb_dist.data.pipeline import Tokenizer
from imdb_dist.data.training import TrainingData, prepared_data, tokenize
from imdb_dist.distribute import Worker, dense_embedding_gradient, precision_policy
from imdb_dist.dropout import key_on_step
from imdb_dist.errors import DataError
from imdb_dist.loop import build_metrics, build_optimizer
from imdb_dist.model import build_model, compile_model, min_length

log = logging.getLogger(__name__)


def prepared_inputs(run_dir: rundir.RunDir, lease: str, *, chief: bool) -> TrainingData:
    """The token store a launcher prepared in the run directory, under its ``lease``; the chief also gets the logs it continues.

    The store is read in place (a remote one by ranged reads): only the
    manifest, the vocabulary and the store's lengths and labels are fetched whole.
    """
    run_dir.attach(lease)
    run_dir.fetch([rundir.CONFIG, rundir.VOCAB, rundir.MANIFEST])
    if chief:
        run_dir.fetch([rundir.METRICS, rundir.STEPS, rundir.CHANGES, rundir.WORKER_GROUPS])
    directory = run_dir.work / rundir.PREPARED
    manifest = shards.read_manifest(directory)
    vocabulary = run_dir.vocabulary()
    if manifest is None or vocabulary is None:
        raise DataError(f"{run_dir}/{rundir.PREPARED} holds no prepared data")
    text = [f"{rundir.PREPARED}/{name}" for name in manifest["splits"]["validation"]["files"]]
    files = store.files_at(run_dir.location.child(rundir.PREPARED), directory)
    return prepared_data(directory, files, vocabulary, fetch_text=lambda: run_dir.fetch(text))


def tokenized(
    cfg: Config, run_dir: rundir.RunDir, data: TrainingData, *, chief: bool
) -> tuple[Tokenizer, plan.Examples]:
    """The run's tokenizer (its saved vocabulary, else fitted and saved by the chief) and the examples as token ids."""
    vocabulary = run_dir.vocabulary()
    tokenizer, examples = tokenize(cfg.data, data, vocabulary)
    if vocabulary is None and chief:
        run_dir.write_vocabulary(tokenizer.vocabulary)
    return tokenizer, examples


def restored_model(
    cfg: Config, worker: Worker, vocab: int, steps: int, checkpoints: Path
) -> tuple[keras.Model, ResumeState, Checkpointer]:
    """The compiled model under the strategy, restored from the last checkpoint in ``checkpoints`` if there is one.

    Args:
        cfg: the job.
        worker: this worker's strategy, precision and replicas.
        vocab: the vocabulary's size, padding and unknown included.
        steps: optimizer steps an epoch (a cosine schedule spans the run's).
        checkpoints: this worker's checkpoint directory.

    Returns:
        The model, its resume state (position, early stopping, batch digest)
        and the checkpointer that saves both.
    """
    with worker.strategy.scope(), precision_policy(worker.precision):
        model = build_model(cfg.model, vocab_size=vocab)
        compile_model(
            model,
            cfg.train.learning_rate,
            decay_steps=steps * cfg.train.epochs if cfg.train.lr_schedule == "cosine" else 0,
            dense_sparse_gradients=dense_embedding_gradient(
                cfg.distribution, replicas=worker.replicas, vocab=vocab, dim=cfg.model.embedding_dim,
                rows=cfg.train.batch_size // worker.replicas * cfg.data.max_len,
            ),
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
