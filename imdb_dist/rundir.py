"""The run directory: its layout, resume rules and atomic writes.

Only the chief calls the writing functions here. A run directory is
complete when ``report.json`` exists: it is written last, atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from imdb_dist.config import Config, dump_yaml, load_config, to_dict
from imdb_dist.errors import ConfigError, InputError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
STEPS = "steps.jsonl"
VOCAB = "vocab.txt"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
MODEL = "model"
REPORT = "report.json"
CURVES = "curves.png"
# Keys that may change between an interrupted run and its resumption:
# more epochs extend a run; the directory may have been moved.
_RESUMABLE_CHANGES = {"train.epochs", "run.output_dir"}


def check_writable(path: Path) -> None:
    """Fail early, before any data is read, if ``path`` cannot be created or written."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise InputError(f"run.output_dir {path}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"run.output_dir {path} is not writable ({probe} denies write access)")


def prior_config(run_dir: Path) -> Config | None:
    """The config a previous run saved in ``run_dir``, or None for a new run.

    Raises:
        InputError: the directory holds files but is not an imdb-dist run,
            or its config differs from a resumable change.
    """
    saved = run_dir / CONFIG
    if not saved.exists():
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise InputError(f"run.output_dir {run_dir} is not empty and holds no {CONFIG}: not an imdb-dist run")
        return None
    try:
        return load_config(saved)
    except ConfigError as exc:
        raise InputError(f"{saved} cannot be resumed: {exc}") from None


def check_resumable(previous: Config, current: Config, run_dir: Path) -> None:
    """Refuse to mix two different runs' checkpoints in one directory."""
    old, new = _flatten(to_dict(previous)), _flatten(to_dict(current))
    changed = sorted(
        k
        for k in old.keys() | new.keys()
        # The tune section only steers `imdb-dist tune`; a run does not read it.
        if old.get(k) != new.get(k) and k not in _RESUMABLE_CHANGES and not k.startswith("tune.")
    )
    if changed:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
        raise InputError(
            f"run.output_dir {run_dir} holds a run with a different config ({detail}); "
            "choose another run.output_dir or remove it"
        )


def already_complete(run_dir: Path, current: Config) -> bool:
    """True if ``run_dir`` holds a finished run of exactly ``current``.

    Raises:
        InputError: the directory is not a run, or holds a run of another config.
    """
    previous = prior_config(run_dir)
    if previous is None:
        return False
    check_resumable(previous, current, run_dir)
    same = dataclasses.replace(previous, tune=current.tune) == current
    return same and (run_dir / REPORT).exists()


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``path`` so that readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, mode) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # a failed write() names no file; the CLI's message should
        raise


def begin(run_dir: Path, config: Config) -> None:
    """(Re)open ``run_dir`` to train ``config``: drop a stale report, then save the config.

    A run that trains again (more epochs) is no longer complete until it
    writes a new report; the report goes first so a crash never leaves a new
    config beside an old report.
    """
    (run_dir / REPORT).unlink(missing_ok=True)
    atomic_write(run_dir / CONFIG, dump_yaml(config))


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_vocab(run_dir: Path) -> list[str] | None:
    path = run_dir / VOCAB
    return path.read_text(encoding="utf-8").split("\n")[:-1] if path.exists() else None


def write_vocab(run_dir: Path, tokens: list[str]) -> None:
    atomic_write(run_dir / VOCAB, "".join(f"{t}\n" for t in tokens))
