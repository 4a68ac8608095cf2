"""Exporting and loading the serving model (TF-Serving layout ``model/<version>/``).

The export is one SavedModel holding the tokenizer and the network, so it
scores raw review text with no Python of ours: signature ``serving_default``
takes ``text`` (string ``[None]``) and returns ``score`` (float32
``[None, 1]``, the probability that the review is positive).

In a run directory the exports are ``model/<version>/`` (TF-Serving's
layout, :mod:`imdb_dist.rundir.versions`); :func:`locate_model` finds the
complete one a user names, local or on remote storage.

A SavedModel is a program: load one only from storage you trust.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow as tf
import tf_keras as keras

from imdb_dist import __version__, storage
from imdb_dist.config import DataConfig, ModelConfig
from imdb_dist.data.pipeline import Tokenizer, encode_padded
from imdb_dist.errors import InputError, RunError, write_failure
from imdb_dist.model import build_model, ensemble_score
from imdb_dist.rundir import CONFIG, MODEL, MODEL_MARKER, REPORT
from imdb_dist.rundir.versions import newest_complete

SIGNATURE = "serving_default"
# Written into a version last: it marks the version complete (imdb_dist.rundir.versions).
METADATA = Path(MODEL_MARKER)


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


def export_trained(
    model_cfg: ModelConfig, data_cfg: DataConfig, model_root: Path, tokenizer: Tokenizer, model: keras.Model,
    *, version: int,
) -> Path:
    """Export a float32 copy of the trained ``model`` as ``model_root/<version>``, with the data it expects.

    A fresh float32 model outside any strategy: the export then holds plain
    variables and serves at full speed on CPUs, whatever the training policy.
    """
    serving = build_model(model_cfg, vocab_size=tokenizer.vocabulary_size())
    serving.set_weights(model.get_weights())
    metadata = {
        "max_len": data_cfg.max_len,
        "validation_fraction": data_cfg.validation_fraction,
        "folds": data_cfg.folds,
        "fold": data_cfg.fold,
        "seed": data_cfg.seed,
        "imdb_dist_version": __version__,
    }
    return export_model(model_root, tokenizer, serving, data_cfg.max_len, metadata, version=version)


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
    except Exception as exc:  # noqa: BLE001 - corrupt protobufs and missing variables raise many types.
        raise InputError(f"{export} is not a loadable SavedModel: {str(exc).splitlines()[0]}") from None
    meta_path = export / METADATA
    if SIGNATURE not in loaded.signatures or not meta_path.is_file():
        raise InputError(f"{export} is a SavedModel but not an imdb-dist export (no {SIGNATURE} or {METADATA})")
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{meta_path} is unreadable: {exc}") from None
    return ServedModel(export, metadata, loaded)


@contextlib.contextmanager
def locate_model(where: str, key: str = "--model") -> Iterator[Path]:
    """A local path to a complete model version, given a run directory, its ``model/``, or one version.

    A run directory must be complete (its ``report.json`` names the version
    it published); a ``model/`` gives its newest complete version; a version
    must be complete itself (:mod:`imdb_dist.rundir.versions`). A remote one is
    downloaded to a temporary directory for the duration.

    Raises:
        InputError: nothing complete there, or the storage cannot be read.
    """
    location = storage.parse(where, key)
    try:
        with _model_version(location, key) as path:
            yield path
    except OSError as exc:
        raise InputError(f"{key} {location}: cannot read it: {storage.reason(exc)}") from None


@contextlib.contextmanager
def _model_version(location: storage.Location, key: str) -> Iterator[Path]:
    if location.local:
        files = {p.relative_to(location.path).as_posix(): 0 for p in Path(location.path).rglob("*") if p.is_file()} \
            if Path(location.path).is_dir() else {}
        read = (lambda name: (Path(location.path) / name).read_bytes()) if files else None
    else:
        files = storage.list_files(location)
        read = lambda name: storage.read_bytes(location.child(*name.split("/"))) or b""
    if not files:
        exists = Path(location.path).exists() if location.local else False
        raise InputError(
            f"{key} {location} holds no complete imdb-dist model export" if exists else f"{key} {location} does not exist"
        )
    if REPORT in files or CONFIG in files:  # a run directory
        if REPORT not in files:
            raise InputError(
                f"{key} {location} is a run directory whose run is not complete (no {REPORT}: still training, or "
                f"stopped): give its {MODEL}/ for the newest complete export, or wait for the run to finish"
            )
        report = json.loads(read(REPORT))
        version = str(report.get("model_version") or newest_complete(files, MODEL) or "")
        prefix = f"{MODEL}/{version}"
    elif posixpath.basename(location.path).isdigit() or "saved_model.pb" in files or MODEL_MARKER in files:
        # One version (what it holds so far: its upload may not have finished).
        prefix = ""
    else:  # a model root
        version = newest_complete(files, "")
        if version is None:
            raise InputError(f"{key} {location} holds no complete model export (no <version>/{MODEL_MARKER})")
        prefix = str(version)
    marker = f"{prefix}/{MODEL_MARKER}".lstrip("/")
    if marker not in files:
        raise InputError(
            f"{key} {location.child(*prefix.split('/')) if prefix else location} is not a complete model export "
            f"(no {MODEL_MARKER}: its upload did not finish)"
        )
    if location.local:
        yield Path(location.path, prefix)
        return
    with tempfile.TemporaryDirectory(prefix="imdb-dist-model-") as scratch:
        target = Path(scratch) / (prefix.rsplit("/", 1)[-1] or "model")
        storage.download(location.child(*prefix.split("/")) if prefix else location, target)
        yield target
