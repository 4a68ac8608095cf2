"""The tf.data input pipeline: tokenize, pre-pad, cache, shuffle, bucket, prefetch.

One chain, read top to bottom in :func:`make_dataset`::

    (text, label) ─► batch ─► vectorize (parallel) ─► unbatch ─► cache
                  ─► shuffle ─► repeat ─► bucket-or-pad batch ─► pre-pad ─► prefetch

Examples come from memory (:func:`make_dataset`) or from prepared TFRecord
shards (:mod:`imdb_dist.data.shards`); either way a worker's share is picked
before any tokenization work.

Sequences are *pre*-padded and *pre*-truncated (the last ``max_len`` tokens
are kept, zeros go in front) so the LSTM's final state is read right after
the last real token instead of after a run of padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf
import tf_keras as keras

# Characters that are neither letters, digits nor whitespace (Unicode-aware,
# so non-English reviews keep their words). Apostrophes are dropped, not
# split on, so "don't" (or "don’t") stays one token.
_PUNCTUATION = r"[^\pL\pN\s]+"
_LINE_BREAK = r"<br\s*/?>"
# Texts per vectorizer call: batching the string ops is several times faster
# than calling the layer once per review.
_ENCODE_BATCH = 256


def standardize(texts: tf.Tensor) -> tf.Tensor:
    """Lowercase, replace ``<br />`` markup and punctuation with spaces."""
    texts = tf.strings.lower(texts, encoding="utf-8")
    texts = tf.strings.regex_replace(texts, _LINE_BREAK, " ")
    texts = tf.strings.regex_replace(texts, "['’]", "")
    return tf.strings.regex_replace(texts, _PUNCTUATION, " ")


def make_vectorizer(vocab_size: int, vocabulary: Sequence[str] | None = None) -> keras.layers.TextVectorization:
    """A TextVectorization layer that emits ragged token ids (0 = padding, 1 = unknown).

    Args:
        vocab_size: total ids, including padding and the unknown token.
        vocabulary: a saved vocabulary (without the two special tokens) to
            reuse; otherwise call :func:`adapt_vectorizer`.
    """
    return keras.layers.TextVectorization(
        max_tokens=vocab_size,
        standardize=standardize,
        split="whitespace",
        output_mode="int",
        ragged=True,
        vocabulary=list(vocabulary) if vocabulary is not None else None,
    )


def adapt_vectorizer(vectorizer: keras.layers.TextVectorization, texts: Sequence[str]) -> None:
    """Build the vocabulary from ``texts`` (the training split only: no leakage)."""
    vectorizer.adapt(tf.data.Dataset.from_tensor_slices(list(texts)).batch(1024))


def vocabulary(vectorizer: keras.layers.TextVectorization) -> list[str]:
    """The learned tokens, most frequent first, without padding and unknown."""
    return vectorizer.get_vocabulary(include_special_tokens=False)


def encode(vectorizer: keras.layers.TextVectorization, texts: tf.Tensor, max_len: int) -> tf.RaggedTensor:
    """Token ids of a batch of texts, each cut to its *last* ``max_len`` tokens."""
    return vectorizer(texts)[:, -max_len:]


def pre_pad(post_padded: tf.Tensor) -> tf.Tensor:
    """Move each row's trailing zero padding to its front.

    Real token ids are never 0 (0 is the padding id), so a row's length is
    its count of non-zero ids.
    """
    width = tf.shape(post_padded)[1]
    lengths = tf.reduce_sum(tf.cast(post_padded != 0, tf.int32), axis=1)
    source = tf.range(width)[tf.newaxis, :] - (width - lengths)[:, tf.newaxis]
    gathered = tf.gather(post_padded, tf.maximum(source, 0), batch_dims=1)
    return tf.where(source >= 0, gathered, tf.zeros_like(gathered))


def encode_padded(vectorizer: keras.layers.TextVectorization, texts: tf.Tensor, max_len: int) -> tf.Tensor:
    """Raw texts to a dense ``[batch, max_len]`` pre-padded id matrix (the serving path)."""
    ragged = encode(vectorizer, texts, max_len)
    return pre_pad(ragged.to_tensor(default_value=0, shape=[None, max_len]))


def bucket_boundaries(max_len: int, width: int, min_len: int) -> list[int]:
    """Upper bounds (exclusive) of length buckets of ``width`` tokens, ending past ``max_len``.

    ``bucket_by_sequence_length`` pads bucket *i* to ``boundaries[i] - 1``, so
    the shortest padded length is ``max(width, min_len)`` and the longest is
    ``max_len``.
    """
    first = max(width, min_len)
    lengths = list(range(first, max_len, width)) + [max_len]
    return [n + 1 for n in sorted(set(lengths))]


def make_dataset(
    texts: Sequence[str],
    labels: Sequence[int],
    vectorizer: keras.layers.TextVectorization,
    *,
    shard: tuple[int, int] | None = None,
    **options: Any,
) -> tf.data.Dataset:
    """Batches from in-memory reviews; ``shard=(num_shards, index)`` keeps one part, before any work.

    ``options`` are those of :func:`batch_examples`.
    """
    dataset = tf.data.Dataset.from_tensor_slices((list(texts), list(labels)))
    if shard is not None:
        dataset = dataset.shard(*shard)
    return batch_examples(dataset, vectorizer, **options)


def batch_examples(
    examples: tf.data.Dataset,
    vectorizer: keras.layers.TextVectorization,
    *,
    max_len: int,
    batch_size: int,
    min_len: int = 1,
    bucket_width: int | None = None,
    shuffle_seed: int | None = None,
    shuffle_buffer: int = 25000,
    repeat: bool = False,
) -> tf.data.Dataset:
    """Batches of ``(token_ids [batch, length], label [batch])`` ready for ``fit``.

    Args:
        examples: ``(text, label)`` pairs.
        max_len: truncation length; without bucketing every batch is this wide.
        batch_size: examples per batch (the global batch, or a replica's share).
        min_len: the narrowest batch allowed (the model's conv + pool window).
        bucket_width: group reviews by length in buckets this wide (None: no bucketing).
        shuffle_seed: shuffle with this seed each epoch (None: keep order, for evaluation).
        repeat: cycle forever (training with ``steps_per_epoch``); buckets then
            fill across epoch boundaries, so every batch is a full one.
    """
    dataset = (
        examples.batch(_ENCODE_BATCH)
        .map(lambda t, y: (encode(vectorizer, t, max_len), y), num_parallel_calls=tf.data.AUTOTUNE)
        .unbatch()
        # An unbatched ragged row is a plain vector; map() hands it over as a
        # Tensor, which padded_batch and bucketing require.
        .map(lambda tokens, y: (tf.identity(tokens), y))
        .cache()
    )
    if shuffle_seed is not None:
        dataset = dataset.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    if bucket_width is not None and bucket_width < max_len:
        boundaries = bucket_boundaries(max_len, bucket_width, min_len)
        dataset = dataset.bucket_by_sequence_length(
            lambda tokens, _: tf.shape(tokens)[0],
            bucket_boundaries=boundaries,
            bucket_batch_sizes=[batch_size] * (len(boundaries) + 1),
            pad_to_bucket_boundary=True,
        )
    else:
        dataset = dataset.padded_batch(batch_size, padded_shapes=([max_len], []))
    return dataset.map(lambda x, y: (pre_pad(x), y), num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
