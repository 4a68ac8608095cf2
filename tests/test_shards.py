"""Prepared TFRecord shards: round trip, FILE sharding, the DATA fallback, atomic writes."""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import numpy as np
import pytest

from imdb_dist.data import shards
from imdb_dist.data.sources import Reviews

REVIEWS = Reviews([f"review number {i} é" for i in range(23)], np.array([i % 2 for i in range(23)], np.int32))


def as_pairs(dataset) -> list[tuple[str, int]]:
    return [(t.decode("utf-8"), int(y)) for t, y in dataset.as_numpy_iterator()]


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    shards.write_prepared(directory, {"train": REVIEWS, "validation": Reviews(REVIEWS.texts[:3], REVIEWS.labels[:3])},
                          num_shards=4, meta={"seed": 1})
    return directory


def test_shards_round_trip_every_review(prepared: Path) -> None:
    manifest = shards.read_manifest(prepared)
    assert manifest["splits"]["train"]["examples"] == 23 and len(manifest["splits"]["train"]["files"]) == 4
    assert manifest["meta"] == {"seed": 1}
    pairs = as_pairs(shards.examples(shards.split_files(prepared, "train")))
    assert collections.Counter(pairs) == collections.Counter(zip(REVIEWS.texts, REVIEWS.labels.tolist()))
    loaded = shards.load_split(prepared, "validation")
    assert sorted(loaded.texts) == sorted(REVIEWS.texts[:3])


@pytest.mark.parametrize("workers", [2, 4])
def test_file_sharding_gives_disjoint_parts_that_cover_the_split(prepared: Path, workers: int, caplog) -> None:
    files = shards.split_files(prepared, "train")
    parts = [as_pairs(shards.examples(files, workers, i)) for i in range(workers)]
    assert [len(p) for p in parts] == shards.worker_sizes(23, len(files), workers)
    assert collections.Counter(sum(parts, [])) == collections.Counter(as_pairs(shards.examples(files)))
    assert "DATA sharding" not in caplog.text


@pytest.mark.parametrize("workers", [3, 5])
def test_files_that_do_not_divide_among_the_workers_fall_back_to_data_sharding(prepared: Path, workers, caplog) -> None:
    files = shards.split_files(prepared, "train")
    with caplog.at_level(logging.WARNING):
        parts = [as_pairs(shards.examples(files, workers, i)) for i in range(workers)]
    assert "do not divide among" in caplog.text and "DATA sharding" in caplog.text
    assert [len(p) for p in parts] == shards.worker_sizes(23, len(files), workers)
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1  # balanced, unlike 2/1/1 files
    assert collections.Counter(sum(parts, [])) == collections.Counter(as_pairs(shards.examples(files)))


@pytest.mark.parametrize("num_shards", [16, 4])
def test_three_workers_train_on_every_review_once_per_epoch_in_equally_many_steps(tmp_path: Path, num_shards: int):
    from imdb_dist.data import pipeline

    n, per_worker_batch = 1000, 7
    reviews = Reviews([f"w{i} " * (1 + i % 9) for i in range(n)], np.zeros(n, np.int32))
    shards.write_prepared(tmp_path / "data", {"train": reviews}, num_shards=num_shards, meta={})
    files = shards.split_files(tmp_path / "data", "train")
    tokenizer = pipeline.Tokenizer([f"w{i}" for i in range(48)], 50)
    sizes = shards.worker_sizes(n, len(files), 3)
    steps = max(-(-size // per_worker_batch) for size in sizes)  # what train.steps_per_epoch computes
    for epoch in (0, 1):
        trained = []
        for worker in range(3):
            texts = [t for t, _ in shards.examples(files, 3, worker).as_numpy_iterator()]
            encoded = pipeline.encode_examples(shards.examples(files, 3, worker), tokenizer, 16)
            plan = pipeline.epoch_plan(encoded.lengths, batch_size=per_worker_batch, seed=1, epoch=epoch, worker=worker)
            batches = pipeline.split_for_replicas(plan, 1, steps)
            assert len(batches) == steps  # every worker runs the same number of steps
            trained += [texts[i] for batch in batches for i in batch]
        assert collections.Counter(trained) == collections.Counter(t.encode() for t in reviews.texts)


def test_rewriting_replaces_the_whole_directory_and_leaves_no_staging(prepared: Path) -> None:
    shards.write_prepared(prepared, {"train": Reviews(["only one"], np.array([1], np.int32))}, 4, meta={})
    assert sorted(p.name for p in prepared.iterdir()) == ["manifest.json", "train-00000-of-00001.tfrecord"]
    assert [p.name for p in prepared.parent.iterdir()] == ["data"]


def test_a_directory_without_manifest_is_not_prepared(tmp_path: Path) -> None:
    assert shards.read_manifest(tmp_path) is None
    with pytest.raises(FileNotFoundError):
        shards.split_files(tmp_path, "train")
