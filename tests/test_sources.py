"""Reading labeled reviews: aclImdb directories and tarballs, the seeded split, source resolution."""

from __future__ import annotations

import collections
import gzip
import random
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import fake_review, make_tarball

from imdb_dist.config import DataConfig
from imdb_dist.data.sources import (
    ENV_PATH,
    decode_keras,
    fold_indices,
    load_reviews,
    movies,
    read_aclimdb,
    resolve_source,
)
from imdb_dist.errors import DataError, InputError


def as_source(base: Path, form: str) -> Path:
    """The generated ``aclImdb`` dir as the path a user would give: itself, its parent, or a tarball."""
    if form == "dir":
        return base
    if form == "parent":
        return base.parent
    return make_tarball(base, base.parent.parent / "aclImdb.tar.gz")


def on_disk(base: Path, split: str) -> collections.Counter:
    """The (text, label) multiset a reader must return, read straight from the files."""
    found = collections.Counter()
    for label, value in (("neg", 0), ("pos", 1)):
        for file in (base / split / label).glob("*.txt"):
            found[(file.read_text(encoding="utf-8"), value)] += 1
    return found


def pairs(reviews) -> list[tuple[str, int]]:
    return list(zip(reviews.texts, reviews.labels.tolist()))


def first_review(base: Path, split: str, label: str) -> Path:
    return min((base / split / label).glob("*.txt"))


FORMS = ["dir", "parent", "tar"]


def test_data_error_is_an_input_error():
    assert issubclass(DataError, InputError)


@pytest.mark.parametrize("split", ["train", "test"])
def test_directory_parent_and_tarball_read_the_same_in_the_same_order(aclimdb, split):
    base = aclimdb({"train": 12, "test": 5})
    read = {form: read_aclimdb(as_source(base, form), split) for form in FORMS}
    assert pairs(read["dir"]) == pairs(read["parent"]) == pairs(read["tar"])
    assert collections.Counter(pairs(read["dir"])) == on_disk(base, split)


@pytest.mark.parametrize("form", FORMS)
def test_labels_are_one_for_pos_zero_for_neg_with_matching_counts(aclimdb, form):
    base = aclimdb({"train": 7})
    reviews = read_aclimdb(as_source(base, form), "train")
    assert len(reviews) == 14
    assert reviews.labels.dtype == np.int32
    assert int((reviews.labels == 1).sum()) == 7
    assert int((reviews.labels == 0).sum()) == 7
    pos = {file.read_text(encoding="utf-8") for file in (base / "train" / "pos").glob("*.txt")}
    for text, label in pairs(reviews):
        assert label == (1 if text in pos else 0)


@pytest.mark.parametrize("form", ["dir", "tar"])
def test_unsup_reviews_are_ignored(aclimdb, form):
    base = aclimdb({"train": 6}, unsup=9)
    reviews = read_aclimdb(as_source(base, form), "train")
    assert len(reviews) == 12
    assert collections.Counter(pairs(reviews)) == on_disk(base, "train")


@pytest.mark.parametrize("form", ["dir", "tar"])
def test_test_split_is_read_when_present(aclimdb, form):
    base = aclimdb({"train": 6, "test": 4})
    reviews = read_aclimdb(as_source(base, form), "test")
    assert collections.Counter(pairs(reviews)) == on_disk(base, "test")


@pytest.mark.parametrize("form", ["dir", "tar"])
def test_missing_split_is_named(aclimdb, form):
    source = as_source(aclimdb({"train": 6}), form)
    with pytest.raises(DataError, match=rf"{re.escape(str(source))} has no test split \(it holds: train\)"):
        read_aclimdb(source, "test")


@pytest.mark.parametrize("form", ["dir", "tar"])
def test_empty_class_dir_is_named(aclimdb, form):
    base = aclimdb({"train": 6})
    for file in (base / "train" / "neg").iterdir():
        file.unlink()
    with pytest.raises(DataError, match=r"train/neg holds no reviews"):
        read_aclimdb(as_source(base, form), "train")


