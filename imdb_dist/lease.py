"""The run directory's lease: one live run writes a run directory at a time.

A lease is the file ``lease.json`` in the run directory, on any backend:
who holds it (host, pid, a random id), since when, when it was last
renewed, and for how long a renewal holds (``run.lease_s``). The holder
renews it every quarter of that in a background thread and deletes it when
the run ends. A second run that finds a live lease stops (exit 2) naming
the holder; a lease nobody renewed for ``lease_s`` seconds belongs to a
dead run (SIGKILL, a lost node) and is taken over, and so is one on this
host whose process is gone, at once.

``pyarrow.fs`` offers no compare-and-swap, so taking a lease is a write
followed by a read a settle time later (2 s on remote storage, 0.2 s on a
local disk): of two runs that both found the directory free, the later
write wins and the earlier writer reads the other's id and stops. That
holds when each run's read-to-write gap is shorter than the settle time (a
few milliseconds).
Expiry compares the holder's clock with the reader's: hosts must agree
on the time to within seconds (NTP).

Under Ray the driver holds the lease; the chief checks before each write
that the lease is still its run's (:meth:`Lease.check`), so a run whose
lease was taken over (its driver was stopped, then the job resubmitted)
stops instead of writing beside the new one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from imdb_dist.errors import InputError, RunError

log = logging.getLogger(__name__)

LEASE = "lease.json"


@dataclasses.dataclass(frozen=True)
class Holder:
    """A lease's contents."""

    id: str
    host: str
    pid: int
    since: float
    renewed: float
    ttl_s: float

    def expired(self, now: float) -> bool:
        return now > self.renewed + self.ttl_s

    def describe(self, now: float) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return (
            f"host {self.host} pid {self.pid} since {since} (renewed {now - self.renewed:.0f} s ago; "
            f"it expires {self.ttl_s:g} s after its last renewal)"
        )

    def dead_here(self) -> bool:
        """The holder ran on this host and its process is gone (a pid reused since is taken for alive)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


# How a lease reads and writes its one file: the run directory's small-file I/O (imdb_dist.rundir).
Read = Callable[[], bytes | None]
Write = Callable[[bytes], None]
Delete = Callable[[], None]


class Lease:
    """This run's hold on a run directory: :meth:`acquire` it, then :meth:`release` it."""

    def __init__(self, where: str, read: Read, write: Write, delete: Delete, *, ttl_s: float, settle_s: float) -> None:
        self.where = where  # for messages: the config key and the run directory
        self._read, self._write, self._delete = read, write, delete
        self.ttl_s, self.settle_s = ttl_s, settle_s
        self.id = uuid.uuid4().hex
        self._since = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why the renewals stopped holding it

    def holder(self) -> Holder | None:
        return _parse(self._read())

    def acquire(self) -> None:
        """Take the lease, or raise naming the live run that holds it; then renew it in the background.

        Raises:
            InputError: another run holds a live lease on the directory.
        """
        current = self.holder()
        now = time.time()
        if current is not None and current.id != self.id:
            if current.expired(now) or current.dead_here():
                why = "its process is gone" if current.dead_here() else "it expired"
                log.info("taking over the lease on %s from %s: %s", self.where, current.describe(now), why)
            else:
                raise self._held(current, now)
        self._since = now
        self._put()
        time.sleep(self.settle_s)
        current = self.holder()
        if current is None or current.id != self.id:
            if current is None:
                raise InputError(f"{self.where}: the lease vanished while taking it; try again")
            raise self._held(current, time.time())
        self._thread = threading.Thread(target=self._renew, name="imdb-dist-lease", daemon=True)
        self._thread.start()

    def _held(self, holder: Holder, now: float) -> InputError:
        return InputError(
            f"{self.where} is in use by another run: its lease is held by {holder.describe(now)}; "
            "wait for that run to end, or use another run directory"
        )

    def _put(self) -> None:
        now = time.time()
        holder = Holder(self.id, socket.gethostname(), os.getpid(), self._since, now, self.ttl_s)
        self._write((json.dumps(dataclasses.asdict(holder), sort_keys=True) + "\n").encode())

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                current = self.holder()
                if current is not None and current.id != self.id:
                    self.lost = f"the lease was taken over by {current.describe(time.time())}"
                    log.error("lost the lease on %s: %s", self.where, self.lost)
                    return
                self._put()
            except OSError as exc:
                # The storage's retries are spent: keep trying; the lease holds for ttl_s after the last renewal.
                log.warning("could not renew the lease on %s: %s", self.where, str(exc).splitlines()[0])

    def check(self) -> None:
        """Raise unless this run still holds the lease (see :func:`check_holder`)."""
        check_holder(self.where, self._read, self.id)

    def release(self) -> None:
        """Stop renewing, and delete the lease if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            current = self.holder()
            if current is not None and current.id == self.id:
                self._delete()
        except OSError as exc:
            log.warning("could not release the lease on %s (it expires by itself): %s", self.where,
                        str(exc).splitlines()[0])


def _parse(raw: bytes | None) -> Holder | None:
    if raw is None:
        return None
    try:
        return Holder(**json.loads(raw))
    except (ValueError, TypeError):
        return None  # a torn or foreign file holds nothing


def check_holder(where: str, read: Read, lease_id: str) -> None:
    """Raise unless the lease on ``where`` is ``lease_id``'s: a run must not write a directory another run holds.

    Raises:
        RunError: naming the holder, or saying the lease is gone.
    """
    holder = _parse(read())
    if holder is None:
        raise RunError(f"{where}: this run's lease on the run directory is gone (expired and released?); stopping")
    if holder.id != lease_id:
        raise RunError(f"{where} is now held by another run ({holder.describe(time.time())}); stopping")
