"""The token store (imdb_dist.data.store) and its two writers (imdb_dist.data.preparation), on the real reviews."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import REAL_DATA, tiny_overrides, write_aclimdb

from imdb_dist import rundir
from imdb_dist.config import load_config
from imdb_dist.data import pipeline, plan, preparation, store
from imdb_dist.data.sources import Reviews, read_aclimdb, subset
from imdb_dist.errors import DataError
from imdb_dist.prepare import prepare

VOCAB, MAX_LEN = 5000, 200


@pytest.fixture(scope="module")
def splits() -> dict[str, Reviews]:
    """9,000 real training reviews (three of preparation's blocks) and 1,000 for validation, both classes mixed."""
    if not REAL_DATA.is_file():
        pytest.skip(f"real IMDB data not found at {REAL_DATA}")
    reviews = read_aclimdb(REAL_DATA, "train")
    order = np.random.default_rng(7).permutation(len(reviews))
    return {"train": subset(reviews, np.sort(order[:9000])), "validation": subset(reviews, np.sort(order[9000:10000]))}


@pytest.fixture(scope="module")
def local_store(splits: dict[str, Reviews], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], dict]:
    directory = tmp_path_factory.mktemp("local-store")
    vocabulary, section = preparation.write_store(directory, splits, preparation.LocalEngine(),
                                                  vocab_size=VOCAB, max_len=MAX_LEN)
    return directory, vocabulary, section


def opened(local_store: tuple[Path, list[str], dict], split: str = "train") -> store.TokenStore:
    directory, vocabulary, section = local_store
    return store.open_split(store.local_files(directory), section, split, vocabulary)


def test_the_store_holds_the_ids_todays_tokenizer_gives_each_review_cut_to_its_last_max_len(splits, local_store) -> None:
    train = splits["train"]
    today = pipeline.fit_tokenizer(train.texts, VOCAB)
    _, vocabulary, section = local_store
    assert vocabulary == today.vocabulary  # the same words, so the same ids
    encoded = pipeline.encode_examples(tf.data.Dataset.from_tensor_slices((train.texts, train.labels)), today, MAX_LEN)
    stored = opened(local_store)
    assert np.array_equal(stored.lengths, encoded.lengths) and stored.lengths.max() == MAX_LEN
    assert np.array_equal(stored.labels, train.labels)
    values, _ = stored.rows(np.arange(len(train)))
    assert np.array_equal(values, encoded.tokens.flat_values.numpy())
    assert section["id_dtype"] == "uint16" and section["length_dtype"] == "uint16"
    assert section["splits"]["train"]["files"]["tokens"]["bytes"] == 128 + 2 * int(encoded.lengths.sum())


def test_ray_data_across_two_workers_writes_the_same_bytes_as_one_process(splits, local_store, tmp_path: Path) -> None:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        vocabulary, section = preparation.write_store(tmp_path, splits, preparation.RayDataEngine(2),
                                                      vocab_size=VOCAB, max_len=MAX_LEN)
    finally:
        ray.shutdown()
    directory, local_vocabulary, local_section = local_store
    assert vocabulary == local_vocabulary and section == local_section
    names = sorted(path.name for path in directory.iterdir())
    assert names == sorted(path.name for path in tmp_path.iterdir()) and len(names) == 6

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert [digest(directory / name) for name in names] == [digest(tmp_path / name) for name in names]


def test_rows_come_back_in_the_order_asked_and_adjacent_rows_are_one_read(local_store) -> None:
    stored = opened(local_store)
    everything, _ = stored.rows(np.arange(len(stored)))
    offsets = np.concatenate([[0], np.cumsum(stored.lengths)])
    index = np.array([41, 7, 8, 9, 40, 3000])  # runs: 7-9, 40-41, 3000
    values, lengths = stored.rows(index)
    assert np.array_equal(values, np.concatenate([everything[offsets[i]:offsets[i + 1]] for i in index]))
    assert np.array_equal(lengths, stored.lengths[index])
    assert stored.requests == 1 + 3
    assert stored.fetched_bytes == 2 * (len(everything) + int(stored.lengths[index].sum()))
    tokens, labels = stored.gather(tf.constant(index))
    assert tokens.to_list() == [list(everything[offsets[i]:offsets[i + 1]]) for i in index]
    assert labels.numpy().tolist() == stored.labels[index].tolist()
    # A row named twice (a window of batches across an epoch's end) is fetched once.
    before = stored.fetched_bytes, stored.requests
    values, _ = stored.rows(np.array([12, 3000, 12]))
    assert np.array_equal(values, np.concatenate([everything[offsets[i]:offsets[i + 1]] for i in (12, 3000, 12)]))
    assert (stored.fetched_bytes - before[0], stored.requests - before[1]) == (
        2 * int(stored.lengths[[12, 3000]].sum()), 2)


