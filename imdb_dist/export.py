"""Exporting and loading the serving model (TF-Serving layout ``model/<version>/``).

The export is one SavedModel holding the tokenizer and the network, so it
scores raw review text with no Python of ours: signature ``serving_default``
takes ``text`` (string ``[None]``) and returns ``score`` (float32
``[None, 1]``, the probability that the review is positive).

A SavedModel is a program: load one only from storage you trust.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import tensorflow as tf
import tf_keras as keras

from imdb_dist.data.pipeline import Tokenizer, encode_padded
from imdb_dist.errors import InputError, RunError, write_failure
from imdb_dist.model import ensemble_score

SIGNATURE = "serving_default"
METADATA = Path("assets.extra") / "imdb_dist.json"


class _Serving(tf.Module):
    """What the SavedModel holds: the tokenizer's table, the network's variables and ``serve``.

    The Keras model itself is left out of the tracked state (only its
    variables are saved): given a Keras object, ``tf.saved_model.save`` also
    traces and serializes every layer's call functions for Keras to reload,
    which more than doubled the export's time here (7.1 s against 2.7 s for
    the seed network) and the load's, and serves no one: the export is
    loaded with ``tf.saved_model.load`` and called through its signature.
    """

    def __init__(self, tokenizer: Tokenizer, model: keras.Model, max_len: int) -> None:
        super().__init__(name="imdb_dist")
        self.tokenizer = tokenizer
        self.network_variables = list(model.weights)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        def serve(text: tf.Tensor) -> dict[str, tf.Tensor]:
            tokens = encode_padded(tokenizer, text, max_len)
            return {"score": ensemble_score(model(tokens, training=False))}

        self.serve = serve


def _remove_leftovers(model_root: Path) -> None:
    """Hidden staging/retired directories of an export that was killed (SIGKILL, power loss).

    Only the run's chief exports into a run directory, one run at a time, so
    any such directory is dead.
    """
    for leftover in model_root.glob(".*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in model_root.glob(".*.old-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def export_model(
    model_root: Path,
    tokenizer: Tokenizer,
    model: keras.Model,
    max_len: int,
    metadata: dict[str, Any],
    version: int = 1,
) -> Path:
    """Save ``model_root/<version>`` atomically and return its path.

    The SavedModel is written to a hidden sibling and renamed into place,
    so a crash leaves either the previous export or none, never a part.
    ``version``: a run directory gives each export the next one
    (``imdb_dist.rundir.RunDir.next_model_version``).
    """
    module = _Serving(tokenizer, model, max_len)
    model_root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(model_root)
    target = model_root / str(version)
    staging = model_root / f".{version}.tmp-{os.getpid()}"
    try:
        tf.saved_model.save(module, str(staging), signatures={SIGNATURE: module.serve})
        (staging / METADATA).parent.mkdir(parents=True, exist_ok=True)
        (staging / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except (OSError, tf.errors.OpError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise RunError(f"cannot write the model export in {model_root}: {write_failure(exc)}") from None
    except BaseException:  # a signal, an internal error: leave no staging directory behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        # A directory cannot be replaced in one rename: move the old one aside first.
        retired = model_root / f".{version}.old-{os.getpid()}"
        os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired)
    else:
        os.replace(staging, target)
    return target


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """A loaded export: ``score(texts)`` returns probabilities as a float32 ``[n, 1]`` tensor."""

    path: Path
    metadata: dict[str, Any]
    # The loaded SavedModel owns the variables its signature reads: keep it alive.
    loaded: Any = dataclasses.field(repr=False)

    def score(self, texts: tf.Tensor) -> tf.Tensor:
        return self.loaded.signatures[SIGNATURE](text=texts)["score"]


def find_export(path: Path) -> Path:
    """``path`` itself if it is a SavedModel, else its highest complete version inside (one holding :data:`METADATA`).

    The metadata is written into a version last (``imdb_dist.rundir``), so a
    version without it is one whose upload has not finished.
    """
    if (path / "saved_model.pb").is_file():
        return path
    versions = sorted(
        (int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / METADATA).is_file())
        if path.is_dir()
        else []
    )
    if not versions:
        raise InputError(f"{path} holds no complete imdb-dist model export (no <version>/{METADATA.as_posix()})")
    return path / str(versions[-1])


def load_model(path: str | os.PathLike) -> ServedModel:
    """Load an export made by :func:`export_model` (a run's ``model/`` or ``model/<version>/``).

    Raises:
        InputError: not a SavedModel, or one without our signature and metadata.
    """
    root = Path(path)
    if not root.exists():
        raise InputError(f"model path {root} does not exist")
    export = find_export(root)
    try:
        loaded = tf.saved_model.load(str(export))
    except Exception as exc:  # corrupt protobufs and missing variables raise many types.
        raise InputError(f"{export} is not a loadable SavedModel: {str(exc).splitlines()[0]}") from None
    meta_path = export / METADATA
    if SIGNATURE not in loaded.signatures or not meta_path.is_file():
        raise InputError(f"{export} is a SavedModel but not an imdb-dist export (no {SIGNATURE} or {METADATA})")
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{meta_path} is unreadable: {exc}") from None
    return ServedModel(export, metadata, loaded)
