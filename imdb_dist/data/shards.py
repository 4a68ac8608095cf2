"""Prepared data for multi-worker runs: TFRecord shards of raw reviews and a manifest.

The launcher reads the source once, carves the validation split, and writes
each split as ``num_shards`` TFRecord files of ``(text, label)`` examples.
Each worker then opens only its own files (FILE sharding), the scalable
route, when the files divide evenly among the workers; otherwise every
worker reads every file and keeps one in N examples (DATA sharding), with
a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from imdb_dist.data.sources import Reviews

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_FEATURES = {
    "text": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}


def write_prepared(directory: Path, splits: dict[str, Reviews], num_shards: int, meta: dict[str, Any]) -> None:
    """Write every split as TFRecord shards, then the manifest, atomically as a whole.

    The files are written into a hidden sibling directory that is renamed
    into place last, so a crash never leaves a directory that looks prepared.
    """
    staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    manifest: dict[str, Any] = {"meta": meta, "splits": {}}
    for split, reviews in splits.items():
        files = _write_split(staging, split, reviews, min(num_shards, max(len(reviews), 1)))
        manifest["splits"][split] = {"examples": len(reviews), "files": files}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(staging, directory)


def _write_split(directory: Path, split: str, reviews: Reviews, num_shards: int) -> list[str]:
    names = [f"{split}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]
    # Round-robin keeps shard sizes within one example of each other.
    for shard, name in enumerate(names):
        with tf.io.TFRecordWriter(str(directory / name)) as writer:
            for i in range(shard, len(reviews), num_shards):
                writer.write(_example(reviews.texts[i], int(reviews.labels[i])))
    return names


def _example(text: str, label: int) -> bytes:
    feature = {
        "text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode("utf-8")])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a complete preparation in ``directory``, or None."""
    path = directory / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def split_files(directory: Path, split: str) -> list[str]:
    manifest = read_manifest(directory)
    if manifest is None:
        raise FileNotFoundError(f"{directory} holds no prepared data ({MANIFEST} missing)")
    return [str(directory / name) for name in manifest["splits"][split]["files"]]


def worker_files(files: Sequence[str], num_workers: int = 1, index: int = 0) -> list[str]:
    """The files worker ``index`` reads: its own ones (FILE sharding) when they divide evenly, else all."""
    files = list(files)
    return files[index::num_workers] if file_sharded(len(files), num_workers) else files


def file_sharded(num_files: int, num_workers: int) -> bool:
    return num_workers > 1 and num_files % num_workers == 0


def examples(files: Sequence[str], num_workers: int = 1, index: int = 0) -> tf.data.Dataset:
    """``(text, label)`` examples of this worker's part of ``files``.

    FILE sharding when the files divide evenly among the workers (each
    worker reads only its own files, :func:`worker_files`); otherwise DATA
    sharding (every worker reads all files and keeps every
    ``num_workers``-th example), with a warning. Either way the workers'
    shares differ by a few examples at most (:func:`worker_sizes`), so every
    worker's pass over its share takes the same number of steps, give or
    take one.
    """
    dataset = tf.data.TFRecordDataset(worker_files(files, num_workers, index))
    if num_workers > 1 and not file_sharded(len(files), num_workers):
        log.warning(
            "%d shard files do not divide among %d workers: DATA sharding (each worker reads every file); "
            "a ray.num_shards that is a multiple of ray.num_workers lets each worker read only its own",
            len(files),
            num_workers,
        )
        dataset = dataset.shard(num_workers, index)
    return dataset.map(_parse, num_parallel_calls=tf.data.AUTOTUNE)


def strided_sizes(n: int, parts: int) -> list[int]:
    """Sizes of ``range(n)[i::parts]`` for each ``i``: how round-robin splits ``n`` items."""
    return [len(range(i, n, parts)) for i in range(parts)]


def worker_sizes(n: int, num_files: int, num_workers: int) -> list[int]:
    """Examples each worker gets from :func:`examples` over ``num_files`` round-robin-written shards of ``n``."""
    if file_sharded(num_files, num_workers):
        per_file = strided_sizes(n, num_files)
        return [sum(per_file[w::num_workers]) for w in range(num_workers)]
    return strided_sizes(n, num_workers)


def _parse(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    parsed = tf.io.parse_single_example(record, _FEATURES)
    return parsed["text"], tf.cast(parsed["label"], tf.int32)


def load_split(directory: Path, split: str) -> Reviews:
    """A whole prepared split in memory (for scoring the export on validation)."""
    texts, labels = [], []
    for text, label in examples(split_files(directory, split)).as_numpy_iterator():
        texts.append(text.decode("utf-8"))
        labels.append(label)
    return Reviews(texts, np.asarray(labels, dtype=np.int32))
