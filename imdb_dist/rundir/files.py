"""The run directory's file names, and how its files are read and written in a local working copy.

Everything here works on a local path (a run directory's working copy,
:attr:`imdb_dist.rundir.RunDir.work`); :class:`imdb_dist.rundir.RunDir`
moves that copy to and from remote storage.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from imdb_dist.errors import InputError
from imdb_dist.lease import LEASE

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
STEPS = "steps.jsonl"
VOCAB = "vocab.txt"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
MODEL = "model"
REPORT = "report.json"
CURVES = "curves.png"
PREPARED = "data"
MANIFEST = f"{PREPARED}/manifest.json"
# What the run's model depends on (imdb_dist.fingerprint), and the deliberate changes made to it on resumes.
FINGERPRINT = "fingerprint.json"
CHANGES = "changes.jsonl"
# Ray runs: one line per worker group that trained the run (size, cause, where it started).
WORKER_GROUPS = "worker_groups.jsonl"
# The job's MLflow run (imdb_dist.tracking): every attempt of the job logs into it.
TRACKING = "tracking.json"

# What a run being opened holds before its config.yaml: the lease, and the
# hidden files the lease and the config are staged in (atomic_write,
# storage.write_bytes). Another worker of the run reading the directory then
# must see a new run, not a foreign directory.
OPENING = re.compile(rf"^(?:{re.escape(LEASE)}|\.(?:{re.escape(LEASE)}|{re.escape(CONFIG)})\..+)$")


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


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` or ``steps.jsonl`` (empty if it does not exist).

    Lines are appended, so a process killed mid-write can leave a torn last
    line: it is dropped (that epoch has no checkpoint yet and will re-run).

    Raises:
        InputError: an earlier line is damaged (edited by hand: no crash does that).
    """
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number < len(lines):
                raise _damaged(f"{path} line {number}", exc) from None
            log.warning("%s: dropping a torn last line (an interrupted write)", path)
    return records


def read_lines(path: Path, shown: str | None = None) -> list[dict[str, Any]]:
    """The records of a JSON-lines file written whole each time (changes, worker groups); empty if none.

    ``shown``: how errors name the file (a remote run's location, not its local copy).

    Raises:
        InputError: the file is not what imdb-dist writes there (edited or damaged by hand).
    """
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _damaged(shown or str(path), exc) from None


def read_json(path: Path, shown: str | None = None) -> Any:
    """A JSON file the run wrote whole (atomically), or None when there is none; ``shown`` as for read_lines.

    Raises:
        InputError: the file is not what imdb-dist writes there (edited or damaged by hand).
    """
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _damaged(shown or str(path), exc) from None


def _damaged(shown: str, exc: Exception) -> InputError:
    # Written whole and renamed into place, so no crash tears it: someone edited it.
    return InputError(f"{shown} is not valid JSON ({exc}): restore it, or start the run in a new run.output_dir")


def append_lines(path: Path, records: list[dict[str, Any]]) -> None:
    """Rewrite ``path`` whole, atomically, with ``records`` after the ones it holds."""
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    atomic_write(path, existing + "".join(json.dumps(record) + "\n" for record in records))


class JsonLog:
    """A log the training loop appends to, one JSON record a line (``metrics.jsonl``, ``steps.jsonl``).

    A resume first drops the records the lost attempt wrote past its
    checkpoint (:meth:`drop_after`), so no epoch or step is counted twice.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def drop_after(self, key: str, value: int) -> list[dict[str, Any]]:
        """Remove the records whose ``key`` is above ``value``; returns those kept."""
        records = self.records()
        kept = [r for r in records if r[key] <= value]
        if len(kept) != len(records):
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return kept


def read_vocab(run_dir: Path) -> list[str] | None:
    path = run_dir / VOCAB
    return path.read_text(encoding="utf-8").split("\n")[:-1] if path.exists() else None


def write_vocab(run_dir: Path, tokens: list[str]) -> None:
    atomic_write(run_dir / VOCAB, "".join(f"{t}\n" for t in tokens))


def read_worker_groups(run_dir: Path) -> list[dict[str, Any]]:
    """The Ray worker groups that trained the run so far, oldest first (empty outside Ray)."""
    return read_lines(run_dir / WORKER_GROUPS)


def epochs_done(work: Path) -> int:
    """The epochs a run has finished: its ``metrics.jsonl`` records (one per epoch, written at its end)."""
    return len(read_metrics(work / METRICS))


def check_writable(path: Path, key: str = "run.output_dir") -> None:
    """Fail early, before any data is read, if ``path`` cannot be created or written (``key``: its config key)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise InputError(f"{key} {path}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{key} {path} is not writable ({probe} denies write access)")
