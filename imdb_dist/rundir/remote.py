"""A run directory on object storage: the remote copy of its working copy, synced by differences.

On object stores an append-only log (``*.jsonl``, TensorBoard's event
files) cannot be appended to, so a sync uploads its new complete lines or
records as a sibling object ``NAME~OFFSET`` (TensorBoard reads every event
file in a directory; :meth:`RemoteCopy.fetch` joins a log's parts), and the
final sync (the publish) replaces the parts with whole files. Within a sync
what other files point to or mark is uploaded after them, the report last
(:func:`upload_order`).

Storage errors are raised as they come (``OSError``):
:class:`imdb_dist.rundir.RunDir` says what they stop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from imdb_dist import storage
from imdb_dist.lease import LEASE
from imdb_dist.rundir.files import CHECKPOINTS, MANIFEST, REPORT, atomic_write
from imdb_dist.rundir.versions import MODEL_MARKER, version_part

SEGMENT = re.compile(r"^(?P<base>.+)~(?P<offset>\d{12})$")


def appendable(name: str) -> bool:
    """Files that only grow between rewrites: logs, synced as segments (see the module docstring)."""
    return name.endswith(".jsonl") or "tfevents" in name.rsplit("/", 1)[-1]


def complete_end(name: str, data: bytes) -> int:
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


def upload_order(name: str) -> int:
    """Upload order within a sync: what other files point to or mark goes after them, the report last.

    Inside a model version: the variables, then the rest, then
    ``saved_model.pb`` (a server polling the directory, as TF-Serving does,
    finds the graph only once its variables are there), then the marker.
    """
    if name == REPORT:
        return 5
    if name == MANIFEST or name.endswith(f"/{MODEL_MARKER}") or name == f"{CHECKPOINTS}/checkpoint":
        return 4
    if version_part(name) is not None:
        inside = name.split("/", 2)[2]
        return 3 if inside == "saved_model.pb" else 1 if inside.startswith("variables/") else 2
    return 1


def bases(listing: dict[str, int]) -> set[str]:
    """The files a listing holds, a log's segments counted as their base file."""
    return {match["base"] if (match := SEGMENT.match(name)) else name for name in listing}


def parts(name: str, listing: dict[str, int]) -> list[str]:
    """The objects that make up file ``name``: its base object (if any), then its segments by offset."""
    segments = sorted(
        (int(match["offset"]), key)
        for key in listing
        if (match := SEGMENT.match(key)) and match["base"] == name
    )
    return ([name] if name in listing else []) + [key for _, key in segments]


@dataclasses.dataclass
class Synced:
    """What the remote copy holds of one local file: its first ``size`` bytes, as a base object and segments."""

    size: int
    mtime_ns: int
    sha256: str
    objects: list[str]  # the base object (if any) and the segments, in order


def _synced(name: str, data: bytes, mtime_ns: int, objects: list[str] | None = None) -> Synced:
    return Synced(len(data), mtime_ns, hashlib.sha256(data).hexdigest(), objects or [name])