def test_ranges_closer_than_the_hole_limit_are_one_read_and_no_read_passes_the_range_limit() -> None:
    starts, ends = np.array([0, 10, 30, 100, 400, 420]), np.array([10, 20, 40, 300, 410, 700])
    assert store.coalesce(starts, ends, 0, 1000) == [(0, 20), (30, 10), (100, 200), (400, 10), (420, 280)]
    assert store.coalesce(starts, ends, 10, 1000) == [(0, 40), (100, 200), (400, 300)]
    assert store.coalesce(starts, ends, 99, 1000) == [(0, 300), (400, 300)]  # 300-400 is a gap of 100
    assert store.coalesce(starts, ends, 100, 1000) == [(0, 700)]
    # 250 bytes at most a read; a range longer than that (100-300 is 200, 420-700 is 280) is read whole.
    assert store.coalesce(starts, ends, 1000, 250) == [(0, 40), (100, 200), (400, 10), (420, 280)]


def test_each_of_two_workers_fetches_only_its_rows_and_trains_todays_batches(splits, local_store) -> None:
    """Bytes fetched halve with two workers; each step's rows are the in-memory path's, id for id."""
    train = splits["train"]
    encoded = pipeline.encode_examples(tf.data.Dataset.from_tensor_slices((train.texts, train.labels)),
                                       pipeline.fit_tokenizer(train.texts, VOCAB), MAX_LEN)
    global_plan = plan.GlobalPlan(encoded.lengths, batch_size=64, seed=3, max_len=MAX_LEN, min_len=5, bucket_width=32)
    fetched = []
    for worker in range(2):
        share = plan.Share(2, 2, worker)
        stored = opened(local_store)
        ours = list(plan.stream(stored, global_plan, share, epochs=1).as_numpy_iterator())
        theirs = list(plan.stream(encoded, global_plan, share, epochs=1).as_numpy_iterator())
        assert len(ours) == len(theirs) == global_plan.steps_per_epoch
        for (a, y), (b, z) in zip(ours, theirs):
            assert np.array_equal(a, b) and np.array_equal(y, z)
        rows = plan.worker_batches(global_plan, share, epochs=1)[0]
        assert stored.fetched_bytes == 2 * int(stored.lengths[rows.ravel()].sum())
        fetched.append(stored.fetched_bytes)
    whole = 2 * int(encoded.lengths[global_plan.batches(0).ravel()].sum())
    assert sum(fetched) == whole
    assert all(0.45 < part / whole < 0.55 for part in fetched)


def test_validation_blocks_from_the_store_are_the_blocks_from_the_text(splits, local_store) -> None:
    from imdb_dist.data.training import in_memory_data, stored_blocks, validation_blocks

    _, vocabulary, _ = local_store
    tokenizer = pipeline.Tokenizer(vocabulary, VOCAB)
    data = in_memory_data(load_config(None, []).data, (splits["train"], splits["validation"]))
    val = opened(local_store, "validation")
    for share in (plan.Share(1), plan.Share(4, 2, 1)):
        from_text, batches = validation_blocks(data, tokenizer, max_len=MAX_LEN, batch_size=384, share=share)
        stored = list(stored_blocks(val, max_len=MAX_LEN, batch_size=384, share=share).as_numpy_iterator())
        expected = list(from_text.as_numpy_iterator())
        assert len(stored) == len(expected) == batches == 3
        for ours, theirs in zip(stored, expected):
            for a, b in zip(ours, theirs):
                assert a.dtype == b.dtype and np.array_equal(a, b)


