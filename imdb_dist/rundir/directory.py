"""The run directory of one process: :class:`RunDir` (see :mod:`imdb_dist.rundir`)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Self

from imdb_dist import fingerprint, storage
from imdb_dist.config import Config, dump_yaml, load_config
from imdb_dist.errors import ConfigError, InputError, RunError
from imdb_dist.fingerprint import Fingerprint
from imdb_dist.lease import LEASE, Lease, check_holder
from imdb_dist.rundir import files
from imdb_dist.rundir.files import (
    CHANGES,
    CONFIG,
    FINGERPRINT,
    MANIFEST,
    METRICS,
    MODEL,
    OPENING,
    REPORT,
    STEPS,
    TRACKING,
    VOCAB,
    WORKER_GROUPS,
    JsonLog,
    atomic_write,
)
from imdb_dist.rundir.remote import RemoteCopy
from imdb_dist.rundir.versions import (
    MODEL_MARKER,
    local_versions,
    stale_versions,
    version_part,
)

log = logging.getLogger(__name__)


class RunDir:
    """One process's handle on the run directory (see :mod:`imdb_dist.rundir`); a context manager.

    Args:
        location: where the run directory is (:meth:`open` parses it).
        key: the config key that named it, for messages.
    """

    def __init__(self, location: storage.Location, key: str = "run.output_dir") -> None:
        self.location = location
        self.key = key
        # A remote run directory is worked on in a scratch copy, which RemoteCopy moves to and from storage.
        self.work = location.local_path() if location.local else Path(tempfile.mkdtemp(prefix="imdb-dist-run-"))
        self._remote = None if location.local else RemoteCopy(location, self.work)
        self.lease: Lease | None = None
        self._lease_id: str | None = None  # the launcher's lease, checked before each write (Ray workers)

    @classmethod
    def open(cls, where: str, key: str = "run.output_dir", *, retry_s: float = storage.DEFAULT_RETRY_S) -> RunDir:
        return cls(storage.parse(where, key, retry_s=retry_s), key)

    @property
    def remote(self) -> bool:
        return not self.location.local

    @property
    def uploaded(self) -> list[dict[str, int]]:
        """Per sync (every checkpoint, then the publish): bytes uploaded, the checkpoint's share, the logs' size."""
        return self._remote.uploaded if self._remote is not None else []

    def __str__(self) -> str:
        return str(self.location)

    def close(self) -> None:
        """Release the lease if this process holds it, and drop the scratch copy of a remote run directory."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        if self._remote is not None:
            shutil.rmtree(self.work, ignore_errors=True)  # the scratch copy

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Fail early, before any data is read, if the run directory cannot be created or written."""
        if self.remote:
            storage.check_writable(self.location, self.key)
        else:
            files.check_writable(self.work, self.key)

    def check_reachable(self) -> None:
        """Fail in one line, within seconds, if a remote run directory cannot be read; writes nothing."""
        if self.remote:
            storage.check_reachable(self.location, self.key)

    def fetch(self, names: Iterable[str] = (), trees: Iterable[str] = ()) -> None:
        """Bring these files (and every file below ``trees``) into :attr:`work`; a log's parts are joined.

        A local run directory is its own working copy: nothing to do.
        """
        if self._remote is None:
            return
        try:
            self._remote.fetch(names, trees)
        except OSError as exc:
            raise InputError(f"{self.key} {self}: cannot read there: {storage.reason(exc)}") from None

    def fetch_state(self) -> None:
        """The files that decide new, resume or complete, and that a resume continues (remote runs)."""
        self.fetch([CONFIG, REPORT, VOCAB, MANIFEST, METRICS, STEPS, WORKER_GROUPS, FINGERPRINT, CHANGES, TRACKING])

    def prior_config(self) -> Config | None:
        """The config a previous run saved here, or None for a new run.

        Raises:
            InputError: the directory holds files but is not an imdb-dist run, or its config cannot be read.
        """
        saved = self.work / CONFIG
        if not saved.exists():
            if self._remote is not None:
                names = list(self._remote.listing())
            else:
                names = [p.name for p in self.work.iterdir()] if self.work.is_dir() else []
            if any(not OPENING.match(name) for name in names):
                raise InputError(f"{self.key} {self} is not empty and holds no {CONFIG}: not an imdb-dist run")
            return None
        try:
            return load_config(saved)
        except ConfigError as exc:
            raise InputError(f"{saved} cannot be resumed: {exc}") from None

    def saved_fingerprint(self) -> Fingerprint | None:
        """The fingerprint the run saved, or None (a new run)."""
        shown = str(self.location.child(FINGERPRINT))
        saved = files.read_json(self.work / FINGERPRINT, shown)
        if saved is None:
            return None
        try:
            return Fingerprint.from_dict(saved)
        except TypeError as exc:  # other keys than a Fingerprint's
            raise InputError(f"{shown} is not a fingerprint imdb-dist wrote ({exc})") from None

    def changes(self) -> list[dict[str, Any]]:
        """The deliberate changes made to the run so far (``--change``), oldest first."""
        return files.read_lines(self.work / CHANGES, str(self.location.child(CHANGES)))

    def worker_groups(self) -> list[dict[str, Any]]:
        """The Ray worker groups that trained the run so far, oldest first (empty outside Ray)."""
        return files.read_worker_groups(self.work)

    def tracked_run(self) -> dict[str, Any] | None:
        """The job's MLflow run (``tracking.json``: its id and the redacted URI), or None before one is opened."""
        return files.read_json(self.work / TRACKING, str(self.location.child(TRACKING)))

    def vocabulary(self) -> list[str] | None:
        """The run's saved vocabulary, or None before it is fitted."""
        return files.read_vocab(self.work)

    def log(self, name: str) -> JsonLog:
        """The run's log ``name`` (``metrics.jsonl`` or ``steps.jsonl``)."""
        return JsonLog(self.work / name)

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
        done = files.epochs_done(self.work)
        if done:
            log.info("resuming the run in %s after epoch %d, from its last checkpoint", self, done)
        return False

    def check_fingerprint(self, current: Fingerprint, changes: Sequence[str]) -> Fingerprint | None:
        """Refuse ``current`` if it differs from the saved fingerprint in a key ``changes`` does not name.

        Returns the saved fingerprint (None for a new run).

        Raises:
            InputError: naming the key.
        """
        previous = self.saved_fingerprint()
        fingerprint.check(previous, current, self, changes)
        self.changes()  # read now, so that a damaged record is refused before training, not at the report
        return previous

    def take(self, cfg: Config, current: Fingerprint, changes: Sequence[str] = ()) -> str | None:
        """Lease the directory and (re)open it to train ``cfg``: the lease's id, or None if it turned out complete.

        The state is read again under the lease: another run may have moved
        the directory on since :meth:`holds_complete`. ``current`` is the
        run's fingerprint, checked against the saved one (a change not named
        in ``changes`` is refused) and recorded with the epochs it takes
        effect after.

        Raises:
            InputError: another live run holds the directory, or a refused change.
        """
        lease = self.acquire(cfg.run.lease_s)
        self.fetch_state()
        if self._complete(cfg, changes):
            return None
        previous = self.check_fingerprint(current, changes)
        self.begin(cfg)
        made = fingerprint.changes_made(previous, current, at={"epochs_done": files.epochs_done(self.work)})
        if made:
            files.append_lines(self.work / CHANGES, made)
        files.write_json(self.work / FINGERPRINT, current.to_dict())
        return lease

    def _complete(self, cfg: Config, changes: Sequence[str]) -> bool:
        """True if the directory holds a finished run of ``cfg``'s model and epochs; refuses another model's run."""
        previous = self.prior_config()  # refuses a directory that is not a run
        if previous is None:
            return False
        fingerprint.check_config(previous, cfg, self, changes)
        if fingerprint.same_run(previous, cfg) and (self.work / REPORT).exists():
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
        try:
            return (self.work / LEASE).read_bytes()
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

    def write_vocabulary(self, tokens: list[str]) -> None:
        files.write_vocab(self.work, tokens)

    def record_worker_group(self, entry: dict[str, Any]) -> None:
        """Append a Ray worker group's start to the history, and upload it now (not at the next checkpoint).

        A group lost before it saves anything is history too.
        """
        files.append_lines(self.work / WORKER_GROUPS, [entry])
        self._upload_now([WORKER_GROUPS])

    def record_tracked_run(self, entry: dict[str, Any]) -> None:
        """Keep the job's MLflow run, uploaded now: an attempt that starts before the first checkpoint needs it."""
        files.write_json(self.work / TRACKING, entry)
        self._upload_now([TRACKING])

    def write_report(self, report: dict[str, Any]) -> None:
        """Write ``report.json``, which marks the run complete once :meth:`publish` has uploaded it."""
        files.write_json(self.work / REPORT, report)

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
        remote = self._remote
        if remote is None:
            self.check_lease()  # a local run writes in place, but it must stop as well
            return 0

        def sync() -> int:
            self.check_lease()
            return remote.upload_changes(final)

        return self._storage_call(sync, "upload the run's files")

    def _upload_now(self, names: Iterable[str]) -> None:
        """Upload these files now, whole, outside a full sync."""
        remote = self._remote
        if remote is None:
            return
        self._storage_call(self.check_lease, "read the lease")
        for name in names:
            self._storage_call(lambda name=name: remote.upload_whole(name), f"upload {name}")

    def _storage_call(self, call: Callable[[], Any], what: str) -> Any:
        try:
            return call()
        except OSError as exc:
            raise RunError(
                f"cannot {what} to {self} after retrying for run.storage_retry_s: {storage.reason(exc)}; "
                "the last checkpoint that reached the storage is intact: resubmit to resume from it"
            ) from None

    # -- the model ---------------------------------------------------------------------------------

    def next_model_version(self) -> int:
        """The version the next export takes: one past every version here, complete or not."""
        names = set(local_versions(self.work / MODEL))
        if self._remote is not None:
            listing = self._remote.listing(refresh=True)
            names |= {int(p.split("/")[1]) for p in listing if version_part(p) is not None}
        return max(names, default=0) + 1

    def _prune_versions(self) -> None:
        """Drop every model version older than the newest complete one, but the complete one before it."""
        model = self.work / MODEL
        local = {v: (model / str(v) / MODEL_MARKER).is_file() for v in local_versions(model)}
        for version in stale_versions(local):
            shutil.rmtree(model / str(version), ignore_errors=True)
        if self._remote is not None:
            listing = self._remote.listing(refresh=True)
            remote = {int(v): f"{MODEL}/{v}/{MODEL_MARKER}" in listing for p in listing if (v := version_part(p))}
            for version in stale_versions(remote):
                self._storage_call(lambda v=version: storage.delete(self.location.child(MODEL, str(v))),
                                   "delete an old model version")
