"""The driver's one-time preparation of a multi-worker run: decide, lease, vocabulary and token store.

:func:`imdb_dist.launch.launch` calls :func:`prepare` once, before it starts
the workers: it reads and checks the data (bad data needs no cluster and
writes nothing), takes the run directory's lease, and writes what every
worker reads (config, fingerprint, vocabulary, the token store of every
review's ids: :mod:`imdb_dist.data.store`) into the run directory
(:class:`imdb_dist.rundir.RunDir`). Tokenizing runs as a Ray Data job
across the cluster, or in this process for a small corpus
(``ray.prepare``). A resume reuses the store, once it is checked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from imdb_dist import fingerprint, rundir
from imdb_dist.config import Config, to_dict
from imdb_dist.data.sources import load_training_splits, movies

log = logging.getLogger(__name__)

# ray.prepare auto: training reviews from which Ray Data tokenizes, across the cluster.
# Below, one process is sooner: Ray Data's tasks first start processes that import
# TensorFlow (docs/BENCHMARKS.md, "Preparation at 1×, 10× and 100× IMDB").
RAY_DATA_FROM = 200_000


def prepare(
    cfg: Config,
    run_dir: rundir.RunDir,
    *,
    before_writing: Callable[[], None] = lambda: None,
    changes: Sequence[str] = (),
) -> str | None:
    """Lease and open the run directory, write vocabulary and TFRecord shards once (a resume reuses them), sync.

    Decided before any write, so resubmitting a finished job changes
    nothing: returns None when the run is already complete, else the id of
    the lease this process now holds. ``before_writing`` runs once the data
    is read and checked, before the first write: :func:`launch` joins the
    cluster there and checks it. A resume is checked against the run's
    fingerprint (:mod:`imdb_dist.fingerprint`; ``changes``: keys meant to
    change).

    Raises:
        DataError: the source is missing or malformed (nothing is written then).
        InputError: another live run holds the directory, or it is not a run.
    """
    from imdb_dist.data import preparation, shards
    from imdb_dist.data.training import check_sizes, in_memory_data

    # A local directory is checked before its first look (a file there would fail the look); a
    # remote one after it, since its check writes a probe and a finished job resubmitted writes nothing.
    # Before that look, a remote one must answer within seconds: nothing is running yet that
    # storage.py's long retry budget protects, so an unreachable endpoint is one line now.
    if run_dir.remote:
        run_dir.check_reachable()
    else:
        run_dir.check_writable()
    if run_dir.holds_complete(cfg, changes):
        return None
    if run_dir.remote:
        run_dir.check_writable()
    target = run_dir.work / rundir.PREPARED
    saved = run_dir.saved_fingerprint()
    # Prepared shards are written after the fingerprint, under the lease: all three, or prepare again.
    manifest = shards.read_manifest(target)
    vocabulary = run_dir.vocabulary()
    # A run prepared before the token store (text shards only) is prepared again, from its source.
    prepared = manifest is not None and "store" in manifest and vocabulary is not None and saved is not None
    if prepared:
        assert saved is not None and manifest is not None and vocabulary is not None
        log.info("reusing the prepared data in %s", run_dir.location.child(rundir.PREPARED))
        check_store(run_dir, manifest, vocabulary)
        # The prepared shards are the data this run trains on, wherever data.path points now.
        current = _fingerprint(cfg, saved.data)
        train = val = None
    else:
        train, val = load_training_splits(cfg.data)
        # The workers' own check, before anything is written: a global batch, and validation reviews.
        check_sizes(in_memory_data(cfg.data, (train, val)), cfg.train.batch_size)
        current = _fingerprint(cfg, fingerprint.data_digest([(train.texts, train.labels), (val.texts, val.labels)]))
    run_dir.check_fingerprint(current, changes)
    before_writing()
    lease = run_dir.take(cfg, current, changes)
    if lease is None:
        return None
    if train is not None and val is not None:
        engine = _engine(cfg, len(train))

        def tokenized(directory: Path) -> dict[str, Any]:
            # Counted and encoded once, here, so every replica shares the same token ids.
            vocabulary, section = preparation.write_store(
                directory, {"train": train, "validation": val}, engine,
                vocab_size=cfg.data.vocab_size, max_len=cfg.data.max_len,
            )
            run_dir.write_vocabulary(vocabulary)
            return {"store": section}

        meta = {"data": to_dict(cfg)["data"], "validation_movies": movies(val)}
        # The validation text beside the store: the export, scored at the end, reads raw reviews.
        shards.write_prepared(target, {"validation": val}, cfg.ray.num_shards, meta=meta, more=tokenized)
        log.info("prepared %d training and %d validation reviews in %s", len(train), len(val), run_dir)
    # The shards before the manifest (rundir's upload order): a manifest only ever names files that are there.
    run_dir.sync()
    return lease


def _engine(cfg: Config, reviews: int) -> Any:
    """Ray Data across the cluster, or this process (``ray.prepare``; ``auto``: by the training split's size)."""
    from imdb_dist.data import preparation

    choice = cfg.ray.prepare
    if choice == "auto":
        choice = "ray_data" if reviews >= RAY_DATA_FROM else "local"
    if choice == "local":
        return preparation.LocalEngine()
    return preparation.RayDataEngine(cfg.ray.prepare_workers or None)


def check_store(run_dir: rundir.RunDir, manifest: dict[str, Any], vocabulary: list[str]) -> None:
    """Refuse a prepared token store that is incomplete, cut short or of another vocabulary (DataError), before training."""
    from imdb_dist.data import store

    files = store.files_at(run_dir.location.child(rundir.PREPARED), run_dir.work / rundir.PREPARED)
    for split in ("train", "validation"):
        store.open_split(files, manifest.get("store"), split, vocabulary).close()


def _fingerprint(cfg: Config, digest: str) -> fingerprint.Fingerprint:
    """The run's fingerprint, with the precision its workers will resolve (GPU workers: ``auto`` is float16)."""
    from imdb_dist.data.plan import PLAN_VERSION
    from imdb_dist.distribute import resolve_precision

    gpu = cfg.ray.use_gpu and not cfg.distribution.cpu_devices
    return fingerprint.Fingerprint.of(
        cfg,
        precision=resolve_precision(cfg.train.mixed_precision, gpu=gpu),
        plan_version=PLAN_VERSION,
        data=digest,
    )
