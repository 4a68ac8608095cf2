"""The run directory: its layout, the config a previous run left, and atomic writes.

Whether a run may resume in it is :mod:`imdb_dist.fingerprint`'s decision.

Only the chief calls the writing functions here. A run directory is
complete when ``report.json`` exists: it is written last, atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

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
            or its config cannot be read.
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
