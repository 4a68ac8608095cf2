"""The tf.data pipeline: standardization, vectorizing, pre-padding, bucketing, shuffling, sharding.

Every transform is checked eagerly and, where it runs inside the input
pipeline, again inside ``tf.data.Dataset.map`` (traced, shapes unknown), and
the two must agree. Data is generated (conftest's word lists), never real
review text. Examples carry their index as the "label" where a test must
tell them apart, so "every example exactly once" is checked by identity.
"""

from __future__ import annotations

import collections
import json
import random

import numpy as np
import pytest
import tensorflow as tf

from imdb_dist.data.pipeline import (
    adapt_vectorizer,
    batch_width,
    encode,
    encode_padded,
    make_dataset,
    make_vectorizer,
    pre_pad,
    standardize,
    vocabulary,
)
from conftest import NEGATIVE, NEUTRAL, POSITIVE, fake_review

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
def vectorizer():
    v = make_vectorizer(VOCAB_SIZE)
    adapt_vectorizer(v, _texts(60, seed=1, min_words=6, max_words=40))
    return v


def _direct(vectorizer, texts: list[str], max_len: int) -> list[tuple[int, ...]]:
    """Each text encoded on its own (eagerly), as tuples of ids."""
    return [tuple(int(i) for i in encode(vectorizer, tf.constant([t]), max_len)[0].numpy()) for t in texts]


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


# --------------------------------------------------------------------------- vectorizer


def test_vectorizer_maps_known_words_to_ids_from_2_unknown_to_1_padding_to_0():
    v = make_vectorizer(VOCAB_SIZE)
    adapt_vectorizer(v, ["superb superb superb film", "superb film dreadful", "film"])
    vocab = vocabulary(v)
    assert vocab == ["superb", "film", "dreadful"]  # most frequent first, no special tokens
    ids = encode_padded(v, tf.constant(["Superb FILM zzzunknown dreadful"]), 6).numpy()
    assert ids.tolist() == [[0, 0, 2, 3, 1, 4]]
    # A known word's id is its vocabulary rank + 2.
    for rank, word in enumerate(vocab):
        assert encode(v, tf.constant([word]), 4).to_list() == [[rank + 2]]


def test_vectorizer_ids_stay_below_vocab_size(vectorizer):
    texts = _texts(20, seed=5, min_words=6, max_words=50)
    ids = encode(vectorizer, tf.constant(texts), 100).flat_values.numpy()
    assert ids.min() >= 1 and ids.max() < VOCAB_SIZE
    assert len(vocabulary(vectorizer)) == VOCAB_SIZE - 2  # capped: padding and unknown take two ids
    assert set(WORDS) <= set(vocabulary(vectorizer))  # the frequent words all made it


def test_encode_keeps_the_last_max_len_tokens(vectorizer):
    words = ["superb", "film", "dreadful", "plot", "camera", "music", "ending"]
    full = encode(vectorizer, tf.constant([" ".join(words)]), 100)[0].numpy().tolist()
    assert len(full) == 7 and 1 not in full
    cut = encode(vectorizer, tf.constant([" ".join(words), "superb film"]), 3).to_list()
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


def test_encode_padded_gives_front_padded_fixed_width_rows(vectorizer):
    max_len = 8
    texts = ["superb film", "", " ".join(["film", "plot", "actor", "scene", "superb"] * 3), "dreadful!"]
    out = encode_padded(vectorizer, tf.constant(texts), max_len).numpy()
    assert out.shape == (4, max_len)
    direct = _direct(vectorizer, texts, max_len)
    full = _direct(vectorizer, texts, 1000)
    for row, ids, all_ids in zip(out, direct, full):
        _assert_front_padded(row)
        assert tuple(row[row != 0]) == ids
        assert ids == all_ids[-max_len:]  # the last tokens, at the end of the row
    np.testing.assert_array_equal(out[1], np.zeros(max_len))  # empty string: all padding
    assert np.all(out[2] != 0)  # long text fills the row


def test_encode_padded_all_short_batch_is_still_max_len_wide(vectorizer):
    out = encode_padded(vectorizer, tf.constant(["superb", ""]), 10).numpy()
    assert out.shape == (2, 10)
    assert out[0, :-1].tolist() == [0] * 9 and out[0, -1] >= 2


def test_encode_padded_inside_dataset_map_matches_eager(vectorizer):
    texts = _texts(9, seed=11, min_words=0, max_words=25) + [""]
    eager = encode_padded(vectorizer, tf.constant(texts), 16).numpy()
    ds = tf.data.Dataset.from_tensor_slices(texts).batch(4).map(lambda t: encode_padded(vectorizer, t, 16))
    mapped = np.concatenate(list(ds.as_numpy_iterator()))
    np.testing.assert_array_equal(mapped, eager)