@pytest.mark.parametrize("form", ["dir", "tar"])
def test_review_that_is_not_utf8_is_named(aclimdb, form):
    base = aclimdb({"train": 6})
    bad = first_review(base, "train", "pos")
    bad.write_bytes(b"\xff\xfe bad")
    with pytest.raises(DataError, match=rf"train/pos/{re.escape(bad.name)} is not valid UTF-8"):
        read_aclimdb(as_source(base, form), "train")


@pytest.mark.parametrize("content", ["", " \n\t\n"])
@pytest.mark.parametrize("form", ["dir", "tar"])
def test_empty_review_file_is_skipped(aclimdb, form, content):
    base = aclimdb({"train": 6})
    first_review(base, "train", "neg").write_text(content, encoding="utf-8")
    reviews = read_aclimdb(as_source(base, form), "train")
    assert len(reviews) == 11
    assert int((reviews.labels == 0).sum()) == 5
    assert all(text.strip() for text in reviews.texts)


@pytest.mark.parametrize("form", ["dir", "tar"])
def test_a_10_mb_review_is_read_whole(aclimdb, form):
    base = aclimdb({"train": 6})
    huge = " ".join(f"word{i % 5000}" for i in range(1_200_000)) + " the very end"
    assert len(huge.encode()) > 10_000_000
    first_review(base, "train", "pos").write_text(huge, encoding="utf-8")
    reviews = read_aclimdb(as_source(base, form), "train")
    assert len(reviews) == 12
    assert huge in list(reviews.texts)


@pytest.mark.parametrize("form", ["dir", "tar"])
def test_stray_files_are_ignored(aclimdb, form):
    base = aclimdb({"train": 6})
    # Binary or non-review content: reading any of them as a review would fail or add a review.
    (base / "train" / "pos" / ".DS_Store").write_bytes(b"\x00\x01Bud1\xff\xfe")
    (base / "train" / "urls_pos.txt").write_text("http://example.invalid/1\n", encoding="utf-8")
    (base / "train" / "labeledBow.feat").write_text("1 0:1\n", encoding="utf-8")
    nested = base / "train" / "neg" / "nested"
    nested.mkdir()
    (nested / "99_1.txt").write_bytes(b"\xff not a review")
    reviews = read_aclimdb(as_source(base, form), "train")
    assert collections.Counter(pairs(reviews)) == on_disk(base, "train")
    assert len(reviews) == 12


def big_tarball(aclimdb, tmp_path: Path) -> Path:
    """A valid tarball whose middle bytes are the data of one long review.

    Cutting it in half then always lands inside a member's data, so the
    error comes from the tar reader, not only from the gzip trailer check.
    """
    base = aclimdb({"train": 3})
    first_review(base, "train", "pos").write_text(fake_review(random.Random(1), True, 20000), encoding="utf-8")
    tarball = make_tarball(base, tmp_path / "aclImdb.tar.gz")
    assert len(read_aclimdb(tarball, "train")) == 6
    return tarball


def nonexistent(aclimdb, tmp_path: Path) -> Path:
    return tmp_path / "missing" / "aclImdb.tar.gz"


def plain_text(aclimdb, tmp_path: Path) -> Path:
    path = tmp_path / "notes.tar.gz"
    path.write_text("this is not an archive\n", encoding="utf-8")
    return path


def truncated_half(aclimdb, tmp_path: Path) -> Path:
    data = big_tarball(aclimdb, tmp_path).read_bytes()
    path = tmp_path / "truncated.tar.gz"
    path.write_bytes(data[: len(data) // 2])
    return path


def gzip_of_random_bytes(aclimdb, tmp_path: Path) -> Path:
    path = tmp_path / "random.tar.gz"
    path.write_bytes(gzip.compress(random.Random(0).randbytes(8192)))
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (nonexistent, "does not exist"),
        (plain_text, "neither a directory nor a tar archive"),
        (truncated_half, "corrupt or truncated archive"),
        (gzip_of_random_bytes, "corrupt or truncated archive"),
    ],
    ids=lambda v: getattr(v, "__name__", "")[:40] or None,
)
def test_bad_data_path_raises_data_error(aclimdb, tmp_path, make, message):
    path = make(aclimdb, tmp_path)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))} .*{message}"):
        read_aclimdb(path, "train")


