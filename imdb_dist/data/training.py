"""The training job's examples: where they come from (reviews in memory, or prepared shards), and as token ids.

Every worker reads every training example, in the same order (the global
plan indexes them: :mod:`imdb_dist.data.plan`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import tensorflow as tf

from imdb_dist.config import DataConfig
from imdb_dist.data import pipeline, plan, shards
from imdb_dist.data.pipeline import Tokenizer
from imdb_dist.data.sources import Reviews, load_training_splits, movies
from imdb_dist.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """The training and validation examples of a run, read lazily as datasets."""

    n_train: int
    n_val: int
    train_examples: Callable[[], tf.data.Dataset]  # (text, label), in the split's order
    val_examples: Callable[[], tf.data.Dataset]
    val_reviews: Callable[[], Reviews]
    # The (train, validation) reviews when they are in memory (their content is the run's
    # fingerprint: imdb_dist.fingerprint.data_digest); None for prepared shards (the launcher checked them).
    reviews: tuple[Reviews, Reviews] | None = None
    # How many movies the validation reviews are about, none of them in
    # training, where the source names each review's movie; None where it does not.
    validation_movies: int | None = None


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


def prepared_data(directory: Path) -> TrainingData:
    """Examples from the TFRecord shards ``imdb_dist.prepare`` wrote in ``directory``."""
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


def tokenize(cfg: DataConfig, data: TrainingData, vocabulary: list[str] | None) -> tuple[Tokenizer, pipeline.Encoded]:
    """The run's tokenizer and every training example as token ids.

    The tokenizer reuses the run's saved ``vocabulary`` when there is one
    (a resume, and under ``imdb_dist.launch``, which fits it once before
    starting the workers), else it is fitted on the training split, counted
    as its reviews are split into words. Fitting is deterministic
    (:func:`imdb_dist.data.pipeline.fit_vocabulary`), so workers fitting
    alone derive the same token ids without talking.
    """
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
    batches = pipeline.batch_examples(data.val_examples(), tokenizer, max_len=max_len, batch_size=size)
    return plan.padded_blocks(batches, size, share), -(-data.n_val // size)