def test_a_store_missing_a_file_cut_short_or_of_another_vocabulary_is_refused(local_store, tmp_path: Path) -> None:
    directory, vocabulary, section = local_store
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in directory.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    files = store.local_files(copy)
    with pytest.raises(DataError, match="another vocabulary"):
        store.open_split(files, section, "train", [*vocabulary[:-1], "different"])
    with pytest.raises(DataError, match="holds no token store"):
        store.open_split(files, None, "train", vocabulary)
    tokens = copy / "train.tokens.npy"
    data = tokens.read_bytes()
    tokens.write_bytes(data[:-2])
    with pytest.raises(DataError, match="train.tokens.npy is .* bytes .* truncated"):
        store.open_split(files, section, "train", vocabulary)
    tokens.unlink()
    with pytest.raises(DataError, match="train.tokens.npy is missing"):
        store.open_split(files, section, "train", vocabulary)
    (copy / "validation.lengths.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(DataError, match="validation.lengths.npy is .* bytes"):
        store.open_split(files, section, "validation", vocabulary)


def test_preparation_refuses_an_empty_corpus_and_rows_the_store_types_cannot_hold(tmp_path: Path) -> None:
    empty = Reviews([], np.zeros(0, np.int32))
    with pytest.raises(DataError, match="no reviews"):
        preparation.write_store(tmp_path, {"train": empty}, preparation.LocalEngine(), vocab_size=100, max_len=10)
    writer = store.SplitWriter(tmp_path, "train", vocab_size=100, max_len=3)
    with pytest.raises(DataError, match="review 1 has 4 tokens, more than data.max_len 3"):
        writer.append(np.arange(2, 8), np.array([2, 4]), np.array([0, 1]))
    with pytest.raises(DataError, match=r"ids outside \[0, 100\)"):
        writer.append(np.array([2, 100]), np.array([2]), np.array([0]))
    assert store.id_dtype(65536) == np.uint16 and store.id_dtype(65537) == np.uint32
    assert store.length_dtype(65535) == np.uint16 and store.length_dtype(65536) == np.uint32


def test_a_resume_whose_store_was_cut_short_is_refused_before_the_cluster_is_joined(tmp_path: Path) -> None:
    data = write_aclimdb(tmp_path / "data", {"train": 40})
    cfg = load_config(None, tiny_overrides(data, tmp_path / "run"))
    with rundir.RunDir.open(str(tmp_path / "run")) as run_dir:
        assert prepare(cfg, run_dir) is not None
    tokens = tmp_path / "run" / rundir.PREPARED / "train.tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:-1])
    joined = []
    with rundir.RunDir.open(str(tmp_path / "run")) as run_dir, pytest.raises(DataError, match="truncated"):
        prepare(cfg, run_dir, before_writing=lambda: joined.append(True))
    assert not joined


def test_a_run_prepared_before_the_store_is_prepared_again_with_the_same_vocabulary(tmp_path: Path) -> None:
    """A run directory from before the token store (text shards, no store in the manifest) resumes."""
    import json

    data = write_aclimdb(tmp_path / "data", {"train": 40})
    cfg = load_config(None, tiny_overrides(data, tmp_path / "run"))
    with rundir.RunDir.open(str(tmp_path / "run")) as run_dir:
        assert prepare(cfg, run_dir) is not None
        vocabulary = run_dir.vocabulary()
    prepared = tmp_path / "run" / rundir.PREPARED
    manifest = json.loads((prepared / "manifest.json").read_text())
    del manifest["store"]
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    for path in prepared.glob("*.npy"):
        path.unlink()
    with rundir.RunDir.open(str(tmp_path / "run")) as run_dir:
        assert prepare(cfg, run_dir) is not None
        assert run_dir.vocabulary() == vocabulary
    assert json.loads((prepared / "manifest.json").read_text())["store"]["format"] == store.FORMAT
    assert len(list(prepared.glob("*.npy"))) == 6


def test_a_preparation_refused_midway_leaves_nothing_in_the_run_directory(tmp_path: Path) -> None:
    from imdb_dist.data import shards

    def refused(directory: Path) -> dict:
        store.SplitWriter(directory, "train", vocab_size=100, max_len=3).append(
            np.arange(2, 8), np.array([2, 4]), np.array([0, 1]))  # a review longer than max_len
        return {}

    val = Reviews(["a b"], np.array([1], np.int32))
    with pytest.raises(DataError, match="more than data.max_len"):
        shards.write_prepared(tmp_path / "data", {"validation": val}, 1, meta={}, more=refused)
    assert list(tmp_path.iterdir()) == []
