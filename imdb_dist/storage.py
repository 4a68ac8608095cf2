"""Where a run directory lives: a local (or NFS) path, or any URI ``pyarrow.fs`` understands.

``s3://bucket/prefix``, ``gs://...``, ``abfs://...``, ``hdfs://...``, with
the filesystem's options in the URI's query (an S3-compatible server:
``s3://bucket/runs?endpoint_override=host:9000&scheme=http``). Credentials
come from each filesystem's standard sources (``AWS_ACCESS_KEY_ID`` and
friends, instance roles, ``GOOGLE_APPLICATION_CREDENTIALS``), never from a
config file.

TensorFlow reads and writes local files only (its cloud filesystems left
the core wheel), so a run on remote storage works in a local directory and
the functions below copy files between the two. They take remote
locations only: a local run directory is written in place, atomically, by
:mod:`imdb_dist.rundir`. On object stores one file is one object, which
appears whole when its upload completes or not at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import posixpath
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.fs as pafs

from imdb_dist.errors import InputError

_PROBE = ".imdb-dist-write-probe"


@dataclasses.dataclass(frozen=True)
class Location:
    """A directory or file: ``filesystem`` is None for a local path (then ``path`` is absolute)."""

    filesystem: pafs.FileSystem | None
    path: str
    uri: str  # what the user wrote (plus any child parts): for messages and configs

    @property
    def local(self) -> bool:
        return self.filesystem is None

    def child(self, *parts: str) -> Location:
        if self.local:
            return Location(None, str(Path(self.path, *parts)), str(Path(self.path, *parts)))
        base, query = (self.uri.split("?", 1) + [""])[:2]
        uri = posixpath.join(base, *parts) + (f"?{query}" if query else "")
        return Location(self.filesystem, posixpath.join(self.path, *parts), uri)

    def local_path(self) -> Path:
        if not self.local:
            raise ValueError(f"{self.uri} is not a local path")
        return Path(self.path)

    def __str__(self) -> str:
        return self.uri


def is_uri(location: str) -> bool:
    """True for ``scheme://...``; anything else is a local path."""
    return "://" in location


def parse(location: str, key: str) -> Location:
    """A local path (``~`` expanded, made absolute) or a filesystem URI.

    Raises:
        InputError: a URI whose scheme or form ``pyarrow.fs`` rejects (``key``
            names the config key or option in the message).
    """
    if not is_uri(location):
        return Location(None, str(Path(location).expanduser().resolve()), str(Path(location).expanduser().resolve()))
    try:
        filesystem, path = pafs.FileSystem.from_uri(location)
    except (ValueError, OSError, TypeError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise InputError(f"{key} {location} is not a storage URI this machine can use: {reason(exc)}") from None
    if isinstance(filesystem, pafs.LocalFileSystem):  # file:///abs/path
        return Location(None, path, path)
    if not path.strip("/"):
        raise InputError(f"{key} {location} names no bucket or directory")
    return Location(filesystem, path.rstrip("/"), location)


def check_writable(location: Location, key: str) -> None:
    """Fail now, in one line, if ``location`` cannot be reached or written (bucket, network, credentials).

    Writes and deletes a small probe object, the one test every store
    answers the same way.
    """
    probe = location.child(_PROBE)
    try:
        write_bytes(probe, b"")
        delete(probe)
    except OSError as exc:
        raise InputError(f"{key} {location}: cannot write there: {reason(exc)}") from None


def has_files(location: Location) -> bool:
    """True if ``location`` is a file, or a directory with a file anywhere below it."""
    filesystem = _remote(location)
    kind = filesystem.get_file_info(location.path).type
    if kind != pafs.FileType.Directory:
        return kind == pafs.FileType.File
    selector = pafs.FileSelector(location.path, recursive=True)
    return any(info.type == pafs.FileType.File for info in filesystem.get_file_info(selector))


def read_bytes(location: Location) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    filesystem = _remote(location)
    if filesystem.get_file_info(location.path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(location.path) as stream:
        return stream.read()


def write_bytes(location: Location, data: bytes) -> None:
    """Replace the file with ``data``."""
    filesystem = _remote(location)
    filesystem.create_dir(posixpath.dirname(location.path), recursive=True)
    with filesystem.open_output_stream(location.path) as stream:
        stream.write(data)


def delete(location: Location) -> None:
    """Remove a file or a directory tree; nothing to remove is fine."""
    filesystem = _remote(location)
    kind = filesystem.get_file_info(location.path).type
    if kind == pafs.FileType.Directory:
        filesystem.delete_dir(location.path)
    elif kind == pafs.FileType.File:
        filesystem.delete_file(location.path)


def upload(source: Path, target: Location) -> None:
    """Copy a local file, or a directory tree file by file, to ``target``."""
    pafs.copy_files(
        str(source), target.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=_remote(target)
    )


def download(source: Location, target: Path, only: Iterable[str] | None = None) -> bool:
    """Copy a file or a directory tree (or just the files ``only`` names, relative to it) to ``target``.

    Returns False when nothing was there to copy.
    """
    if only is not None:
        found = [download(source.child(*name.split("/")), target / name) for name in only]
        return any(found)
    filesystem = _remote(source)
    if filesystem.get_file_info(source.path).type == pafs.FileType.NotFound:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(
        source.path, str(target), source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem()
    )
    return True


def _remote(location: Location) -> pafs.FileSystem:
    if location.filesystem is None:
        raise ValueError(f"{location} is a local path: the run directory there is written in place")
    return location.filesystem


@contextlib.contextmanager
def local_copy(location: str, key: str) -> Iterator[Path]:
    """A local path to read ``location`` from: itself, or a temporary download of a remote file or tree.

    Raises:
        InputError: a bad URI, unreachable storage, or nothing at ``location``.
    """
    where = parse(location, key)
    if where.local:
        yield where.local_path()
        return
    with tempfile.TemporaryDirectory(prefix="imdb-dist-download-") as scratch:
        target = Path(scratch) / posixpath.basename(where.path)
        try:
            found = download(where, target)
        except OSError as exc:
            raise InputError(f"{key} {location}: cannot read it: {reason(exc)}") from None
        if not found:
            raise InputError(f"{key} {location} does not exist")
        yield target


def reason(exc: BaseException) -> str:
    """The first line of a storage error: pyarrow's messages run to several."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
