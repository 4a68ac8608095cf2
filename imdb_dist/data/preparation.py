"""Tokenize once: count the training words, fit the vocabulary, write every review's ids to the token store.

Two engines do the same work with the same TensorFlow string ops
(:func:`imdb_dist.data.pipeline.split_words`, :class:`Tokenizer`), in
blocks of :data:`BLOCK` reviews:

- :class:`LocalEngine`: this process, tf.data's parallel batches;
- :class:`RayDataEngine`: a Ray Data job across the cluster's CPUs (the
  launcher's, before the training workers start). Counting and encoding are
  Ray tasks, so the worker processes that imported TensorFlow to count are
  the ones that encode.

Word counts are summed per word whatever the blocks, and the vocabulary is a
pure function of the totals (:func:`imdb_dist.data.pipeline.fit_vocabulary`),
so both engines fit the vocabulary an in-memory run fits; the encoded blocks
come back in order and one writer streams them to disk, so both write the
same bytes (tested).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from imdb_dist.data import store
from imdb_dist.data.pipeline import WordCounts, fit_vocabulary
from imdb_dist.data.sources import Reviews
from imdb_dist.errors import DataError

log = logging.getLogger(__name__)

# Reviews per block: a Ray Data block and task, and the local engine's unit
# (about 6 MB of IMDB text; big enough that a task's overhead is noise).
BLOCK = 4096
# Blocks of counts merged at once on the driver (bounds its memory on a large corpus).
_MERGE_EVERY = 64

EncodedBlock = tuple[np.ndarray, np.ndarray, np.ndarray]  # ids one after another, ids per review, labels


class Engine(Protocol):
    """What tokenizing a corpus takes: word counts, then every review's ids in order."""

    name: str

    def counts(self, texts: Sequence[str]) -> pa.Table:
        """Columns ``token`` (binary, distinct) and ``count`` (int64): every word of ``texts`` and how often it occurs."""

    def encode(self, reviews: Reviews, vocabulary: list[str], *, vocab_size: int, max_len: int) -> Iterator[EncodedBlock]:
        """Every review's last ``max_len`` ids, block by block in the reviews' order."""


def write_store(
    directory: Path, splits: dict[str, Reviews], engine: Engine, *, vocab_size: int, max_len: int
) -> tuple[list[str], dict[str, Any]]:
    """Fit the vocabulary on ``splits["train"]`` and write every split's ids into ``directory``.

    Returns the vocabulary and the manifest's ``store`` entry.

    Raises:
        DataError: the training split has no reviews, or a review's ids do not fit the store's types.
    """
    if not len(splits["train"]):
        raise DataError("the training split holds no reviews: nothing to fit a vocabulary on")
    started = time.perf_counter()
    counts = engine.counts(splits["train"].texts)
    vocabulary = fit_vocabulary(_word_counts(counts), vocab_size)
    counted = time.perf_counter()
    entries = {}
    for name, reviews in splits.items():
        writer = store.SplitWriter(directory, name, vocab_size=vocab_size, max_len=max_len)
        for values, lengths, labels in engine.encode(reviews, vocabulary, vocab_size=vocab_size, max_len=max_len):
            writer.append(values, lengths, labels)
        entries[name] = writer.close()
    log.info("tokenized %s with %s: counted %d distinct words in %.1f s, wrote the token store in %.1f s",
             " and ".join(f"{entry['examples']} {name}" for name, entry in entries.items()), engine.name,
             counts.num_rows, counted - started, time.perf_counter() - counted)
    return vocabulary, store.section(entries, vocabulary=vocabulary, max_len=max_len, vocab_size=vocab_size)


def merge_counts(tables: Sequence[pa.Table]) -> pa.Table:
    """Sum the counts of each token over ``tables`` (columns ``token``, ``count``)."""
    if not tables:
        return pa.table({"token": pa.array([], pa.binary()), "count": pa.array([], pa.int64())})
    merged = pa.concat_tables(tables).group_by("token").aggregate([("count", "sum")])
    return pa.table({"token": merged["token"], "count": merged["count_sum"]})


def _word_counts(table: pa.Table) -> WordCounts:
    tokens = np.array(table["token"].to_pylist(), dtype=object)
    return WordCounts(tokens, table["count"].to_numpy().astype(np.int64))


def _blocks(n: int) -> Iterator[slice]:
    for start in range(0, n, BLOCK):
        yield slice(start, min(start + BLOCK, n))


# -- The work on one block, the same in either engine (these run in Ray tasks too). --

def _tensorflow() -> Any:
    """TensorFlow, imported without its native start-up lines (a Ray task's first import prints them on the driver)."""
    from imdb_dist.logs import native_startup_filtered

    with native_startup_filtered():
        import tensorflow as tf

        tf.config.list_physical_devices()
    return tf


