"""The driver's one-time preparation (imdb_dist.prepare), without a cluster."""

from __future__ import annotations

from pathlib import Path

from conftest import tiny_overrides, write_aclimdb

from imdb_dist import rundir
from imdb_dist.config import load_config
from imdb_dist.data import store
from imdb_dist.data.sources import load_training_splits, movies
from imdb_dist.data.training import in_memory_data, prepared_data
from imdb_dist.prepare import prepare


def test_both_routes_to_the_data_tell_the_run_how_many_held_out_movies_validation_has(tmp_path: Path) -> None:
    grouped = write_aclimdb(tmp_path / "grouped", {"train": 40}, movies=9)
    cfg = load_config(None, [*tiny_overrides(grouped, tmp_path / "run"), "ray.num_shards=2"])
    _, validation = load_training_splits(cfg.data)
    held_out = movies(validation)
    assert held_out is not None and 0 < held_out < 9
    assert in_memory_data(cfg.data).validation_movies == held_out
    with rundir.RunDir.open(str(tmp_path / "run")) as run_dir:
        assert prepare(cfg, run_dir) is not None
        directory = run_dir.work / rundir.PREPARED
        vocabulary = run_dir.vocabulary()
        assert vocabulary is not None
        data = prepared_data(directory, store.local_files(directory), vocabulary, fetch_text=lambda: None)
        assert data.validation_movies == held_out

    plain = load_config(None, tiny_overrides(write_aclimdb(tmp_path / "plain", {"train": 40}), tmp_path / "other"))
    assert in_memory_data(plain.data).validation_movies is None
