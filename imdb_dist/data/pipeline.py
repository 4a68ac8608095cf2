"""The tf.data input pipeline: tokenize, pre-pad, cache, shuffle, bucket, prefetch.

One chain, read top to bottom in :func:`make_dataset`::

    (text, label) ─► batch ─► vectorize (parallel) ─► unbatch ─► cache
                  ─► shuffle ─► length-sorted batches, pre-padded ─► repeat ─► prefetch
                          (or) ─► repeat ─► max_len batches, pre-padded ─► prefetch

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
# Tokens sorted together when bucketing (pool of max_len-wide rows): 16,384
# reviews at 400 tokens, 52 MB of int64 ids; bounded in tokens so a large
# max_len does not grow the pool's memory.
_POOL_TOKENS = 16384 * 400


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


def batch_width(longest: tf.Tensor, width: int, min_len: int, max_len: int) -> tf.Tensor:
    """How wide a bucketed batch is padded: its longest row rounded up to a multiple of ``width``.

    Never narrower than ``min_len`` (the model's conv + pool window) nor
    wider than ``max_len``; rounding keeps the number of distinct batch shapes
    small (each new shape costs the CPU kernels a setup).
    """
    longest = tf.cast(longest, tf.int32)
    rounded = (longest + width - 1) // width * width
    return tf.minimum(tf.maximum(rounded, min_len), max_len)


def _lengths(post_padded: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(tf.cast(post_padded != 0, tf.int32), axis=1)


def _length_sorted_batches(
    dataset: tf.data.Dataset, *, batch_size: int, max_len: int, min_len: int, width: int, seed: int | None
) -> tf.data.Dataset:
    """Length bucketing by sorting: batches of similar-length reviews, each padded only as wide as it needs.

    A pool of consecutive (already shuffled) examples is padded into one
    matrix, sorted by length and cut into batches; the batches are then
    shuffled (when ``seed`` is given) so training does not see them in
    length order. Every step here is a whole-pool tensor op: tf.data's
    ``bucket_by_sequence_length`` does per-example window bookkeeping and
    was the pipeline's bottleneck (3.5x slower, docs/BENCHMARKS.md).
    """
    pool = max(1, _POOL_TOKENS // (max_len * batch_size)) * batch_size

    def cut(tokens: tf.Tensor, labels: tf.Tensor) -> tf.data.Dataset:
        order = tf.argsort(_lengths(tokens), stable=True)
        return tf.data.Dataset.from_tensor_slices((tf.gather(tokens, order), tf.gather(labels, order))).batch(
            batch_size
        )

    def trim(tokens: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        # Post-padded and sorted, so the first `wide` columns hold every token.
        wide = batch_width(tf.reduce_max(_lengths(tokens)), width, min_len, max_len)
        return pre_pad(tokens[:, :wide]), labels

    batches = dataset.padded_batch(pool, padded_shapes=([max_len], [])).flat_map(cut)
    if seed is not None:
        batches = batches.shuffle(pool // batch_size, seed=seed, reshuffle_each_iteration=True)
    return batches.map(trim, num_parallel_calls=tf.data.AUTOTUNE)


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
        bucket_width: batch reviews of similar length, each batch padded to a
            multiple of this many tokens (None: no bucketing, every batch ``max_len`` wide).
        shuffle_seed: shuffle with this seed each epoch (None: keep order, for evaluation).
        repeat: cycle forever (training with ``steps_per_epoch``). Bucketed, the
            stream is whole passes (each ``ceil(n / batch_size)`` batches, the
            last one short); unbucketed, batches fill across passes.
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
    if bucket_width is not None and bucket_width < max_len:
        # Sorted per pass (repeat comes after), so a pass's batches hold each
        # example exactly once; its last batch may be short.
        dataset = _length_sorted_batches(
            dataset, batch_size=batch_size, max_len=max_len, min_len=min_len, width=bucket_width, seed=shuffle_seed
        )
        if repeat:
            dataset = dataset.repeat()
    else:
        if repeat:
            dataset = dataset.repeat()
        dataset = dataset.padded_batch(batch_size, padded_shapes=([max_len], [])).map(
            lambda x, y: (pre_pad(x), y), num_parallel_calls=tf.data.AUTOTUNE
        )
    return dataset.prefetch(tf.data.AUTOTUNE)
