"""The tf.data pipeline: standardization, vectorizing, pre-padding, epoch plans, bucketing.

Every transform is checked eagerly and, where it runs inside the input
pipeline, again inside ``tf.data.Dataset.map`` (traced, shapes unknown), and
the two must agree. Data is generated (conftest's word lists), never real
review text. Examples carry their index as the "label" where a test must
tell them apart, so "every example exactly once" is checked by identity.
"""

from __future__ import annotations

import collections
import itertools
import json
import random

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from conftest import NEGATIVE, NEUTRAL, POSITIVE, fake_review

from imdb_dist.data.pipeline import (
    Tokenizer,
    batch_examples,
    encode,
    encode_examples,
    encode_padded,
    encode_words,
    fit_tokenizer,
    fit_vocabulary,
    pre_pad,
    split_examples,
    split_words,
    standardize,
)
from imdb_dist.data.plan import GlobalPlan, Share, stream

VOCAB_SIZE = 50
WORDS = POSITIVE + NEGATIVE + NEUTRAL  # 28 distinct words: all fit in VOCAB_SIZE


# --------------------------------------------------------------------------- helpers


def _std(text: str) -> str:
    return standardize(tf.constant([text]))[0].numpy().decode("utf-8")


def _std_in_map(texts: list[str]) -> list[str]:
    ds = tf.data.Dataset.from_tensor_slices(texts).batch(len(texts)).map(standardize)
    (out,) = list(ds.as_numpy_iterator())
    return [t.decode("utf-8") for t in out]


