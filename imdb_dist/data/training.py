"""The training job's examples: where they come from (reviews in memory, or a prepared token store), as token ids.

In one process the reviews are read and tokenized in memory; a Ray worker
reads the token store the launcher prepared (:mod:`imdb_dist.data.store`),
only the rows the global plan (:mod:`imdb_dist.data.plan`) gives it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf

from imdb_dist.config import DataConfig
from imdb_dist.data import pipeline, plan, shards, store
from imdb_dist.data.pipeline import Tokenizer
from imdb_dist.data.sources import Reviews, load_training_splits, movies
from imdb_dist.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """The training and validation examples of a run, read lazily as datasets."""

    n_train: int
    n_val: int
    train_examples: Callable[[], tf.data.Dataset] | None  # (text, label), in the split's order; None: stored
    val_examples: Callable[[], tf.data.Dataset] | None
    val_reviews: Callable[[], Reviews]  # the text, for scoring the export
    # The (train, validation) reviews when they are in memory (their content is the run's
    # fingerprint: imdb_dist.fingerprint.data_digest); None for prepared shards (the launcher checked them).
    reviews: tuple[Reviews, Reviews] | None = None
    # How many movies the validation reviews are about, none of them in
    # training, where the source names each review's movie; None where it does not.
    validation_movies: int | None = None
    # The (train, validation) token store a launcher prepared: no text, no tokenizing.
    stores: tuple[store.TokenStore, store.TokenStore] | None = None


def in_memory_data(cfg: DataConfig, splits: tuple[Reviews, Reviews] | None = None) -> TrainingData:
    """The ``(train, validation)`` reviews given, else the configured source's, read now (DataError on bad data)."""
    train, val = splits if splits is not None else load_training_splits(cfg)
    return TrainingData(
        n_train=len(train),
        n_val=len(val),
        train_examples=lambda: tf.data.Dataset.from_tensor_slices((train.texts, train.labels)),
        val_examples=lambda: tf.data.Dataset.from_tensor_slices((val.texts, val.labels)),
        val_reviews=lambda: val,
        reviews=(train, val),
        validation_movies=movies(val),
    )


def prepared_data(
    directory: Path, files: store.Files, vocabulary: list[str], fetch_text: Callable[[], None]
) -> TrainingData:
    """The token store ``imdb_dist.prepare`` wrote (its manifest in ``directory``), read from ``files``.

    ``fetch_text`` brings the validation text's shards into ``directory`` (the chief's, at the end).

    Raises:
        DataError: no store, a file missing or cut short, or ids of another vocabulary.
    """
    manifest = shards.read_manifest(directory)
    if manifest is None:
        raise DataError(f"{directory} holds no prepared data")
    train = store.open_split(files, manifest.get("store"), "train", vocabulary)
    val = store.open_split(files, manifest.get("store"), "validation", vocabulary)

    def val_reviews() -> Reviews:
        fetch_text()
        return shards.load_split(directory, "validation")

    return TrainingData(
        n_train=len(train),
        n_val=len(val),
        train_examples=None,
        val_examples=None,
        val_reviews=val_reviews,
        validation_movies=manifest["meta"].get("validation_movies"),
        stores=(train, val),
    )


def check_sizes(data: TrainingData, batch_size: int) -> None:
    """Refuse data without a global batch of training or any validation reviews; log what the run trains on."""
    if data.n_train < batch_size:
        raise DataError(
            f"{data.n_train} training reviews are fewer than one global batch (train.batch_size {batch_size})"
        )
    if data.n_val == 0:
        raise ConfigError("data.validation_fraction", f"leaves no validation reviews out of {data.n_train}")
    if data.validation_movies is None:
        held_out = "split without movie grouping (the source does not name each review's movie)"
    else:
        held_out = f"the validation reviews' {data.validation_movies} movies are not in training"
    log.info("data: %d training and %d validation reviews; %s", data.n_train, data.n_val, held_out)


def tokenize(cfg: DataConfig, data: TrainingData, vocabulary: list[str] | None) -> tuple[Tokenizer, plan.Examples]:
    """The run's tokenizer and every training example as token ids (a prepared store's, as they are).

    The tokenizer reuses the run's saved ``vocabulary`` when there is one
    (a resume, and under ``imdb_dist.launch``, which fits it once before
    starting the workers), else it is fitted on the training split, counted
    as its reviews are split into words. Fitting is deterministic
    (:func:`imdb_dist.data.pipeline.fit_vocabulary`), so workers fitting
    alone derive the same token ids without talking.
    """
    if data.stores is not None:
        assert vocabulary is not None  # the launcher saved it with the store
        return Tokenizer(vocabulary, cfg.vocab_size), data.stores[0]
    assert data.train_examples is not None
    words = pipeline.split_examples(data.train_examples(), count=vocabulary is None)
    if vocabulary is None:
        assert words.counts is not None
        vocabulary = pipeline.fit_vocabulary(words.counts, cfg.vocab_size)
    tokenizer = Tokenizer(vocabulary, cfg.vocab_size)
    return tokenizer, pipeline.encode_words(words, tokenizer, cfg.max_len)


def validation_blocks(
    data: TrainingData, tokenizer: Tokenizer, *, max_len: int, batch_size: int, share: plan.Share
) -> tuple[tf.data.Dataset, int]:
    """This worker's validation blocks (:func:`imdb_dist.data.plan.padded_blocks`), and how many there are.

    Reviews padded to ``max_len``, as the export serves them, in global
    batches of ``batch_size`` rounded up to split evenly among the replicas.
    """
    replicas = share.replicas
    size = -(-batch_size // replicas) * replicas
    if data.stores is not None:
        return stored_blocks(data.stores[1], max_len=max_len, batch_size=size, share=share), -(-data.n_val // size)
    assert data.val_examples is not None
    batches = pipeline.batch_examples(data.val_examples(), tokenizer, max_len=max_len, batch_size=size)
    return plan.padded_blocks(batches, size, share), -(-data.n_val // size)


def stored_blocks(val: store.TokenStore, *, max_len: int, batch_size: int, share: plan.Share) -> tf.data.Dataset:
    """:func:`validation_blocks` read from the token store: this worker reads its rows only, once (cached).

    The same blocks as from the text: rows pre-padded to ``max_len``, the last
    global batch filled with rows of weight 0.
    """
    rows = share.rows(batch_size)
    n = len(val)

    def block(batch: np.int64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        index = int(batch) * batch_size + np.arange(rows.start, rows.stop)
        real = index[index < n]
        values, lengths = val.rows(real)
        tokens = np.zeros((len(index), max_len), np.int64)
        # Pre-padding: each row's ids fill its last lengths[r] columns, in row-major order.
        tokens[: len(real)][np.arange(max_len)[None, :] >= (max_len - lengths)[:, None]] = values
        labels = np.zeros(len(index), np.int32)
        labels[: len(real)] = val.labels[real]
        return tokens, labels, (index < n).astype(np.float32)

    def read(batch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        tokens, labels, weights = tf.numpy_function(block, [batch], [tf.int64, tf.int32, tf.float32], stateful=False)
        block_rows = rows.stop - rows.start
        tokens.set_shape([block_rows, max_len])
        labels.set_shape([block_rows])
        weights.set_shape([block_rows])
        return tokens, labels, weights

    batches = tf.data.Dataset.range(-(-n // batch_size))
    return batches.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).cache().prefetch(tf.data.AUTOTUNE)