def test_tarball_truncated_to_its_first_bytes_raises_data_error(aclimdb, tmp_path):
    data = make_tarball(aclimdb({"train": 3}), tmp_path / "aclImdb.tar.gz").read_bytes()
    path = tmp_path / "cut.tar.gz"
    path.write_bytes(data[:20])
    with pytest.raises(DataError):
        read_aclimdb(path, "train")


def test_no_truncation_of_a_tarball_is_read_as_fewer_reviews(aclimdb, tmp_path):
    data = make_tarball(aclimdb({"train": 3}), tmp_path / "aclImdb.tar.gz").read_bytes()
    path = tmp_path / "cut.tar.gz"
    silent = []
    for cut in range(1, len(data)):
        path.write_bytes(data[:cut])
        try:
            reviews = read_aclimdb(path, "train")
        except DataError:  # refused: what this test asks for
            continue
        if len(reviews) < 6:
            silent.append((cut, len(reviews)))
    assert not silent, f"truncated archives read without error as fewer reviews (cut, count): {silent}"


def data_config(path: Path, **kwargs) -> DataConfig:
    return DataConfig(source="aclimdb", path=str(path), **kwargs)


@pytest.mark.parametrize(("per_class", "fraction"), [(21, 0.1), (20, 0.25), (15, 0.5)])
def test_train_and_validation_partition_the_train_split(aclimdb, per_class, fraction):
    base = aclimdb({"train": per_class})
    cfg = data_config(base, validation_fraction=fraction)
    everything = collections.Counter(pairs(read_aclimdb(base, "train")))
    assert max(everything.values()) == 1  # generated texts are distinct, so multisets compare as sets
    train = collections.Counter(pairs(load_reviews(cfg, "train")))
    validation = collections.Counter(pairs(load_reviews(cfg, "validation")))
    n = 2 * per_class
    assert sum(validation.values()) == round(n * fraction)
    assert not (train & validation)
    assert train + validation == everything


@pytest.mark.parametrize(("n", "folds"), [(103, 5), (10, 10), (25_000, 5)])
def test_folds_are_disjoint_cover_the_data_and_differ_in_size_by_at_most_one(n, folds):
    parts = [fold_indices(n, folds, fold, seed=11) for fold in range(folds)]
    validation = np.concatenate([val for _, val in parts])
    assert np.array_equal(np.sort(validation), np.arange(n))  # every index in exactly one fold
    sizes = [len(val) for _, val in parts]
    assert max(sizes) - min(sizes) <= 1
    for train, val in parts:
        assert np.intersect1d(train, val).size == 0
        assert np.array_equal(np.union1d(train, val), np.arange(n))


def test_folds_are_stable_for_a_seed_and_differ_across_seeds():
    first = [fold_indices(1000, 5, fold, seed=3)[1] for fold in range(5)]
    again = [fold_indices(1000, 5, fold, seed=3)[1] for fold in range(5)]
    other = [fold_indices(1000, 5, fold, seed=4)[1] for fold in range(5)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])


def test_fold_index_outside_the_folds_raises():
    with pytest.raises(ValueError, match="fold 5 is not in"):
        fold_indices(10, 5, 5, seed=0)


def test_each_folds_validation_reviews_partition_the_train_split(aclimdb):
    base = aclimdb({"train": 20})
    everything = collections.Counter(pairs(read_aclimdb(base, "train")))
    seen: collections.Counter = collections.Counter()
    for fold in range(4):
        cfg = data_config(base, folds=4, fold=fold)
        train = collections.Counter(pairs(load_reviews(cfg, "train")))
        validation = collections.Counter(pairs(load_reviews(cfg, "validation")))
        assert sum(validation.values()) == 10
        assert not (train & validation)
        assert train + validation == everything
        seen += validation
    assert seen == everything  # the folds' validation parts: each review once