def test_saved_vocabulary_rebuilds_an_identical_vectorizer(vectorizer):
    saved = json.loads(json.dumps(vocabulary(vectorizer)))  # as written to / read from disk
    assert "" not in saved and "[UNK]" not in saved
    rebuilt = make_vectorizer(VOCAB_SIZE, saved)
    assert rebuilt.get_vocabulary() == vectorizer.get_vocabulary()
    texts = _texts(12, seed=4, min_words=0, max_words=30) + ["never seen words here", ""]
    np.testing.assert_array_equal(
        encode_padded(rebuilt, tf.constant(texts), 32).numpy(),
        encode_padded(vectorizer, tf.constant(texts), 32).numpy(),
    )


def test_a_10_mb_review_is_cut_to_its_last_max_len_tokens(vectorizer):
    known = sorted(set(vectorizer.get_vocabulary()[2:]))[:3]
    ending = " ".join(known)
    huge = " ".join(["unseenword"] * 1_500_000) + " " + ending
    assert len(huge.encode()) > 10_000_000
    ids = encode_padded(vectorizer, tf.constant([huge]), 5).numpy()[0]
    expected = [vectorizer.get_vocabulary().index(word) for word in known]
    assert ids.tolist() == [1, 1, *expected]  # two unknown words, then the last three


# --------------------------------------------------------------------------- batch_width


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


# --------------------------------------------------------------------------- make_dataset


def test_make_dataset_without_bucketing_yields_max_len_wide_pre_padded_batches(vectorizer):
    max_len = 24
    texts = _texts(23, seed=2, min_words=1, max_words=40) + [""]
    labels = list(range(len(texts)))
    ds = make_dataset(texts, labels, vectorizer, max_len=max_len, batch_size=5)
    widths = [x.shape for x, _ in ds.as_numpy_iterator()]
    assert all(w[1] == max_len for w in widths)
    assert [w[0] for w in widths] == [5, 5, 5, 5, 4]
    rows = _rows(ds)
    for _, _, row in rows:
        _assert_front_padded(row)
    # Every example exactly once, in order when not shuffled, with the ids of a direct encoding.
    assert [(ids, y) for ids, y, _ in rows] == list(zip(_direct(vectorizer, texts, max_len), labels))


def test_make_dataset_bucket_width_at_least_max_len_pads_to_max_len(vectorizer):
    texts = _texts(10, seed=8, min_words=1, max_words=10)
    ds = make_dataset(texts, list(range(10)), vectorizer, max_len=16, batch_size=4, bucket_width=16)
    assert {x.shape[1] for x, _ in ds.as_numpy_iterator()} == {16}


@pytest.mark.parametrize(("width", "min_len"), [(12, 8), (8, 20)], ids=["min-len-below-width", "min-len-above-width"])
def test_make_dataset_with_bucketing_yields_every_example_once_front_padded(vectorizer, width, min_len):
    max_len = 64
    texts = _texts(70, seed=3, min_words=0, max_words=90) + ["", "superb"]
    labels = list(range(len(texts)))
    ds = make_dataset(
        texts, labels, vectorizer, max_len=max_len, batch_size=6, min_len=min_len, bucket_width=width, shuffle_seed=5
    )
    widths, spans = [], []
    for x, y in ds.as_numpy_iterator():
        assert x.shape[0] == y.shape[0] <= 6
        lengths = [int(np.count_nonzero(row)) for row in x]
        for row in x:
            _assert_front_padded(row)
        # Each batch is as wide as its longest row needs, rounded up to the width.
        assert x.shape[1] == int(batch_width(max(lengths), width, min_len, max_len))
        widths.append(x.shape[1])
        spans.append((min(lengths), max(lengths)))
    assert all(min_len <= w <= max_len for w in widths)
    assert all(w % width == 0 or w in (min_len, max_len) for w in widths)
    assert len(set(widths)) > 2  # the data really spans several widths
    # One pool holds all 72 reviews: sorted by length and cut, so batches'
    # length ranges do not overlap (they are shuffled afterwards).
    spans.sort()
    assert all(low_max <= high_min for (_, low_max), (high_min, _) in zip(spans, spans[1:]))
    got = collections.Counter((ids, y) for ids, y, _ in _rows(ds))
    expected = collections.Counter(zip(_direct(vectorizer, texts, max_len), labels))
    assert got == expected


def test_make_dataset_bucketing_shuffles_the_sorted_batches(vectorizer):
    texts = _texts(120, seed=13, min_words=0, max_words=60)
    ds = make_dataset(texts, list(range(120)), vectorizer, max_len=64, batch_size=4, bucket_width=8, shuffle_seed=2)
    longest = [int(np.count_nonzero(x, axis=1).max()) for x, _ in ds.as_numpy_iterator()]
    assert longest != sorted(longest)  # not served in length order
    unshuffled = make_dataset(texts, list(range(120)), vectorizer, max_len=64, batch_size=4, bucket_width=8)
    longest = [int(np.count_nonzero(x, axis=1).max()) for x, _ in unshuffled.as_numpy_iterator()]
    assert longest == sorted(longest)  # evaluation: one sorted pool, in order


