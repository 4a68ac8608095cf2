"""The run directory: its layout, resume rules and atomic writes.

Only the chief calls the writing functions here. A run directory is
complete when ``report.json`` exists: it is written last, atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imdb_dist import fingerprint
from imdb_dist.config import Config, dump_yaml, load_config
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
# Ray runs: one line per worker group that trained the run (size, cause, where it started).
WORKER_GROUPS = "worker_groups.jsonl"


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


def check_resumable(previous: Config, current: Config, run_dir: Path, changes: Sequence[str] = ()) -> None:
    """Refuse, before any data is read, a resume whose config would train another model.

    Only the model-defining keys count (:mod:`imdb_dist.fingerprint`), and
    ``train.epochs`` under a cosine schedule; ``changes`` names the keys
    meant to change. The data's content, the resolved precision and the
    plan version are checked once the data is read (:func:`imdb_dist.fingerprint.refuse_unnamed`).

    Raises:
        InputError: naming the first key that differs and was not named.
    """
    changed = fingerprint.differences(fingerprint.model_config(previous), fingerprint.model_config(current))
    cosine = "cosine" in (previous.train.lr_schedule, current.train.lr_schedule)
    if cosine and previous.train.epochs != current.train.epochs:
        changed["train.epochs"] = (previous.train.epochs, current.train.epochs)
    fingerprint.refuse_unnamed(changed, changes, run_dir)


def already_complete(run_dir: Path, current: Config, changes: Sequence[str] = ()) -> bool:
    """True if ``run_dir`` holds a finished run of ``current``'s model and epochs (operational keys aside).

    Raises:
        InputError: the directory is not a run, or holds a run of another model.
    """
    previous = prior_config(run_dir)
    if previous is None:
        return False
    check_resumable(previous, current, run_dir, changes)
    same = fingerprint.model_config(previous) == fingerprint.model_config(current)
    return same and previous.train.epochs == current.train.epochs and (run_dir / REPORT).exists()


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


def read_worker_groups(run_dir: Path) -> list[dict[str, Any]]:
    """The Ray worker groups that trained the run so far, oldest first (empty outside Ray)."""
    path = run_dir / WORKER_GROUPS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
