"""The tf.data input pipeline: tokenize once, pre-pad; batches are planned in :mod:`imdb_dist.data.plan`.

Training (:func:`split_examples`, :func:`fit_vocabulary`, :func:`encode_words`)::

    (text, label) ─► batch ─► standardize, split, count (parallel) ─► words (once), word counts
    word counts ─► vocabulary;  words ─► look up the last max_len words ─► one ragged id matrix

In one process every training example is tokenized once, in memory
(:class:`Encoded`, row ``i`` is example ``i``); a Ray run's launcher
tokenizes once for all its workers into the token store
(:mod:`imdb_dist.data.preparation`). :mod:`imdb_dist.data.plan` then decides
which rows each step trains on and streams them, pre-padded.

Evaluation (:func:`batch_examples`): in order, every review padded to
``max_len``, the input the exported model serves.

Sequences are *pre*-padded and *pre*-truncated (the last ``max_len`` tokens
are kept, zeros go in front) so the LSTM's final state is read right after
the last real token instead of after a run of padding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

# Characters that are neither letters, digits nor whitespace (Unicode-aware,
# so non-English reviews keep their words). Apostrophes are dropped, not
# split on, so "don't" (or "don’t") stays one token.
_PUNCTUATION = r"[^\pL\pN\s]+"
_LINE_BREAK = r"<br\s*/?>"
# Texts per tokenizer call: batching the string ops is several times faster
# than calling them once per review.
_ENCODE_BATCH = 256
# Ids 0 (padding) and 1 (unknown word) come before the vocabulary's.
_SPECIAL_IDS = 2


def standardize(texts: tf.Tensor) -> tf.Tensor:
    """Lowercase, replace ``<br />`` markup and punctuation with spaces."""
    texts = tf.strings.lower(texts, encoding="utf-8")
    texts = tf.strings.regex_replace(texts, _LINE_BREAK, " ")
    texts = tf.strings.regex_replace(texts, "['’]", "")
    return tf.strings.regex_replace(texts, _PUNCTUATION, " ")


class Tokenizer(tf.Module):
    """Raw review text to ragged token ids: :func:`standardize`, split on whitespace, look up.

    Id 0 is padding, 1 an unknown word and ``2 + i`` the vocabulary's ``i``-th
    token: the ids Keras' ``TextVectorization`` gives for the same vocabulary
    (tested). Its own class rather than that layer because training splits
    the reviews into words once and both counts and looks them up
    (:func:`fit_vocabulary`, :meth:`ids`), where the layer standardizes the
    text again for each; and an export holding a Keras layer makes
    ``tf.saved_model.save`` trace the layer's functions for Keras to reload.
    The lookup table is a ``tf.lookup.StaticHashTable``, saved with the export.
    """

    def __init__(self, vocabulary: Sequence[str], vocab_size: int) -> None:
        """``vocabulary``: the tokens, most frequent first, without padding and unknown; cut to ``vocab_size - 2``."""
        super().__init__(name="tokenizer")
        tokens = list(vocabulary)[: max(0, vocab_size - _SPECIAL_IDS)]
        # A numpy array is not tracked by tf.Module: the table below is what the export saves.
        self._tokens = np.array(tokens, dtype=object)
        keys = tf.constant(tokens, dtype=tf.string, shape=[len(tokens)])
        values = tf.range(_SPECIAL_IDS, _SPECIAL_IDS + len(tokens), dtype=tf.int64)
        self.table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, values), default_value=1)

    @property
    def vocabulary(self) -> list[str]:
        """The tokens with ids 2, 3, ...: most frequent first."""
        return self._tokens.tolist()

    def vocabulary_size(self) -> int:
        """Ids in use, padding and unknown included (the embedding's rows)."""
        return len(self._tokens) + _SPECIAL_IDS

    def ids(self, words: tf.RaggedTensor) -> tf.RaggedTensor:
        """Token ids of already split words (:func:`split_words`)."""
        return tf.ragged.map_flat_values(self.table.lookup, words)

    def __call__(self, texts: tf.Tensor) -> tf.RaggedTensor:
        return self.ids(split_words(texts))


def split_words(texts: tf.Tensor) -> tf.RaggedTensor:
    """A batch of raw texts as ragged words: standardized, split on runs of whitespace."""
    return tf.strings.split(standardize(texts))


@dataclasses.dataclass(frozen=True)
class WordCounts:
    """Each distinct word of some texts and how often it occurs in them (in no particular order)."""

    tokens: np.ndarray  # bytes, distinct
    counts: np.ndarray  # int64, same length


def fit_vocabulary(counts: WordCounts, vocab_size: int) -> list[str]:
    """The ``vocab_size - 2`` most frequent words (count the training split's only: no leakage).

    Ties are broken as Keras' ``TextVectorization.adapt`` breaks them (the
    greater token first, bytewise), so the vocabulary is deterministic, the
    same whatever order the counts come in, and the same as that layer's.
    """
    order = np.lexsort((counts.tokens, counts.counts))[::-1][: max(0, vocab_size - _SPECIAL_IDS)]
    return [token.decode("utf-8") for token in counts.tokens[order]]


def fit_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """A tokenizer whose vocabulary is fitted on ``texts``."""
    counts = count_words(tf.data.Dataset.from_tensor_slices(list(texts)))
    return Tokenizer(fit_vocabulary(counts, vocab_size), vocab_size)


def count_words(texts: tf.data.Dataset) -> WordCounts:
    """How often each word occurs in ``texts``, counted in parallel batches (:func:`split_examples`)."""
    counts = split_examples(texts.map(lambda text: (text, 0)), count=True).counts
    assert counts is not None
    return counts


def encode(tokenizer: Tokenizer, texts: tf.Tensor, max_len: int) -> tf.RaggedTensor:
    """Token ids of a batch of texts, each cut to its *last* ``max_len`` tokens."""
    return tokenizer(texts)[:, -max_len:]


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


def encode_padded(tokenizer: Tokenizer, texts: tf.Tensor, max_len: int) -> tf.Tensor:
    """Raw texts to a dense ``[batch, max_len]`` pre-padded id matrix (the serving path)."""
    ragged = encode(tokenizer, texts, max_len)
    return pre_pad(ragged.to_tensor(default_value=0, shape=[None, max_len]))


def batch_examples(
    examples: tf.data.Dataset, tokenizer: Tokenizer, *, max_len: int, batch_size: int
) -> tf.data.Dataset:
    """Evaluation batches ``(token_ids [batch, max_len], label [batch])``, in input order, cached.

    Every review is pre-padded to ``max_len``, exactly as the export pads it
    (:func:`encode_padded`), so validation scores what users will serve.
    """
    return (
        examples.batch(batch_size)
        .map(lambda t, y: (encode_padded(tokenizer, t, max_len), y), num_parallel_calls=tf.data.AUTOTUNE)
        .cache()
        .prefetch(tf.data.AUTOTUNE)
    )


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One worker's training examples, tokenized once: row ``i`` is example ``i``."""

    tokens: tf.RaggedTensor  # int64 [n, None], each row its last <= max_len ids
    labels: tf.Tensor  # int32 [n]
    lengths: np.ndarray  # [n] tokens per row

    def __len__(self) -> int:
        return len(self.lengths)

    def gather(self, index: tf.Tensor) -> tuple[tf.RaggedTensor, tf.Tensor]:
        """The token rows and labels of the examples at ``index`` (the plan's random access)."""
        return tf.gather(self.tokens, index), tf.gather(self.labels, index)


def encode_examples(examples: tf.data.Dataset, tokenizer: Tokenizer, max_len: int) -> Encoded:
    """Tokenize every ``(text, label)`` example (in parallel batches) into one ragged id matrix."""
    return encode_words(split_examples(examples), tokenizer, max_len)


@dataclasses.dataclass(frozen=True)
class Words:
    """Examples split into words (:func:`split_words`), before any vocabulary exists."""

    words: tf.RaggedTensor  # string [n, None]
    labels: tf.Tensor  # int32 [n]
    counts: WordCounts | None = None  # over all examples, when split_examples was asked to count


def split_examples(examples: tf.data.Dataset, *, count: bool = False) -> Words:
    """Every ``(text, label)`` example's words, in order, split in parallel batches.

    With ``count``, each batch's words are also counted as it is split (in
    parallel, like the split), and the batches' counts summed: less time than
    counting all the words in one pass afterwards (measured on the training
    reviews, 2 cores: docs/BENCHMARKS.md).
    """

    def split(texts: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, ...]:
        words = split_words(texts)
        if not count:
            return words, tf.cast(labels, tf.int32)
        tokens, _, counts = tf.unique_with_counts(words.flat_values, out_idx=tf.int64)
        return words, tf.cast(labels, tf.int32), tokens, counts

    batches = examples.batch(_ENCODE_BATCH).map(split, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    parts: list[list[tf.Tensor]] = [[], [], [], []]
    for batch in batches:
        for part, value in zip(parts, batch):
            part.append(value)
    if not parts[0]:
        empty = WordCounts(np.zeros(0, dtype=object), np.zeros(0, dtype=np.int64)) if count else None
        return Words(tf.ragged.constant([], dtype=tf.string, ragged_rank=1), tf.zeros([0], tf.int32), empty)
    words = Words(tf.concat(parts[0], axis=0), tf.concat(parts[1], axis=0))
    if not count:
        return words
    tokens, index = tf.unique(tf.concat(parts[2], axis=0))
    totals = tf.math.unsorted_segment_sum(tf.concat(parts[3], axis=0), index, tf.size(tokens))
    return dataclasses.replace(words, counts=WordCounts(tokens.numpy(), totals.numpy()))


def encode_words(words: Words, tokenizer: Tokenizer, max_len: int) -> Encoded:
    """The ids of each example's last ``max_len`` words (cut first: fewer lookups)."""
    ids = tokenizer.ids(words.words[:, -max_len:])
    return Encoded(ids, words.labels, ids.row_lengths().numpy())
