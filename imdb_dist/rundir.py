"""The run directory: the one owner of what a run reads and writes there, local or on remote storage.

:class:`RunDir` is the run directory of one process, behind one interface
whether it is a local (or mounted) path or a ``pyarrow.fs`` URI
(:mod:`imdb_dist.storage`):

- **decisions**: :meth:`RunDir.fetch` brings the small files a decision
  reads (config, report, fingerprint, vocabulary, logs) into the local
  working copy :attr:`RunDir.work`; :meth:`RunDir.holds_complete` and
  :meth:`RunDir.take` decide on them whether the run is new, resumes or is
  already complete (comparing configs and fingerprints with
  :mod:`imdb_dist.fingerprint`), for ``imdb-dist train`` and the Ray
  driver alike.
- **the lease** (:mod:`imdb_dist.lease`): one live run writes the directory.
- **progress**: :meth:`RunDir.sync` uploads what changed since the last sync
  (a log that only grew: just its new lines or records, as a segment).
- **publish**: :meth:`RunDir.publish` uploads the finished run: the model's
  new version with its marker last, then ``report.json``, which marks the run
  complete.

TensorFlow reads and writes local files only, so every process works in
``work``: the directory itself when it is local, else a scratch directory
this class fills and drains. Only the chief writes.

A run directory is complete when ``report.json`` exists: written last,
atomically. Its model is ``model/<version>/`` (TF-Serving's layout); each
export takes the next version, and a version is complete once its
``assets.extra/imdb_dist.json`` exists: locally the version is renamed into
place whole, remotely that file is uploaded after all the others
(:func:`locate_model` reads only complete versions). The previous version
is kept, so a reader that chose it while a new one is published can still
load it.

On object stores an append-only log (``*.jsonl``, TensorBoard's event
files) cannot be appended to, so a sync uploads its new complete lines or
records as a sibling object ``NAME~OFFSET`` (TensorBoard reads every event
file in a directory; :meth:`RunDir.fetch` joins a log's parts), and
:meth:`RunDir.publish` replaces the parts with whole files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from imdb_dist import storage
from imdb_dist.config import Config, dump_yaml, load_config
from imdb_dist.errors import ConfigError, InputError, RunError
from imdb_dist.lease import LEASE, Lease, check_holder

if TYPE_CHECKING:
    from imdb_dist.fingerprint import Fingerprint

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
# Ray runs: one line per worker group that trained the run (size, cause, where it started).
WORKER_GROUPS = "worker_groups.jsonl"
# Inside a model version: written last, so its presence marks the version complete (imdb_dist.export.METADATA).
MODEL_MARKER = "assets.extra/imdb_dist.json"
# Model versions kept: the newest, and the one before for readers that chose it while the newest was published.
KEEP_VERSIONS = 2

_SEGMENT = re.compile(r"^(?P<base>.+)~(?P<offset>\d{12})$")
# What a run being opened holds before its config.yaml: the lease, and the
# hidden files the lease and the config are staged in (atomic_write,
# storage.write_bytes). Another worker of the run reading the directory then
# must see a new run, not a foreign directory.
_OPENING = re.compile(rf"^(?:{re.escape(LEASE)}|\.(?:{re.escape(LEASE)}|{re.escape(CONFIG)})\..+)$")


def _appendable(name: str) -> bool:
    """Files that only grow between rewrites: logs, synced as segments (see the module docstring)."""
    return name.endswith(".jsonl") or "tfevents" in name.rsplit("/", 1)[-1]


def _complete_end(name: str, data: bytes) -> int:
    """Where the last complete line (JSONL) or TFRecord (event files) of a growing file ends."""
    if name.endswith(".jsonl"):
        return data.rfind(b"\n") + 1
    # TFRecord framing: uint64 length, uint32 crc of it, the record, uint32 crc of it.
    end = 0
    while end + 12 <= len(data):
        length = int.from_bytes(data[end : end + 8], "little")
        if end + 16 + length > len(data):
            break
        end += 16 + length
    return end


def _order(name: str) -> int:
    """Upload order within a sync: what other files point to or mark goes after them, the report last.

    Inside a model version: the variables, then the rest, then
    ``saved_model.pb`` (a server polling the directory, as TF-Serving does,
    finds the graph only once its variables are there), then the marker.
    """
    if name == REPORT:
        return 5
    if name == MANIFEST or name.endswith(f"/{MODEL_MARKER}") or name == f"{CHECKPOINTS}/checkpoint":
        return 4
    if _version_part(name) is not None:
        inside = name.split("/", 2)[2]
        return 3 if inside == "saved_model.pb" else 1 if inside.startswith("variables/") else 2
    return 1


@dataclasses.dataclass
class _Synced:
    """What the remote copy holds of one local file: its first ``size`` bytes, as a base object and segments."""

    size: int
    mtime_ns: int
    sha256: str
    objects: list[str]  # the base object (if any) and the segments, in order


class RunDir:
    """One process's handle on the run directory (see the module docstring); a context manager.

    Args:
        location: where the run directory is (:meth:`open` parses it).
    """

    def __init__(self, location: storage.Location, key: str = "run.output_dir") -> None:
        self.location = location
        self.key = key  # the config key that named it, for messages
        self._scratch = None if location.local else Path(tempfile.mkdtemp(prefix="imdb-dist-run-"))
        self.work = location.local_path() if location.local else self._scratch
        self._synced: dict[str, _Synced] = {}
        self._remote_files: dict[str, int] | None = None
        self.lease: Lease | None = None
        self._lease_id: str | None = None  # the launcher's lease, checked before each write (Ray workers)
        # Per sync (every checkpoint, then the publish): bytes uploaded, how many of them were the
        # checkpoint's, and the size of the logs then.
        self.uploaded: list[dict[str, int]] = []

    @classmethod
    def open(cls, where: str, key: str = "run.output_dir", *, retry_s: float = storage.DEFAULT_RETRY_S) -> RunDir:
        return cls(storage.parse(where, key, retry_s=retry_s), key)

    @property
    def remote(self) -> bool:
        return not self.location.local

    def __str__(self) -> str:
        return str(self.location)

    def close(self) -> None:
        """Release the lease if this process holds it, and drop the scratch copy of a remote run directory."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- decisions ---------------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Fail early, before any data is read, if the run directory cannot be created or written."""
        if self.remote:
            storage.check_writable(self.location, self.key)
        else:
            check_writable(self.work, self.key)

    def fetch(self, names: Iterable[str] = (), trees: Iterable[str] = ()) -> None:
        """Bring these files (and every file below ``trees``) into :attr:`work`; a log's parts are joined.

        A local run directory is its own working copy: nothing to do.
        """
        if not self.remote:
            return
        try:
            listing = self._listing(refresh=True)
            wanted = set(names) | {name for tree in trees for name in _bases(listing) if name.startswith(f"{tree}/")}
            for name in sorted(wanted):
                self._fetch_one(name, listing)
        except OSError as exc:
            raise InputError(f"{self.key} {self}: cannot read there: {storage.reason(exc)}") from None

    def fetch_state(self) -> None:
        """The files that decide new, resume or complete, and that a resume continues (remote runs)."""
        from imdb_dist import fingerprint

        self.fetch([CONFIG, REPORT, VOCAB, MANIFEST, METRICS, STEPS, WORKER_GROUPS, fingerprint.FINGERPRINT,
                    fingerprint.CHANGES])

    def _listing(self, *, refresh: bool = False) -> dict[str, int]:
        if self._remote_files is None or refresh:
            self._remote_files = storage.list_files(self.location)
        return self._remote_files

    def _fetch_one(self, name: str, listing: dict[str, int]) -> None:
        parts = _parts(name, listing)
        if not parts:
            return
        data = b""
        for part in parts:
            match = _SEGMENT.match(part)
            if match and int(match["offset"]) != len(data):
                break  # a gap: a sync died between two parts; what follows cannot be joined
            data += storage.read_bytes(self.location.child(*part.split("/"))) or b""
        target = self.work / name
        atomic_write(target, data)
        stat = target.stat()
        self._synced[name] = _Synced(len(data), stat.st_mtime_ns, hashlib.sha256(data).hexdigest(), parts)

    def prior_config(self) -> Config | None:
        """The config a previous run saved here, or None for a new run.

        Raises:
            InputError: the directory holds files but is not an imdb-dist run.
        """
        if self.remote and not (self.work / CONFIG).exists():
            foreign = [name for name in self._listing() if not _OPENING.match(name)]
            if foreign:
                raise InputError(f"{self.key} {self} is not empty and holds no {CONFIG}: not an imdb-dist run")
            return None
        return prior_config(self.work)

    # -- the decision: new, resumed or complete --------------------------------------------------

    def holds_complete(self, cfg: Config, changes: Sequence[str] = ()) -> bool:
        """Read the directory's state: True if it already holds ``cfg``'s run, finished (nothing to do).

        Decided on the small files alone, before any data is read or anything
        written (:mod:`imdb_dist.fingerprint` compares the configs).

        Raises:
            InputError: the directory is not a run, or holds a run of another model.
        """
        self.fetch_state()
        if self._complete(cfg, changes):
            return True
        done = _epochs_done(self.work)
        if done:
            log.info("resuming the run in %s after epoch %d, from its last checkpoint", self, done)
        return False

    def take(self, cfg: Config, current: Fingerprint | None, changes: Sequence[str] = ()) -> str | None:
        """Lease the directory and (re)open it to train ``cfg``: the lease's id, or None if it turned out complete.

        The state is read again under the lease: another run may have moved
        the directory on since :meth:`holds_complete`. ``current`` is the
        run's fingerprint, checked against the saved one (a change not named
        in ``changes`` is refused) and recorded with the epochs it takes
        effect after; None (prepared data older than fingerprints) skips both.

        Raises:
            InputError: another live run holds the directory, or a refused change.
        """
        # Imported here: fingerprint reads run directories through this module.
        from imdb_dist import fingerprint

        lease = self.acquire(cfg.run.lease_s)
        self.fetch_state()
        if self._complete(cfg, changes):
            return None
        previous = None if current is None else fingerprint.check(self.work, current, changes)
        self.begin(cfg)
        if current is not None:
            fingerprint.record(self.work, previous, current, at={"epochs_done": _epochs_done(self.work)})
        return lease

    def _complete(self, cfg: Config, changes: Sequence[str]) -> bool:
        from imdb_dist import fingerprint

        self.prior_config()  # refuses a directory that is not a run
        if fingerprint.already_complete(self.work, cfg, changes):
            log.info("%s already holds a complete run of this config; nothing to do", self)
            return True
        return False

    # -- the lease ---------------------------------------------------------------------------------

    def acquire(self, ttl_s: float) -> str:
        """Take the run directory's lease for this process (renewed until :meth:`close`); returns its id.

        Raises:
            InputError: another live run holds it (one line naming it).
        """
        lease = Lease(f"{self.key} {self}", self._read_lease, self._write_lease, self._delete_lease, ttl_s=ttl_s,
                      settle_s=2.0 if self.remote else 0.2)
        try:
            lease.acquire()
        except OSError as exc:
            raise InputError(f"{self.key} {self}: cannot write there: {storage.reason(exc)}") from None
        self.lease = lease
        return lease.id

    def attach(self, lease_id: str) -> None:
        """Write under the launcher's lease ``lease_id``: :meth:`sync` checks it is still held first."""
        self._lease_id = lease_id

    def check_lease(self) -> None:
        """Raise (RunError) unless this run still holds the directory's lease."""
        if self.lease is not None:
            if self.lease.lost:
                raise RunError(f"{self}: {self.lease.lost}; stopping")
            self.lease.check()
        elif self._lease_id is not None:
            check_holder(str(self), self._read_lease, self._lease_id)

    def _read_lease(self) -> bytes | None:
        if self.remote:
            return storage.read_bytes(self.location.child(LEASE))
        path = self.work / LEASE
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def _write_lease(self, data: bytes) -> None:
        if self.remote:
            storage.write_bytes(self.location.child(LEASE), data)
        else:
            atomic_write(self.work / LEASE, data)

    def _delete_lease(self) -> None:
        if self.remote:
            storage.delete(self.location.child(LEASE))
        else:
            (self.work / LEASE).unlink(missing_ok=True)

    # -- writing -----------------------------------------------------------------------------------

    def begin(self, config: Config) -> None:
        """(Re)open the run to train ``config``: drop a stale report, then save the config.

        A run that trains again (more epochs) is no longer complete until it
        writes a new report; the report goes first so a crash never leaves a
        new config beside an old report.
        """
        (self.work / REPORT).unlink(missing_ok=True)
        if self.remote:
            self._storage_call(lambda: (self.check_lease(), storage.delete(self.location.child(REPORT))),
                               "delete the old report")
        else:
            self.check_lease()
        atomic_write(self.work / CONFIG, dump_yaml(config))

    def sync(self) -> int:
        """Upload what changed in :attr:`work` since the last sync; returns the bytes uploaded (0 when local).

        Raises:
            RunError: the storage failed after its retries, or the lease is no longer this run's.
        """
        return self._sync(final=False)

    def publish(self) -> int:
        """Upload the finished run: everything changed, the model's marker after its files, the report last.

        Logs are uploaded whole, replacing their segments. Model versions
        older than the newest complete one are deleted, but for the complete
        one before it (a reader may have chosen it): an export a killed
        publish left incomplete goes too.
        """
        sent = self._sync(final=True)
        self._prune_versions()
        return sent

    def _sync(self, *, final: bool) -> int:
        if not self.remote:
            self.check_lease()  # a local run writes in place, but it must stop as well
            return 0

        def sync() -> int:
            self.check_lease()
            return self._upload_changes(final)

        return self._storage_call(sync, "upload the run's files")

    def _storage_call(self, call: Callable[[], Any], what: str) -> Any:
        try:
            return call()
        except OSError as exc:
            raise RunError(
                f"cannot {what} to {self} after retrying for run.storage_retry_s: {storage.reason(exc)}; "
                "the last checkpoint that reached the storage is intact: resubmit to resume from it"
            ) from None

    def _upload_changes(self, final: bool) -> int:
        uploads: list[tuple[int, str, str, bytes, _Synced]] = []
        local: set[str] = set()
        for path in sorted(self.work.rglob("*")):
            name = path.relative_to(self.work).as_posix()
            if not path.is_file() or any(part.startswith(".") or "_temp" in part for part in name.split("/")):
                continue  # staging files of atomic writes and exports, TensorFlow's checkpoint staging
            if name == LEASE:
                continue
            local.add(name)
            stat = path.stat()
            known = self._synced.get(name)
            unchanged = known is not None and (known.size, known.mtime_ns) == (stat.st_size, stat.st_mtime_ns)
            if unchanged and not (final and len(known.objects) > 1):  # publish: a log in parts is made whole
                continue
            data = path.read_bytes()
            plan = self._plan(name, data, known, stat.st_mtime_ns, final=final)
            if plan is not None:
                uploads.append((_order(name), name, *plan))
        sent = checkpoint = 0
        for _, name, key, payload, synced in sorted(uploads, key=lambda item: (item[0], item[1])):
            storage.write_bytes(self.location.child(*key.split("/")), payload)
            sent += len(payload)
            checkpoint += len(payload) if name.startswith(f"{CHECKPOINTS}/") else 0
            old = self._synced.get(name)
            if old is not None and key == name:  # a whole upload: the old segments are stale
                for stale in old.objects:
                    if stale != name:
                        storage.delete(self.location.child(*stale.split("/")))
            self._synced[name] = synced
        for name in sorted(set(self._synced) - local):
            # Deleted here since the last sync (an old checkpoint): delete what this run uploaded of it.
            for key in self._synced.pop(name).objects:
                storage.delete(self.location.child(*key.split("/")))
        # What uploading every log whole would have sent instead (the logs' size now): the growth a sync avoids.
        logs = sum((self.work / name).stat().st_size for name in local if _appendable(name))
        self.uploaded.append({"bytes": sent, "checkpoint_bytes": checkpoint, "logs_size_bytes": logs})
        return sent

    def _plan(
        self, name: str, data: bytes, known: _Synced | None, mtime_ns: int, *, final: bool
    ) -> tuple[str, bytes, _Synced] | None:
        """What to upload for one changed file: ``(object, bytes, what the remote then holds)``, or None."""
        if not _appendable(name) or final:
            return name, data, _Synced(len(data), mtime_ns, hashlib.sha256(data).hexdigest(), [name])
        end = _complete_end(name, data)
        whole = mtime_ns if end == len(data) else -1  # an incomplete tail: look again next time
        grown = (
            known is not None
            and end >= known.size
            and hashlib.sha256(data[: known.size]).hexdigest() == known.sha256
        )
        if not grown:  # new or rewritten (a resume dropped lines after its checkpoint): upload it whole
            return name, data[:end], _Synced(end, whole, hashlib.sha256(data[:end]).hexdigest(), [name])
        assert known is not None
        if end == known.size:
            return None
        key = f"{name}~{known.size:012d}"
        synced = _Synced(end, whole, hashlib.sha256(data[:end]).hexdigest(), [*known.objects, key])
        return key, data[known.size : end], synced

    # -- the model ---------------------------------------------------------------------------------

    def next_model_version(self) -> int:
        """The version the next export takes: one past every version here, complete or not."""
        names = set(_versions(self.work / MODEL))
        if self.remote:
            names |= {int(p.split("/")[1]) for p in self._listing(refresh=True) if _version_part(p) is not None}
        return max(names, default=0) + 1

    def _prune_versions(self) -> None:
        """Drop every model version older than the newest complete one, but the complete one before it."""
        local = {v: (self.work / MODEL / str(v) / MODEL_MARKER).is_file() for v in _versions(self.work / MODEL)}
        for version in _stale_versions(local):
            shutil.rmtree(self.work / MODEL / str(version), ignore_errors=True)
        if self.remote:
            listing = self._listing(refresh=True)
            remote = {int(v): f"{MODEL}/{v}/{MODEL_MARKER}" in listing for p in listing if (v := _version_part(p))}
            for version in _stale_versions(remote):
                self._storage_call(lambda v=version: storage.delete(self.location.child(MODEL, str(v))),
                                   "delete an old model version")

    def upload_only(self, names: Iterable[str]) -> None:
        """Upload these files now, whole (a worker group's history at its start), outside a full sync."""
        if not self.remote:
            return
        self._storage_call(self.check_lease, "read the lease")
        for name in names:
            path = self.work / name
            data = path.read_bytes()
            target = self.location.child(*name.split("/"))
            self._storage_call(lambda target=target, data=data: storage.write_bytes(target, data), f"upload {name}")
            old = self._synced.get(name)
            for stale in old.objects if old is not None else []:
                if stale != name:
                    self._storage_call(lambda s=stale: storage.delete(self.location.child(*s.split("/"))),
                                       f"upload {name}")
            self._synced[name] = _Synced(len(data), path.stat().st_mtime_ns, hashlib.sha256(data).hexdigest(), [name])


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` or ``steps.jsonl`` (empty if it does not exist).

    Lines are appended, so a process killed mid-write can leave a torn last
    line: it is dropped (that epoch has no checkpoint yet and will re-run).
    """
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise
            log.warning("%s: dropping a torn last line (an interrupted write)", path)
    return records


def _epochs_done(work: Path) -> int:
    """The epochs a run has finished: its ``metrics.jsonl`` records (one per epoch, written at its end)."""
    return len(read_metrics(work / METRICS))


def _version_part(relative: str) -> str | None:
    """The version of a path ``model/<version>/...``, or None."""
    parts = relative.split("/")
    return parts[1] if len(parts) > 2 and parts[0] == MODEL and parts[1].isdigit() else None


def _stale_versions(complete: dict[int, bool]) -> list[int]:
    """Versions to delete, given each version's completeness: see :meth:`RunDir.publish`."""
    done = sorted(v for v, ok in complete.items() if ok)
    keep = set(done[-KEEP_VERSIONS:])
    return [v for v in complete if done and v < done[-1] and v not in keep]


def _versions(model_root: Path) -> list[int]:
    return [int(p.name) for p in model_root.iterdir() if p.name.isdigit()] if model_root.is_dir() else []


def _bases(listing: dict[str, int]) -> set[str]:
    """The files a listing holds, a log's segments counted as their base file."""
    return {match["base"] if (match := _SEGMENT.match(name)) else name for name in listing}


def _parts(name: str, listing: dict[str, int]) -> list[str]:
    """The objects that make up file ``name``: its base object (if any), then its segments by offset."""
    segments = sorted(
        (int(match["offset"]), key)
        for key in listing
        if (match := _SEGMENT.match(key)) and match["base"] == name
    )
    return ([name] if name in listing else []) + [key for _, key in segments]


@contextlib.contextmanager
def locate_model(where: str, key: str = "--model") -> Iterator[Path]:
    """A local path to a complete model version, given a run directory, its ``model/``, or one version.

    A run directory must be complete (its ``report.json`` names the version
    it published); a ``model/`` gives its newest complete version; a version
    must be complete itself (see the module docstring). A remote one is
    downloaded to a temporary directory for the duration.

    Raises:
        InputError: nothing complete there, or the storage cannot be read.
    """
    location = storage.parse(where, key)
    try:
        with _model_version(location, where, key) as path:
            yield path
    except OSError as exc:
        raise InputError(f"{key} {location}: cannot read it: {storage.reason(exc)}") from None


@contextlib.contextmanager
def _model_version(location: storage.Location, where: str, key: str) -> Iterator[Path]:
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
        version = str(report.get("model_version") or _newest_complete(files, MODEL) or "")
        prefix = f"{MODEL}/{version}"
    elif posixpath.basename(location.path).isdigit() or "saved_model.pb" in files or MODEL_MARKER in files:
        # One version (what it holds so far: its upload may not have finished).
        prefix = ""
    else:  # a model root
        version = _newest_complete(files, "")
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


def _newest_complete(files: dict[str, int], root: str) -> int | None:
    """The highest version under ``root`` (a ``model/`` path inside ``files``, or '') that holds its marker."""
    marker = re.compile(rf"^{re.escape(f'{root}/' if root else '')}(\d+)/{re.escape(MODEL_MARKER)}$")
    return max((int(m[1]) for name in files if (m := marker.match(name))), default=None)


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


def prior_config(run_dir: Path) -> Config | None:
    """The config a previous run saved in ``run_dir``, or None for a new run.

    Raises:
        InputError: the directory holds files but is not an imdb-dist run,
            or its config cannot be read.
    """
    saved = run_dir / CONFIG
    if not saved.exists():
        if run_dir.is_dir() and any(not _OPENING.match(p.name) for p in run_dir.iterdir()):
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
