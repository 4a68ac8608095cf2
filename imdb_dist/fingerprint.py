"""What a trained model depends on, recorded in its run directory and checked when the run resumes.

A resumed run must train the model the run began: the same data, batches,
network, optimisation and precision. Everything else is operational and may
change between attempts: how many workers and replicas train it, how often
it checkpoints or logs, Ray's retries and storage, where the data file
lives (if its content is the same), determinism, ``steps_per_execution``.

The fingerprint holds the model-defining config keys (:data:`MODEL_KEYS`,
every ``model.*``), the resolved precision (``auto`` is float16 on GPUs and
float32 on CPUs: not a config value), the cosine schedule's length (its
epochs), the data plan's version (:data:`imdb_dist.data.plan.PLAN_VERSION`),
and a hash of the training and validation reviews in order. A resume that
would change one of them stops (exit 2) naming the key, unless the command
names it as meant to change (``--change KEY``, e.g. the lower learning rate
the loss guard advises); each such change is kept in ``changes.jsonl`` and
in ``report.json``. The fingerprint is ``fingerprint.json`` in the run
directory, beside the config and checkpoints it describes.

This module computes and compares; :class:`imdb_dist.rundir.RunDir` reads
and writes the files.

``train.epochs``: with a constant learning rate more epochs extend the run
(the steps so far are the start of the longer run's). A cosine schedule's
curve is as long as the whole run, so more epochs would make it a different
run: refused unless named, and then the learning rate follows the longer
curve from the step the run is at (it jumps up to that curve's value).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from imdb_dist.config import Config, to_dict
from imdb_dist.errors import InputError

# Config keys the trained weights depend on (besides every model.* key):
# which reviews train and validate, how they are cut into batches and
# encoded, and the optimisation. Not here, because a resume may change them
# freely: the data's location (its content is hashed instead), the
# distribution, precision's config value (its resolved value is kept),
# train.epochs (see the module docstring), steps_per_execution and
# determinism (the same steps; tested bitwise), checkpoints, logging, ray.*.
MODEL_KEYS = frozenset({
    "data.validation_fraction", "data.folds", "data.fold", "data.seed", "data.vocab_size", "data.max_len",
    "data.bucketing", "data.bucket_width",
    "train.batch_size", "train.learning_rate", "train.lr_schedule", "train.seed", "train.early_stopping_patience",
})
# What the derived parts of the fingerprint are named by, in errors and in --change.
DERIVED_KEYS = {
    "precision": "train.mixed_precision",
    "schedule_epochs": "train.epochs",
    "plan_version": "data.plan_version",
    "data": "data.content",
}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"section.key": value}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def model_config(cfg: Config) -> dict[str, Any]:
    """The model-defining keys of ``cfg`` and their values."""
    return {k: v for k, v in flatten(to_dict(cfg)).items() if k in MODEL_KEYS or k.startswith("model.")}


def changeable_keys(cfg: Config) -> frozenset[str]:
    """Every name ``--change`` accepts: the model-defining config keys and the derived parts."""
    return frozenset(model_config(cfg)) | frozenset(DERIVED_KEYS.values())


def check_changes(cfg: Config, changes: Sequence[str]) -> None:
    """Refuse a ``--change`` that names nothing a resume checks (a typo would otherwise pass silently)."""
    known = changeable_keys(cfg)
    for key in changes:
        if key not in known:
            raise InputError(
                f"--change {key}: not a key a resume checks; operational keys (workers, checkpoints, paths, "
                f"ray.*) may change without it. It accepts: {', '.join(sorted(known))}"
            )


def data_digest(splits: Iterable[tuple[Sequence[str], np.ndarray]]) -> str:
    """sha256 over the reviews and labels of each split, in order: the data's content, wherever it is read from."""
    digest = hashlib.sha256()
    for texts, labels in splits:
        digest.update(np.asarray(labels, dtype=np.int64).tobytes())
        for text in texts:
            encoded = text.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What the run's model depends on (see the module docstring)."""

    config: dict[str, Any]
    precision: str
    # The epochs a cosine schedule's curve spans (its length in steps is
    # that times the steps per epoch, which the data and batch size fix);
    # None for a constant learning rate, which any number of epochs extends.
    schedule_epochs: int | None
    plan_version: int
    data: str

    @classmethod
    def of(cls, cfg: Config, *, precision: str, plan_version: int, data: str) -> Fingerprint:
        cosine = cfg.train.lr_schedule == "cosine"
        return cls(model_config(cfg), precision, cfg.train.epochs if cosine else None, plan_version, data)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Fingerprint:
        return cls(**saved)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def parts(self) -> dict[str, Any]:
        """Every checked value by the name errors and ``--change`` use."""
        named = {DERIVED_KEYS[k]: v for k, v in dataclasses.asdict(self).items() if k in DERIVED_KEYS}
        return {**self.config, **named}


def check_config(previous: Config, current: Config, where: object, changes: Sequence[str] = ()) -> None:
    """Refuse, before any data is read, a resume whose config would train another model.

    Only the model-defining keys count, and ``train.epochs`` under a cosine
    schedule; ``changes`` names the keys meant to change; ``where``: the run
    directory, for the message. The data's content, the resolved precision
    and the plan version are checked once the data is read (:func:`check`).

    Raises:
        InputError: naming the first key that differs and was not named.
    """
    changed = differences(model_config(previous), model_config(current))
    cosine = "cosine" in (previous.train.lr_schedule, current.train.lr_schedule)
    if cosine and previous.train.epochs != current.train.epochs:
        changed["train.epochs"] = (previous.train.epochs, current.train.epochs)
    refuse_unnamed(changed, changes, where)


def same_run(previous: Config, current: Config) -> bool:
    """True if ``current`` trains ``previous``'s model for as many epochs (operational keys aside)."""
    return model_config(previous) == model_config(current) and previous.train.epochs == current.train.epochs


def check(previous: Fingerprint | None, current: Fingerprint, where: object, changes: Sequence[str] = ()) -> None:
    """Refuse a resume whose fingerprint differs from the run's saved one in a key ``changes`` does not name.

    ``previous`` is None for a run that saved none yet (a new run); ``where``: the run directory, for the message.

    Raises:
        InputError: naming the key (see :func:`refuse_unnamed`).
    """
    if previous is not None:
        refuse_unnamed(differences(previous.parts(), current.parts()), changes, where)


def differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` for every key whose value differs."""
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def refuse_unnamed(changed: dict[str, tuple[Any, Any]], named: Sequence[str], where: object) -> None:
    """Raise for the first change the command did not name.

    Raises:
        InputError: naming the key, its old and new value, and how to proceed.
    """
    unnamed = [key for key in changed if key not in named]
    if unnamed:
        key = unnamed[0]
        old, new = changed[key]
        more = f" (and {', '.join(unnamed[1:])})" if len(unnamed) > 1 else ""
        raise InputError(
            f"run.output_dir {where} holds a run whose {key} is {old!r}, not {new!r}{more}: resuming would "
            f"train another model; to change it from here on, add --change {key} (recorded in the report), "
            "or choose another run directory"
        )


def changes_made(previous: Fingerprint | None, current: Fingerprint, at: dict[str, int]) -> list[dict[str, Any]]:
    """The ``changes.jsonl`` records of what differs from ``previous`` to ``current`` (the check has passed).

    ``at`` says where the run is when they take effect (``{"epochs_done": N}``).
    """
    if previous is None:
        return []
    changed = differences(previous.parts(), current.parts())
    return [{"key": key, "from": old, "to": new, **at} for key, (old, new) in changed.items()]
