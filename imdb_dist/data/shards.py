"""Prepared data for multi-worker runs: the manifest, and TFRecord shards of raw reviews.

The training job's token ids are in the token store (:mod:`imdb_dist.data.store`);
the validation reviews' text is kept here too, for scoring the export (which
reads raw text) at the end.

The validation split is written as ``num_shards`` TFRecord files of
``(text, label)`` examples, round-robin, and read back in the split's order
(:func:`examples`), all files in parallel.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
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


def write_prepared(
    directory: Path,
    splits: dict[str, Reviews],
    num_shards: int,
    meta: dict[str, Any],
    more: Callable[[Path], dict[str, Any]] | None = None,
) -> None:
    """Write every split as TFRecord shards, then the manifest, atomically as a whole.

    The files are written into a hidden sibling directory that is renamed
    into place last, so a crash never leaves a directory that looks prepared.
    ``more`` writes other files into that directory first (the token store)
    and returns what the manifest says of them.
    """
    staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest: dict[str, Any] = {"meta": meta, "splits": {}}
        if more is not None:
            manifest.update(more(staging))
        for split, reviews in splits.items():
            files = _write_split(staging, split, reviews, min(num_shards, max(len(reviews), 1)))
            manifest["splits"][split] = {"examples": len(reviews), "files": files}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a refused or interrupted preparation leaves nothing
        raise
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


def examples(files: Sequence[str]) -> tf.data.Dataset:
    """The ``(text, label)`` examples of round-robin-written ``files``, in the order they were written.

    Example ``i`` went to file ``i mod F``; reading one record from each file
    in turn (files run out last-first, so the order holds to the end) gives
    them back in order, with the files read in parallel.
    """
    files = list(files)
    dataset = tf.data.Dataset.from_tensor_slices(files).interleave(
        tf.data.TFRecordDataset,
        cycle_length=max(len(files), 1),
        block_length=1,
        num_parallel_calls=min(len(files), 8) or None,
        deterministic=True,
    )
    return dataset.map(_parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


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