def test_folds_ignore_the_validation_fraction(aclimdb):
    base = aclimdb({"train": 20})
    one = load_reviews(data_config(base, folds=4, fold=2, validation_fraction=0.1), "validation")
    other = load_reviews(data_config(base, folds=4, fold=2, validation_fraction=0.5), "validation")
    assert pairs(one) == pairs(other)


def test_same_seed_same_split_other_seed_other_split(aclimdb):
    base = aclimdb({"train": 20})
    first = load_reviews(data_config(base, seed=7), "validation")
    again = load_reviews(data_config(base, seed=7), "validation")
    other = load_reviews(data_config(base, seed=8), "validation")
    assert pairs(first) == pairs(again)
    assert set(pairs(first)) != set(pairs(other))


def test_split_is_the_same_from_directory_and_tarball(aclimdb):
    # Workers may be handed different copies of the data; they must agree on the split.
    base = aclimdb({"train": 20})
    from_dir = load_reviews(data_config(base, seed=3), "validation")
    from_tar = load_reviews(data_config(as_source(base, "tar"), seed=3), "validation")
    assert pairs(from_dir) == pairs(from_tar)


def test_test_split_is_returned_whole(aclimdb):
    base = aclimdb({"train": 5, "test": 4})
    reviews = load_reviews(data_config(base), "test")
    assert collections.Counter(pairs(reviews)) == on_disk(base, "test")


@pytest.mark.parametrize("split", ["dev", "unsup", "TRAIN", ""])
def test_unknown_split_is_refused(aclimdb, split):
    base = aclimdb({"train": 3})
    with pytest.raises(DataError, match=rf"unknown split {re.escape(repr(split))}"):
        load_reviews(data_config(base), split)


@pytest.mark.parametrize(
    ("source", "path", "env", "expected"),
    [
        ("auto", "/cfg/aclImdb", None, ("aclimdb", "/cfg/aclImdb")),
        ("auto", "/cfg/aclImdb", "/env/aclImdb", ("aclimdb", "/cfg/aclImdb")),
        ("auto", None, "/env/aclImdb", ("aclimdb", "/env/aclImdb")),
        # Neither a data path nor $IMDB_DATA: the official archive, downloaded into the default cache.
        ("auto", None, None, ("download", None)),
        ("auto", None, "", ("download", None)),
        ("aclimdb", None, "/env/aclImdb", ("aclimdb", "/env/aclImdb")),
        # download: data.path is the cache directory, and $IMDB_DATA (an aclImdb source) is not one.
        ("download", None, "/env/aclImdb", ("download", None)),
        ("download", "/cache", None, ("download", "/cache")),
        ("tfds", None, "/env/aclImdb", ("tfds", None)),
        ("tfds", "/tfds/dir", None, ("tfds", "/tfds/dir")),
        ("keras", "/k/imdb.npz", "/env/aclImdb", ("keras", "/k/imdb.npz")),
    ],
)
def test_resolve_source(monkeypatch, source, path, env, expected):
    if env is None:
        monkeypatch.delenv(ENV_PATH, raising=False)
    else:
        monkeypatch.setenv(ENV_PATH, env)
    assert resolve_source(DataConfig(source=source, path=path)) == expected


def test_load_reviews_reads_the_env_path_when_source_is_auto(aclimdb, monkeypatch):
    base = aclimdb({"train": 4, "test": 3})
    monkeypatch.setenv(ENV_PATH, str(as_source(base, "tar")))
    reviews = load_reviews(DataConfig(), "test")
    assert collections.Counter(pairs(reviews)) == on_disk(base, "test")


def test_aclimdb_source_without_any_path_is_refused(monkeypatch):
    monkeypatch.delenv(ENV_PATH, raising=False)
    with pytest.raises(DataError, match="data.source aclimdb needs data.path"):
        load_reviews(DataConfig(source="aclimdb"), "train")