class RemoteCopy:
    """The objects of a remote run directory that mirror the local working copy ``work``.

    Args:
        location: the run directory on storage.
        work: the local working copy (a scratch directory).
    """

    def __init__(self, location: storage.Location, work: Path) -> None:
        self.location = location
        self.work = work
        self.synced: dict[str, Synced] = {}
        self._files: dict[str, int] | None = None
        # Per sync (every checkpoint, then the publish): bytes uploaded, how many of them were the
        # checkpoint's, and the size of the logs then.
        self.uploaded: list[dict[str, int]] = []

    def listing(self, *, refresh: bool = False) -> dict[str, int]:
        if self._files is None or refresh:
            self._files = storage.list_files(self.location)
        return self._files

    def fetch(self, names: Iterable[str], trees: Iterable[str]) -> None:
        """Bring these files (and every file below ``trees``) into :attr:`work`; a log's parts are joined."""
        listing = self.listing(refresh=True)
        wanted = set(names) | {name for tree in trees for name in bases(listing) if name.startswith(f"{tree}/")}
        for name in sorted(wanted):
            self._fetch_one(name, listing)

    def _fetch_one(self, name: str, listing: dict[str, int]) -> None:
        objects = parts(name, listing)
        if not objects:
            return
        data = b""
        for part in objects:
            match = SEGMENT.match(part)
            if match and int(match["offset"]) != len(data):
                break  # a gap: a sync died between two parts; what follows cannot be joined
            data += storage.read_bytes(self.location.child(*part.split("/"))) or b""
        target = self.work / name
        atomic_write(target, data)
        self.synced[name] = _synced(name, data, target.stat().st_mtime_ns, objects)

    def delete(self, name: str) -> None:
        storage.delete(self.location.child(*name.split("/")))

    def upload_whole(self, name: str) -> None:
        """Upload one file whole now, replacing the segments it had."""
        path = self.work / name
        data = path.read_bytes()
        storage.write_bytes(self.location.child(*name.split("/")), data)
        old = self.synced.get(name)
        for stale in old.objects if old is not None else []:
            if stale != name:
                self.delete(stale)
        self.synced[name] = _synced(name, data, path.stat().st_mtime_ns)

    def upload_changes(self, final: bool) -> int:
        """Upload what changed in :attr:`work` since the last sync (``final``: logs whole); returns the bytes sent."""
        uploads: list[tuple[int, str, str, bytes, Synced]] = []
        local: set[str] = set()
        for path in sorted(self.work.rglob("*")):
            name = path.relative_to(self.work).as_posix()
            if not path.is_file() or any(part.startswith(".") or "_temp" in part for part in name.split("/")):
                continue  # staging files of atomic writes and exports, TensorFlow's checkpoint staging
            if name == LEASE:
                continue
            local.add(name)
            stat = path.stat()
            known = self.synced.get(name)
            unchanged = known is not None and (known.size, known.mtime_ns) == (stat.st_size, stat.st_mtime_ns)
            if unchanged and not (final and len(known.objects) > 1):  # publish: a log in parts is made whole
                continue
            plan = self._plan(name, path.read_bytes(), known, stat.st_mtime_ns, final=final)
            if plan is not None:
                uploads.append((upload_order(name), name, *plan))
        sent = checkpoint = 0
        for _, name, key, payload, synced in sorted(uploads, key=lambda item: (item[0], item[1])):
            storage.write_bytes(self.location.child(*key.split("/")), payload)
            sent += len(payload)
            checkpoint += len(payload) if name.startswith(f"{CHECKPOINTS}/") else 0
            old = self.synced.get(name)
            if old is not None and key == name:  # a whole upload: the old segments are stale
                for stale in old.objects:
                    if stale != name:
                        self.delete(stale)
            self.synced[name] = synced
        for name in sorted(set(self.synced) - local):
            # Deleted here since the last sync (an old checkpoint): delete what this run uploaded of it.
            for key in self.synced.pop(name).objects:
                self.delete(key)
        # What uploading every log whole would have sent instead (the logs' size now): the growth a sync avoids.
        logs = sum((self.work / name).stat().st_size for name in local if appendable(name))
        self.uploaded.append({"bytes": sent, "checkpoint_bytes": checkpoint, "logs_size_bytes": logs})
        return sent

    @staticmethod
    def _plan(
        name: str, data: bytes, known: Synced | None, mtime_ns: int, *, final: bool
    ) -> tuple[str, bytes, Synced] | None:
        """What to upload for one changed file: ``(object, bytes, what the remote then holds)``, or None."""
        if not appendable(name) or final:
            return name, data, _synced(name, data, mtime_ns)
        end = complete_end(name, data)
        whole = mtime_ns if end == len(data) else -1  # an incomplete tail: look again next time
        grown = (
            known is not None
            and end >= known.size
            and hashlib.sha256(data[: known.size]).hexdigest() == known.sha256
        )
        if not grown:  # new or rewritten (a resume dropped lines after its checkpoint): upload it whole
            return name, data[:end], _synced(name, data[:end], whole)
        assert known is not None
        if end == known.size:
            return None
        key = f"{name}~{known.size:012d}"
        return key, data[known.size : end], _synced(name, data[:end], whole, [*known.objects, key])