def test_make_dataset_bucketing_keeps_short_reviews_narrow(vectorizer):
    max_len = 200
    texts = _texts(40, seed=6, min_words=2, max_words=10)
    ds = make_dataset(texts, [i % 2 for i in range(40)], vectorizer, max_len=max_len, batch_size=8, bucket_width=16)
    widths = {x.shape[1] for x, _ in ds.as_numpy_iterator()}
    assert widths == {16}
    assert max(widths) * 10 <= max_len
    unbucketed = make_dataset(texts, [0] * 40, vectorizer, max_len=max_len, batch_size=8)
    assert {x.shape[1] for x, _ in unbucketed.as_numpy_iterator()} == {max_len}


def _order(texts, vectorizer, seed, **kwargs):
    ds = make_dataset(texts, list(range(len(texts))), vectorizer, max_len=32, batch_size=4, shuffle_seed=seed, **kwargs)
    return [y for _, y, _ in _rows(ds)]


@pytest.mark.parametrize("bucket_width", [None, 8])
def test_make_dataset_shuffle_seed_fixes_the_order(vectorizer, bucket_width):
    texts = _texts(40, seed=7, min_words=1, max_words=40)
    first = _order(texts, vectorizer, 123, bucket_width=bucket_width)
    again = _order(texts, vectorizer, 123, bucket_width=bucket_width)
    other = _order(texts, vectorizer, 124, bucket_width=bucket_width)
    assert sorted(first) == sorted(other) == list(range(40))
    assert first == again
    assert first != other
    assert first != list(range(40))


def test_make_dataset_without_seed_keeps_input_order(vectorizer):
    texts = _texts(15, seed=9, min_words=1, max_words=20)
    ds = make_dataset(texts, list(range(15)), vectorizer, max_len=32, batch_size=4)
    assert [y for _, y, _ in _rows(ds)] == list(range(15))


@pytest.mark.parametrize("bucket_width", [None, 8])
def test_make_dataset_shards_are_disjoint_and_cover_everything(vectorizer, bucket_width):
    texts = _texts(31, seed=10, min_words=0, max_words=40)
    labels = list(range(31))
    kwargs = dict(max_len=32, batch_size=4, bucket_width=bucket_width, shuffle_seed=1)
    shards = [_rows(make_dataset(texts, labels, vectorizer, shard=(2, i), **kwargs)) for i in range(2)]
    ids = [collections.Counter(y for _, y, _ in rows) for rows in shards]
    assert all(max(c.values()) == 1 for c in ids)  # no example twice within a shard
    assert not set(ids[0]) & set(ids[1])
    assert set(ids[0]) | set(ids[1]) == set(labels)
    assert abs(len(ids[0]) - len(ids[1])) <= 1
    # And the shards carry the right tokens for each example.
    direct = _direct(vectorizer, texts, 32)
    for rows in shards:
        for tokens, y, _ in rows:
            assert tokens == direct[y]


def test_make_dataset_repeat_unbucketed_fills_batches_across_passes(vectorizer):
    n = 10
    texts = _texts(n, seed=12, min_words=1, max_words=30)
    kwargs = dict(max_len=32, batch_size=4, shuffle_seed=3)
    once = make_dataset(texts, list(range(n)), vectorizer, **kwargs)
    assert sum(x.shape[0] for x, _ in once.as_numpy_iterator()) == n  # finite without repeat
    forever = make_dataset(texts, list(range(n)), vectorizer, repeat=True, **kwargs)
    seen = collections.Counter()
    for x, y in forever.take(4 * n).as_numpy_iterator():  # far more batches than one pass has
        assert x.shape[0] == 4  # only full batches
        seen.update(int(v) for v in y)
    assert sum(seen.values()) == 16 * n
    assert set(seen) == set(range(n))
    assert min(seen.values()) >= 10  # each example came back many times


def test_make_dataset_repeat_bucketed_yields_whole_passes(vectorizer):
    n, batch = 10, 4
    texts = _texts(n, seed=12, min_words=1, max_words=30)
    kwargs = dict(max_len=32, batch_size=batch, bucket_width=8, shuffle_seed=3)
    forever = make_dataset(texts, list(range(n)), vectorizer, repeat=True, **kwargs)
    per_pass = -(-n // batch)  # the steps_per_epoch training uses
    batches = list(forever.take(6 * per_pass).as_numpy_iterator())
    orders = []
    for start in range(0, len(batches), per_pass):
        labels = [int(v) for _, y in batches[start : start + per_pass] for v in y]
        assert sorted(labels) == list(range(n))  # each pass: every example exactly once
        orders.append(labels)
    assert len({tuple(order) for order in orders}) > 1  # reshuffled from pass to pass