def _texts(n: int, *, seed: int, min_words: int, max_words: int) -> list[str]:
    """``n`` generated reviews of random word counts (markup and punctuation included)."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        length = rng.randint(min_words, max_words)
        if length < 6:  # fake_review needs some room; build very short ones directly
            texts.append(" ".join(rng.choice(WORDS) for _ in range(length)) + "!")
        else:
            texts.append(fake_review(rng, positive=i % 2 == 0, length=length))
    return texts


@pytest.fixture(scope="module")
def tokenizer():
    return fit_tokenizer(_texts(60, seed=1, min_words=6, max_words=40), VOCAB_SIZE)


def _direct(tokenizer, texts: list[str], max_len: int) -> list[tuple[int, ...]]:
    """Each text encoded on its own (eagerly), as tuples of ids."""
    return [tuple(int(i) for i in encode(tokenizer, tf.constant([t]), max_len)[0].numpy()) for t in texts]


def _rows(dataset) -> list[tuple[tuple[int, ...], int, np.ndarray]]:
    """One pass: ``(non-zero ids, label, full padded row)`` per example, in order."""
    rows = []
    for x, y in dataset.as_numpy_iterator():
        for row, label in zip(x, y):
            rows.append((tuple(int(i) for i in row[row != 0]), int(label), row))
    return rows


def _assert_front_padded(row: np.ndarray) -> None:
    nonzero = np.flatnonzero(row)
    if nonzero.size:
        # One run of zeros, then only real ids up to the last position.
        assert nonzero[0] == row.size - nonzero.size, row
        assert nonzero[-1] == row.size - 1, row


# --------------------------------------------------------------------------- standardize


def test_standardize_lowercases_ascii_and_non_ascii():
    assert _std("GREAT Film") == "great film"
    assert _std("ÉCOLE Über") == "école über"


@pytest.mark.parametrize("markup", ["<br />", "<br/>", "<BR />", "<br>"])
def test_standardize_turns_line_breaks_into_spaces(markup):
    out = _std(f"first{markup}second")
    assert out.split() == ["first", "second"]
    assert "br" not in out and "<" not in out and ">" not in out


def test_standardize_drops_apostrophes_inside_words():
    assert _std("don't") == "dont"
    assert _std("It's the director's cut").split() == ["its", "the", "directors", "cut"]


def test_standardize_turns_punctuation_into_spaces():
    out = _std("good,bad.ugly!(really)?yes;no:maybe-so")
    assert out.split() == ["good", "bad", "ugly", "really", "yes", "no", "maybe", "so"]
    assert not any(c in out for c in ",.!()?;:-")


def test_standardize_keeps_non_english_letters():
    out = _std("Café — très bien!")
    assert out.split() == ["café", "très", "bien"]
    assert "—" not in out and "!" not in out
    assert _std("Straße ΑΒΓ 映画 123").split() == ["straße", "αβγ", "映画", "123"]


def test_standardize_in_dataset_map_matches_eager():
    texts = ["Café — très bien!", "I DON'T<br />like<br/>it.", "", "a,b", fake_review(random.Random(3), True)]
    eager = [_std(t) for t in texts]
    assert _std_in_map(texts) == eager


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_maps_known_words_to_ids_from_2_unknown_to_1_padding_to_0():
    v = fit_tokenizer(["superb superb superb film", "superb film dreadful", "film"], VOCAB_SIZE)
    vocab = v.vocabulary
    assert vocab == ["superb", "film", "dreadful"]  # most frequent first, no special tokens
    ids = encode_padded(v, tf.constant(["Superb FILM zzzunknown dreadful"]), 6).numpy()
    assert ids.tolist() == [[0, 0, 2, 3, 1, 4]]
    # A known word's id is its vocabulary rank + 2.
    for rank, word in enumerate(vocab):
        assert encode(v, tf.constant([word]), 4).to_list() == [[rank + 2]]


@pytest.mark.parametrize("vocab_size", [VOCAB_SIZE, 12])
def test_the_tokenizer_gives_text_vectorizations_vocabulary_and_ids(vocab_size):
    # The Keras layer the seed used, with our standardization: same
    # vocabulary (ties included: many words share a count here, and a cap
    # of 12 cuts through them) and the same ids, known and unknown.
    texts = _texts(60, seed=1, min_words=0, max_words=40)
    layer = keras.layers.TextVectorization(
        max_tokens=vocab_size, standardize=standardize, split="whitespace", output_mode="int", ragged=True
    )
    layer.adapt(tf.data.Dataset.from_tensor_slices(texts).batch(7))
    ours = fit_tokenizer(texts, vocab_size)
    assert ours.vocabulary == layer.get_vocabulary(include_special_tokens=False)
    unseen = _texts(30, seed=9, min_words=0, max_words=60) + ["zzz never seen", ""]
    assert ours(tf.constant(unseen)).to_list() == layer(tf.constant(unseen)).to_list()


def test_counting_split_words_gives_the_vocabulary_of_the_texts(tokenizer):
    texts = _texts(60, seed=1, min_words=6, max_words=40)
    words = split_examples(tf.data.Dataset.from_tensor_slices((texts, [i % 2 for i in range(60)])), count=True)
    assert fit_vocabulary(words.counts, VOCAB_SIZE) == tokenizer.vocabulary
    assert words.labels.numpy().tolist() == [i % 2 for i in range(60)]
    encoded = encode_words(words, tokenizer, 24)
    assert [tuple(row) for row in encoded.tokens.to_list()] == _direct(tokenizer, texts, 24)


@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 700])
def test_word_counts_summed_over_batches_are_the_counts_of_all_words(n):
    # 256 texts per batch: no batch, one, a full one, one past it, several.
    texts = _texts(n, seed=3, min_words=0, max_words=30)
    examples = tf.data.Dataset.from_tensor_slices((tf.constant(texts, tf.string), tf.ones([n], tf.int32)))
    words = split_examples(examples, count=True)
    flat = split_words(tf.constant(texts, tf.string)).flat_values.numpy().tolist()
    counted = dict(zip(words.counts.tokens.tolist(), words.counts.counts.tolist(), strict=True))
    assert counted == collections.Counter(flat)
    assert len(set(words.counts.tokens.tolist())) == len(words.counts.tokens)  # each word once
    assert split_examples(examples).counts is None  # only when asked


def test_tokenizer_ids_stay_below_vocab_size(tokenizer):
    texts = _texts(20, seed=5, min_words=6, max_words=50)
    ids = encode(tokenizer, tf.constant(texts), 100).flat_values.numpy()
    assert ids.min() >= 1 and ids.max() < VOCAB_SIZE
    assert len(tokenizer.vocabulary) == VOCAB_SIZE - 2  # capped: padding and unknown take two ids
    assert tokenizer.vocabulary_size() == VOCAB_SIZE
    assert set(WORDS) <= set(tokenizer.vocabulary)  # the frequent words all made it


def test_encode_keeps_the_last_max_len_tokens(tokenizer):
    words = ["superb", "film", "dreadful", "plot", "camera", "music", "ending"]
    full = encode(tokenizer, tf.constant([" ".join(words)]), 100)[0].numpy().tolist()
    assert len(full) == 7 and 1 not in full
    cut = encode(tokenizer, tf.constant([" ".join(words), "superb film"]), 3).to_list()
    assert cut[0] == full[-3:]  # pre-truncation: the end of the review survives
    assert cut[1] == full[:2]  # shorter rows are untouched


# --------------------------------------------------------------------------- pre_pad

_POST_PADDED = np.array(
    [
        [5, 6, 7, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],  # empty review
        [9, 8, 7, 6, 5, 4],  # full row
        [3, 0, 0, 0, 0, 0],
        [2, 3, 4, 5, 6, 0],
    ],
    dtype=np.int64,
)
_PRE_PADDED = np.array(
    [
        [0, 0, 0, 5, 6, 7],
        [0, 0, 0, 0, 0, 0],
        [9, 8, 7, 6, 5, 4],
        [0, 0, 0, 0, 0, 3],
        [0, 2, 3, 4, 5, 6],
    ],
    dtype=np.int64,
)


def test_pre_pad_moves_zeros_to_the_front_row_by_row():
    out = pre_pad(tf.constant(_POST_PADDED))
    assert out.dtype == tf.int64
    np.testing.assert_array_equal(out.numpy(), _PRE_PADDED)


def test_pre_pad_inside_dataset_map_matches_eager():
    eager = pre_pad(tf.constant(_POST_PADDED)).numpy()
    # Static shape known ...
    static = next(tf.data.Dataset.from_tensors(_POST_PADDED).map(pre_pad).as_numpy_iterator())
    # ... and unknown [None, None], as after padded_batch / bucketing.
    dynamic = tf.data.Dataset.from_generator(
        lambda: iter([_POST_PADDED]), output_signature=tf.TensorSpec([None, None], tf.int64)
    ).map(pre_pad)
    (traced,) = list(dynamic.as_numpy_iterator())
    np.testing.assert_array_equal(static, eager)
    np.testing.assert_array_equal(traced, eager)
    np.testing.assert_array_equal(eager, _PRE_PADDED)


# --------------------------------------------------------------------------- encode_padded


def test_encode_padded_gives_front_padded_fixed_width_rows(tokenizer):
    max_len = 8
    texts = ["superb film", "", " ".join(["film", "plot", "actor", "scene", "superb"] * 3), "dreadful!"]
    out = encode_padded(tokenizer, tf.constant(texts), max_len).numpy()
    assert out.shape == (4, max_len)
    direct = _direct(tokenizer, texts, max_len)
    full = _direct(tokenizer, texts, 1000)
    for row, ids, all_ids in zip(out, direct, full):
        _assert_front_padded(row)
        assert tuple(row[row != 0]) == ids
        assert ids == all_ids[-max_len:]  # the last tokens, at the end of the row
    np.testing.assert_array_equal(out[1], np.zeros(max_len))  # empty string: all padding
    assert np.all(out[2] != 0)  # long text fills the row


def test_encode_padded_all_short_batch_is_still_max_len_wide(tokenizer):
    out = encode_padded(tokenizer, tf.constant(["superb", ""]), 10).numpy()
    assert out.shape == (2, 10)
    assert out[0, :-1].tolist() == [0] * 9 and out[0, -1] >= 2


def test_encode_padded_inside_dataset_map_matches_eager(tokenizer):
    texts = _texts(9, seed=11, min_words=0, max_words=25) + [""]
    eager = encode_padded(tokenizer, tf.constant(texts), 16).numpy()
    ds = tf.data.Dataset.from_tensor_slices(texts).batch(4).map(lambda t: encode_padded(tokenizer, t, 16))
    mapped = np.concatenate(list(ds.as_numpy_iterator()))
    np.testing.assert_array_equal(mapped, eager)


def test_saved_vocabulary_rebuilds_an_identical_tokenizer(tokenizer):
    saved = json.loads(json.dumps(tokenizer.vocabulary))  # as written to / read from disk
    assert "" not in saved and "[UNK]" not in saved
    rebuilt = Tokenizer(saved, VOCAB_SIZE)
    assert rebuilt.vocabulary == tokenizer.vocabulary
    texts = _texts(12, seed=4, min_words=0, max_words=30) + ["never seen words here", ""]
    np.testing.assert_array_equal(
        encode_padded(rebuilt, tf.constant(texts), 32).numpy(),
        encode_padded(tokenizer, tf.constant(texts), 32).numpy(),
    )


def test_a_10_mb_review_is_cut_to_its_last_max_len_tokens(tokenizer):
    known = sorted(set(tokenizer.vocabulary))[:3]
    ending = " ".join(known)
    huge = " ".join(["unseenword"] * 1_500_000) + " " + ending
    assert len(huge.encode()) > 10_000_000
    ids = encode_padded(tokenizer, tf.constant([huge]), 5).numpy()[0]
    expected = [tokenizer.vocabulary.index(word) + 2 for word in known]
    assert ids.tolist() == [1, 1, *expected]  # two unknown words, then the last three


# --------------------------------------------------------------------------- batch widths


def batch_width(longest: int, width: int, min_len: int, max_len: int) -> int:
    """The width the plan pads a batch whose longest review has ``longest`` tokens to."""
    plan = GlobalPlan(np.array([longest]), batch_size=1, seed=0, max_len=max_len, min_len=min_len, bucket_width=width)
    return int(plan.widths(np.array([[0]]))[0])


@pytest.mark.parametrize(
    ("longest", "expected"),
    [(0, 8), (1, 50), (50, 50), (51, 100), (399, 400), (400, 400)],
)
def test_batch_width_rounds_the_longest_row_up_to_the_bucket_width(longest, expected):
    assert int(batch_width(longest, 50, 8, 400)) == expected


def test_batch_width_is_never_below_the_model_window():
    assert int(batch_width(3, 50, 60, 400)) == 60  # min_len above the width
    assert int(batch_width(55, 50, 60, 400)) == 100


def test_batch_width_max_len_not_a_multiple_of_width():
    assert [int(batch_width(n, 50, 8, 120)) for n in (40, 90, 101, 120)] == [50, 100, 120, 120]


# --------------------------------------------------------------------------- training epochs


def _training(tokenizer, texts, *, max_len=64, batch_size=6, min_len=1, bucket_width=None, seed=5, epoch=0):
    """One planned epoch over ``texts`` (labels are the indices), as the one-replica stream."""
    encoded = encode_examples(
        tf.data.Dataset.from_tensor_slices((texts, list(range(len(texts))))), tokenizer, max_len
    )
    plan = GlobalPlan(encoded.lengths, batch_size=batch_size, seed=seed, max_len=max_len, min_len=min_len,
                      bucket_width=bucket_width)
    return stream(encoded, plan, Share(1), epochs=epoch + 1, start=(epoch, 0))


def test_encode_examples_keeps_every_example_in_order_with_its_direct_ids(tokenizer):
    texts = _texts(300, seed=2, min_words=0, max_words=40) + [""]
    encoded = encode_examples(tf.data.Dataset.from_tensor_slices((texts, list(range(len(texts))))), tokenizer, 24)
    assert len(encoded) == len(texts)
    assert [tuple(row) for row in encoded.tokens.to_list()] == _direct(tokenizer, texts, 24)
    assert encoded.labels.numpy().tolist() == list(range(len(texts)))
    assert encoded.lengths.tolist() == [len(ids) for ids in _direct(tokenizer, texts, 24)]


def test_an_unbucketed_epoch_is_full_batches_max_len_wide_pre_padded_of_distinct_examples(tokenizer):
    texts = _texts(23, seed=2, min_words=1, max_words=40) + [""]
    ds = _training(tokenizer, texts, max_len=24, batch_size=5)
    shapes = [x.shape for x, _ in ds.as_numpy_iterator()]
    assert shapes == [(5, 24)] * 4  # 24 // 5 full batches; the 4 left over sit this epoch out
    rows = _rows(ds)
    for _, _, row in rows:
        _assert_front_padded(row)
    direct = _direct(tokenizer, texts, 24)
    assert len({y for _, y, _ in rows}) == 20
    assert all(ids == direct[y] for ids, y, _ in rows)


@pytest.mark.parametrize(("width", "min_len"), [(12, 8), (8, 20)], ids=["min-len-below-width", "min-len-above-width"])
def test_a_bucketed_epoch_holds_every_example_once_in_batches_of_similar_length(tokenizer, width, min_len):
    max_len = 64
    texts = _texts(70, seed=3, min_words=0, max_words=90) + ["", "superb"]
    ds = _training(tokenizer, texts, max_len=max_len, batch_size=6, min_len=min_len, bucket_width=width)
    widths, spans, longest = [], [], []
    for x, y in ds.as_numpy_iterator():
        assert x.shape[0] == y.shape[0] == 6
        lengths = [int(np.count_nonzero(row)) for row in x]
        for row in x:
            _assert_front_padded(row)
        # Each batch is as wide as its longest row needs, rounded up to the width.
        assert x.shape[1] == int(batch_width(max(lengths), width, min_len, max_len))
        widths.append(x.shape[1])
        spans.append((min(lengths), max(lengths)))
        longest.append(max(lengths))
    assert len(set(widths)) > 2  # the data really spans several widths
    assert longest != sorted(longest)  # batches are not served in length order
    # One pool holds all 72 reviews: sorted by length and cut, so batches'
    # length ranges do not overlap (they are permuted afterwards).
    spans.sort()
    assert all(low_max <= high_min for (_, low_max), (high_min, _) in itertools.pairwise(spans))
    got = collections.Counter((ids, y) for ids, y, _ in _rows(ds))
    assert got == collections.Counter(zip(_direct(tokenizer, texts, max_len), range(len(texts))))


def test_bucketing_keeps_short_reviews_narrow(tokenizer):
    texts = _texts(40, seed=6, min_words=2, max_words=10)
    bucketed = _training(tokenizer, texts, max_len=200, batch_size=8, bucket_width=16)
    assert {x.shape[1] for x, _ in bucketed.as_numpy_iterator()} == {16}
    unbucketed = _training(tokenizer, texts, max_len=200, batch_size=8)
    assert {x.shape[1] for x, _ in unbucketed.as_numpy_iterator()} == {200}


def test_a_resumed_stream_holds_exactly_the_remaining_batches_of_the_uninterrupted_one(tokenizer):
    texts = _texts(60, seed=11, min_words=1, max_words=60)
    encoded = encode_examples(tf.data.Dataset.from_tensor_slices((texts, list(range(60)))), tokenizer, 32)
    plan = GlobalPlan(encoded.lengths, batch_size=4, seed=3, max_len=32, bucket_width=8)
    whole = list(stream(encoded, plan, Share(1), epochs=4).as_numpy_iterator())
    # A resume builds the plan again from (seed, epoch) and enters the stream at the saved step.
    again = GlobalPlan(encoded.lengths, batch_size=4, seed=3, max_len=32, bucket_width=8)
    rest = list(stream(encoded, again, Share(1), epochs=4, start=(2, 6)).as_numpy_iterator())
    assert len(whole) == 4 * 15 and len(rest) == 2 * 15 - 6
    for (x, y), (x2, y2) in zip(whole[2 * 15 + 6 :], rest, strict=True):
        assert np.array_equal(x, x2) and np.array_equal(y, y2)


def test_evaluation_batches_are_in_order_and_padded_like_the_export(tokenizer):
    texts = _texts(15, seed=9, min_words=1, max_words=60)
    examples = tf.data.Dataset.from_tensor_slices((texts, list(range(15))))
    ds = batch_examples(examples, tokenizer, max_len=32, batch_size=4)
    x = np.concatenate([batch for batch, _ in ds.as_numpy_iterator()])
    assert [y for _, y, _ in _rows(ds)] == list(range(15))
    assert np.array_equal(x, encode_padded(tokenizer, tf.constant(texts), 32).numpy())