def count_block(texts: Any) -> pa.Table:
    """Every word of a block of texts, and how often it occurs there."""
    tf = _tensorflow()
    from imdb_dist.data.pipeline import split_words

    tokens, _, counts = tf.unique_with_counts(split_words(tf.constant(texts, tf.string)).flat_values, out_idx=tf.int64)
    return pa.table({"token": pa.array(tokens.numpy().tolist(), pa.binary()), "count": pa.array(counts.numpy())})


_TOKENIZERS: dict[tuple[str, int], Any] = {}


def _tokenizer(vocabulary: list[str], vocab_size: int) -> Any:
    """One Tokenizer per vocabulary per process: a Ray worker that encodes many blocks builds its table once."""
    from imdb_dist.data.pipeline import Tokenizer

    key = (store.vocabulary_digest(vocabulary), vocab_size)
    if key not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = Tokenizer(vocabulary, vocab_size)
    return _TOKENIZERS[key]


def encode_block(texts: Any, vocabulary: list[str], *, vocab_size: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """A block's ids, each review cut to its last ``max_len``: ``(ids one after another, ids per review)``."""
    tf = _tensorflow()
    from imdb_dist.data.pipeline import encode

    ids = encode(_tokenizer(vocabulary, vocab_size), tf.constant(texts, tf.string), max_len)
    return ids.flat_values.numpy().astype(store.id_dtype(vocab_size)), ids.row_lengths().numpy()


class LocalEngine:
    """One process: each block's string ops run on TensorFlow's threads."""

    name = "one local process"

    def counts(self, texts: Sequence[str]) -> pa.Table:
        merged: list[pa.Table] = []
        for part in _blocks(len(texts)):
            merged.append(count_block(list(texts[part])))
            if len(merged) >= _MERGE_EVERY:
                merged = [merge_counts(merged)]
        return merge_counts(merged)

    def encode(self, reviews: Reviews, vocabulary: list[str], *, vocab_size: int, max_len: int) -> Iterator[EncodedBlock]:
        for part in _blocks(len(reviews)):
            values, lengths = encode_block(list(reviews.texts[part]), vocabulary, vocab_size=vocab_size, max_len=max_len)
            yield values, lengths, reviews.labels[part]


def _count_task(batch: pa.Table) -> pa.Table:
    return count_block(batch["text"].to_pylist())


def _encode_task(batch: pa.Table, vocabulary: list[str], vocab_size: int, max_len: int) -> pa.Table:
    values, lengths = encode_block(batch["text"].to_pylist(), vocabulary, vocab_size=vocab_size, max_len=max_len)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.table({"ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)), "label": batch["label"]})


class RayDataEngine:
    """A Ray Data job on the connected cluster: one task a block, ``workers`` at a time (None: Ray Data decides)."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers
        self.name = f"Ray Data ({workers} workers)" if workers else "Ray Data"

    def _dataset(self, texts: Sequence[str], labels: np.ndarray | None = None) -> Any:
        import ray.data

        tables = []
        for part in _blocks(len(texts)):
            columns = {"text": pa.array(list(texts[part]), pa.large_string())}
            if labels is not None:
                columns["label"] = pa.array(labels[part].astype(np.uint8))
            tables.append(pa.table(columns))
        return ray.data.from_arrow(tables)

    def _options(self, reviews: int) -> dict[str, Any]:
        import ray.data

        options: dict[str, Any] = {"batch_format": "pyarrow", "batch_size": None, "num_cpus": 1}
        if self.workers:
            blocks = -(-reviews // BLOCK)  # no more tasks at once than there are blocks
            options["compute"] = ray.data.TaskPoolStrategy(size=max(1, min(self.workers, blocks)))
        return options

    def counts(self, texts: Sequence[str]) -> pa.Table:
        with _quiet_in_order():
            counted = self._dataset(texts).map_batches(_count_task, **self._options(len(texts)))
            merged: list[pa.Table] = []
            for table in counted.iter_batches(batch_format="pyarrow", batch_size=None):
                merged.append(table)
                if len(merged) >= _MERGE_EVERY:
                    merged = [merge_counts(merged)]
            return merge_counts(merged)

    def encode(self, reviews: Reviews, vocabulary: list[str], *, vocab_size: int, max_len: int) -> Iterator[EncodedBlock]:
        if not len(reviews):
            return
        with _quiet_in_order():
            encoded = self._dataset(reviews.texts, reviews.labels).map_batches(
                _encode_task, fn_kwargs={"vocabulary": vocabulary, "vocab_size": vocab_size, "max_len": max_len},
                **self._options(len(reviews)),
            )
            for table in encoded.iter_batches(batch_format="pyarrow", batch_size=None):
                ids = table["ids"].combine_chunks()
                yield (ids.flatten().to_numpy(), ids.value_lengths().to_numpy(),
                       table["label"].to_numpy())


@contextlib.contextmanager
def _quiet_in_order() -> Iterator[None]:
    """Ray Data in input order (the store is written in the reviews' order), without its progress bars."""
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    try:
        yield
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