def test_decode_keras_maps_ids_back_to_words():
    word_index = {"superb": 1, "film": 2, "dreadful": 3}
    # With index_from=3 a word of rank r has id r + 3; 0, 1 and 2 are padding, start and out-of-vocabulary.
    sequences = [[1, 4, 5, 2, 6], [0, 0, 1, 6, 999, 4], [], [1, 2, 3]]
    assert decode_keras(sequences, word_index) == ["superb film dreadful", "dreadful superb", "", ""]


def test_decode_keras_honours_index_from():
    assert decode_keras([[1, 2, 3, 4]], {"film": 1, "plot": 2}, index_from=2) == ["film plot"]


def test_tfds_source_gives_texts_labels_and_the_seeded_split():
    """The tfds path, fed by tfds's own offline test data (the real download needs internet)."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        cfg = DataConfig(source="tfds", validation_fraction=0.25)
        train, validation, test = (load_reviews(cfg, split) for split in ("train", "validation", "test"))
    assert (len(train), len(validation), len(test)) == (15, 5, 20)
    assert all(isinstance(t, str) for t in train.texts + validation.texts)
    assert set(np.unique(np.concatenate([train.labels, test.labels]))) <= {0, 1}
    assert train.labels.dtype == np.int32


# read_ahead runs in a fresh interpreter: it forks only while its process has
# one thread and no TensorFlow, which the test process cannot promise.
_READ_AHEAD = """
import json, multiprocessing, os, signal, sys
from imdb_dist.config import DataConfig
from imdb_dist.data.sources import read_ahead
folds = int(sys.argv[2])
cfg = DataConfig(source="aclimdb", path=sys.argv[1], folds=folds, fold=1 if folds else 0)
reading = read_ahead(cfg)
children = [p.name for p in multiprocessing.active_children()]
if sys.argv[3] == "kill":
    os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
if sys.argv[3] == "die":
    os._exit(0)  # killed before asking: no exit handler reaps the reader
try:
    train, val = reading.result()
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
else:
    print(json.dumps({"background": reading.in_background, "children": children, "tf": "tensorflow" in sys.modules,
                      "train": [train.texts, train.labels.tolist()], "val": [val.texts, val.labels.tolist()]}))
