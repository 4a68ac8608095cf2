"""Prepared TFRecord shards: round trip in the split's order, atomic writes."""

from __future__ import annotations

import collections
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


@pytest.mark.parametrize("num_shards", [1, 4, 5, 23, 40])
def test_the_shards_read_back_in_the_order_the_split_was_written(tmp_path: Path, num_shards: int) -> None:
    # The global plan indexes examples by their place in the split: a Ray
    # worker reading the shards must see the order imdb-dist train sees in memory.
    shards.write_prepared(tmp_path / "data", {"train": REVIEWS}, num_shards=num_shards, meta={})
    pairs = as_pairs(shards.examples(shards.split_files(tmp_path / "data", "train")))
    assert pairs == list(zip(REVIEWS.texts, REVIEWS.labels.tolist()))


def test_rewriting_replaces_the_whole_directory_and_leaves_no_staging(prepared: Path) -> None:
    shards.write_prepared(prepared, {"train": Reviews(["only one"], np.array([1], np.int32))}, 4, meta={})
    assert sorted(p.name for p in prepared.iterdir()) == ["manifest.json", "train-00000-of-00001.tfrecord"]
    assert [p.name for p in prepared.parent.iterdir()] == ["data"]


def test_a_directory_without_manifest_is_not_prepared(tmp_path: Path) -> None:
    assert shards.read_manifest(tmp_path) is None
    with pytest.raises(FileNotFoundError):
        shards.split_files(tmp_path, "train")