"""


def _read_ahead_in_a_fresh_process(path: Path, folds: int = 0, then: str = "") -> dict:
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _READ_AHEAD, str(path), str(folds), then], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("folds", [0, 5])
def test_read_ahead_reads_in_a_child_process_what_load_training_splits_reads(aclimdb, folds):
    from imdb_dist.data.sources import load_training_splits

    base = aclimdb({"train": 30})
    path = make_tarball(base, base.parent.parent / "aclImdb.tar.gz")
    got = _read_ahead_in_a_fresh_process(path, folds)
    assert got["background"] and got["children"] == ["imdb-dist-read"] and not got["tf"]
    train, val = load_training_splits(data_config(path, folds=folds, fold=1 if folds else 0))
    assert got["train"] == [train.texts, train.labels.tolist()]
    assert got["val"] == [val.texts, val.labels.tolist()]


def test_read_ahead_raises_the_childs_data_error_in_the_parent(aclimdb, tmp_path):
    good = make_tarball(aclimdb({"train": 30}), tmp_path / "good.tar.gz").read_bytes()
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(good[: len(good) // 2])
    got = _read_ahead_in_a_fresh_process(bad)
    assert got["error"] == "DataError"
    assert str(bad) in got["message"] and "corrupt or truncated" in got["message"]


def test_read_ahead_says_so_when_its_child_dies(tmp_path):
    import os

    # A FIFO nobody writes to: the child blocks opening it until it is killed.
    fifo = tmp_path / "data.tar.gz"
    os.mkfifo(fifo)
    got = _read_ahead_in_a_fresh_process(fifo, then="kill")
    assert got["error"] == "RuntimeError" and "died" in got["message"] and "-9" in got["message"]


def test_read_ahead_does_not_fork_once_tensorflow_is_loaded(aclimdb):
    import tensorflow  # noqa: F401  (its runtime threads make fork unsafe)

    from imdb_dist.data.sources import load_training_splits, read_ahead

    cfg = data_config(aclimdb({"train": 10}))
    reading = read_ahead(cfg)
    assert not reading.in_background
    train, val = reading.result()
    expected_train, expected_val = load_training_splits(cfg)
    assert (train.texts, val.texts) == (expected_train.texts, expected_val.texts)


def test_a_reader_whose_parent_died_exits_by_itself(aclimdb, tmp_path):
    # Its result (a 2 MB review among them) is far bigger than a pipe's buffer.
    base = aclimdb({"train": 10})
    (base / "train" / "pos" / "999_9.txt").write_text("great " * 350_000, encoding="utf-8")
    import subprocess
    import sys

    # subprocess.run waits for every holder of the stderr pipe: the orphaned reader too.
    proc = subprocess.run(
        [sys.executable, "-c", _READ_AHEAD, str(make_tarball(base, tmp_path / "a.tar.gz")), "0", "die"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0
    assert proc.stderr == ""  # no BrokenPipeError traceback from the reader


def _movie_sets(base: Path, urls_files: list[Path]) -> dict[str, str]:
    """review text -> movie, read back from the generated urls files."""
    movie = {}
    for urls in urls_files:
        lines = urls.read_text().splitlines()
        label = urls.stem.split("_")[1]
        for review in (urls.parent / label).glob("*.txt"):
            movie[review.read_text()] = re.search(r"tt\d+", lines[int(review.name.split("_")[0])]).group(0)
    return movie


@pytest.mark.parametrize("archive", [False, True], ids=["directory", "tarball"])
def test_with_the_archives_urls_files_no_movie_has_reviews_on_both_sides_of_a_split(aclimdb, tmp_path, archive):
    base = aclimdb({"train": 60}, movies=17)
    movie = _movie_sets(base, sorted((base / "train").glob("urls_*.txt")))
    source = make_tarball(base, tmp_path / "data.tar.gz") if archive else base
    splits = [data_config(source, validation_fraction=0.2)] + [data_config(source, folds=4, fold=k) for k in range(4)]
    seen: collections.Counter = collections.Counter()
    for cfg in splits:
        train, validation = (load_reviews(cfg, "train"), load_reviews(cfg, "validation"))
        assert len(train) + len(validation) == 120
        train_movies = {movie[t] for t in train.texts}
        validation_movies = {movie[t] for t in validation.texts}
        assert train_movies and validation_movies and not train_movies & validation_movies
        assert movies(validation) == len(validation_movies)
        if cfg.folds:
            seen += collections.Counter(validation.texts)
        else:
            assert len(validation) >= 24  # at least the fraction: whole movies until it is reached
    assert set(seen) == set(movie) and max(seen.values()) == 1  # the folds' validation parts: each review once


def test_grouped_folds_cover_the_data_and_keep_each_group_in_one_fold():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 1500, 25_000)  # about 17 reviews a movie, up to 30 or so
    parts = [fold_indices(25_000, 5, fold, seed=11, groups=groups) for fold in range(5)]
    validation = np.concatenate([val for _, val in parts])
    assert np.array_equal(np.sort(validation), np.arange(25_000))
    for train, val in parts:
        assert not set(groups[train]) & set(groups[val])
    sizes = [len(val) for _, val in parts]
    assert max(sizes) - min(sizes) <= np.bincount(groups).max()
    # Grouping is not a no-op: the ungrouped folds of the same seed split movies.
    train, val = fold_indices(25_000, 5, 0, seed=11)
    assert set(groups[train]) & set(groups[val])


def test_without_urls_files_reviews_have_no_movies(aclimdb):
    assert read_aclimdb(aclimdb({"train": 5}), "train").groups is None


def test_a_urls_file_without_a_line_for_a_review_is_refused_naming_both(aclimdb):
    base = aclimdb({"train": 6}, movies=3)
    (base / "train" / "urls_neg.txt").write_text("http://www.imdb.com/title/tt0000001/usercomments\n")
    with pytest.raises(DataError, match=r"urls_neg.txt has 1 lines, none for train/neg/1_\d+\.txt"):
        read_aclimdb(base, "train")
