"""Where a run directory lives: a local (or NFS) path, or any URI ``pyarrow.fs`` understands.

``s3://bucket/prefix``, ``gs://...``, ``abfs://...``, ``hdfs://...``, with
the filesystem's options in the URI's query (an S3-compatible server:
``s3://bucket/runs?endpoint_override=host:9000&scheme=http``).

Credentials come from each filesystem's standard sources
(``AWS_ACCESS_KEY_ID`` and friends, instance roles,
``GOOGLE_APPLICATION_CREDENTIALS``), never from a URI: a URI with userinfo
(``s3://KEY:SECRET@bucket``) or a secret query key is refused
(:func:`check_no_credentials`), because URIs are stored in configs and
reports, shown in Ray's dashboard and printed in logs. The refusal itself
names the URI through :func:`redact`, so the secret is printed nowhere.

Transient faults: an S3 filesystem is built with pyarrow's bounded,
exponential retry strategy (:class:`RetryingS3FileSystem`), sized by
``run.storage_retry_s``, and it keeps that strategy when pickled, so the
copies Ray Train's controller and workers unpickle to write checkpoints
retry too (a plain ``S3FileSystem`` pickles without it). The functions
below try each call once without retries first: a call that fails then
says so in one warning (what, where, for how long it retries) before it
retries, instead of going silent for the budget. That budget protects a
run in progress; before a run starts there is nothing to protect, so
:func:`check_writable` and :func:`check_reachable` retry for
:data:`START_RETRY_S` at most and refuse an unreachable store in seconds.

TensorFlow reads and writes local files only (its cloud filesystems left
the core wheel), so a run on remote storage works in a local directory and
:mod:`imdb_dist.rundir` copies files between the two with the functions
below. They take remote locations only. :func:`write_bytes` makes each
file appear whole or not at all on every backend: one object on object
stores (an upload completes or leaves nothing), a hidden sibling moved
into place elsewhere (HDFS, Azure).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import posixpath
import re
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.fs as pafs

from imdb_dist.errors import InputError

_PROBE = ".imdb-dist-write-probe"
# Query keys that carry credentials in some pyarrow filesystem's URI, or could: refused, and masked when printed.
_SECRET_WORDS = ("secret", "token", "password", "passwd", "credential", "access_key", "account_key", "sas", "signature")
# The S3 options pyarrow reads from an s3:// URI's query (S3Options::FromUri), as S3FileSystem's arguments.
_S3_QUERY = {
    "region": str,
    "scheme": str,
    "endpoint_override": str,
    "allow_bucket_creation": lambda v: v.lower() in ("1", "true"),
    "allow_bucket_deletion": lambda v: v.lower() in ("1", "true"),
    "tls_ca_file_path": str,
}
# pyarrow's AwsDefaultS3RetryStrategy (the AWS SDK's DefaultRetryStrategy) doubles its waits from this.
_FIRST_WAIT_S = 0.025
DEFAULT_RETRY_S = 60.0
# How long the checks before a run retry (at most: a smaller run.storage_retry_s wins): 7 attempts,
# whose waits add up to 3.15 s (retry_attempts). A store down at start is most likely a typo in its
# endpoint, not an outage, and there is no run to protect yet.
START_RETRY_S = 3.0

log = logging.getLogger(__name__)

# The store's own answers, which the AWS SDK's default strategy does not retry (it retries
# network errors, throttling and server errors): raised at once, with no "retrying" warning.
_ANSWERED = re.compile(
    r"AWS Error (ACCESS_DENIED|NO_SUCH_BUCKET|NO_SUCH_KEY|INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH"
    r"|INVALID_PARAMETER_VALUE|INVALID_PARAMETER_COMBINATION|MISSING_PARAMETER|VALIDATION) "
)
_T = TypeVar("_T")


def _secret_key(name: str) -> bool:
    return any(word in name.lower() for word in _SECRET_WORDS)


def redact(location: str) -> str:
    """``location`` with any userinfo and secret query values replaced by ``***``: safe to print or store."""
    if not is_uri(location):
        return location
    parts = urllib.parse.urlsplit(location)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(
        f"{name}={'***' if _secret_key(name) else value}" if sep else name
        for name, sep, value in (item.partition("=") for item in parts.query.split("&") if item)
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_STORAGE_CREDENTIALS = ("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, an instance or pod role, "
                        "GOOGLE_APPLICATION_CREDENTIALS, ...")


def check_no_credentials(location: str, key: str, environment: str = _STORAGE_CREDENTIALS) -> None:
    """Refuse a URI that carries credentials (userinfo, or a secret query key).

    ``environment``: where the credentials come from instead, for the message.

    Raises:
        InputError: naming ``key`` and the URI redacted; the secret itself is never printed.
    """
    if not is_uri(location):
        return
    parts = urllib.parse.urlsplit(location)
    found = ["userinfo (user:password@)"] if "@" in parts.netloc else []
    found += [f"query key {name}" for name, _, _ in (i.partition("=") for i in parts.query.split("&")) if _secret_key(name)]
    if found:
        raise InputError(
            f"{key} {redact(location)} carries credentials ({', '.join(found)}): URIs are stored in configs and "
            f"reports and printed in logs, so credentials come from the environment ({environment})"
        )


def retry_attempts(retry_s: float) -> int:
    """pyarrow's ``max_attempts`` for a default S3 retry strategy that keeps retrying for at least ``retry_s``.

    With ``max_attempts=N`` the AWS SDK's DefaultRetryStrategy retries N
    times, waiting 0, 50, 100, ... 25 * 2**(N-1) ms: a store that stays
    down fails the call after 25 * (2**N - 2) ms (measured against moto
    behind a stopped forwarder: N=10 fails after 25.6 s, N=11 after 51 s,
    N=12 after 102 s; N=10 survived a 20 s outage).
    """
    attempts = 1
    while waits_s(attempts) < retry_s:
        attempts += 1
    return attempts


def waits_s(attempts: int) -> float:
    """How long the SDK's default strategy with ``max_attempts=attempts`` waits in all before it gives up."""
    return _FIRST_WAIT_S * (2**attempts - 2)


class RetryingS3FileSystem(pafs.S3FileSystem):
    """An ``S3FileSystem`` with pyarrow's default (exponential) retry strategy that survives pickling.

    ``S3FileSystem.__reduce__`` rebuilds the filesystem from its options
    without its retry strategy, so the copy Ray Train unpickles in its
    controller and workers would make the SDK's standard 3 attempts, a
    second or two in all. This subclass rebuilds itself with the strategy.
    """

    def __init__(self, options: dict[str, Any], attempts: int, budget: str = "run.storage_retry_s") -> None:
        super().__init__(**options, retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=attempts))
        self.options, self.attempts = dict(options), attempts
        self.budget = budget  # what sized the retries, for the warning a retrying call logs
        self._first_try: pafs.S3FileSystem | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return RetryingS3FileSystem, (self.options, self.attempts, self.budget)

    @property
    def retry_s(self) -> float:
        """How long a call keeps retrying a store that stays down (the waits between its attempts)."""
        return waits_s(self.attempts)

    def first_try(self) -> pafs.S3FileSystem:
        """The same store without retries: each call fails at its first error (built once, on first use)."""
        if self._first_try is None:
            # max_attempts=0: the SDK's DefaultRetryStrategy makes the first attempt only.
            self._first_try = pafs.S3FileSystem(**self.options, retry_strategy=pafs.AwsDefaultS3RetryStrategy(0))
        return self._first_try

    def with_attempts(self, attempts: int, budget: str) -> RetryingS3FileSystem:
        """The same store retried ``attempts`` times; ``budget`` names what sized that, for the warnings."""
        return RetryingS3FileSystem(self.options, attempts, budget)


def _with_retries(filesystem: pafs.FileSystem, location: str, retry_s: float) -> pafs.FileSystem:
    """The S3 filesystem ``from_uri`` built, rebuilt with retries; other filesystems as they are."""
    if not isinstance(filesystem, pafs.S3FileSystem):
        return filesystem
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)
    options = {name: convert(query[name][-1]) for name, convert in _S3_QUERY.items() if name in query}
    # from_uri resolved the bucket's region when the URI named none: keep its answer.
    options["region"] = filesystem.region
    return RetryingS3FileSystem(options, retry_attempts(retry_s))


@dataclasses.dataclass(frozen=True)
class Location:
    """A directory or file: ``filesystem`` is None for a local path (then ``path`` is absolute)."""

    filesystem: pafs.FileSystem | None
    path: str
    uri: str  # what the user wrote (plus any child parts), with no credentials: for messages and configs

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


def parse(location: str, key: str, *, retry_s: float = DEFAULT_RETRY_S) -> Location:
    """A local path (``~`` expanded, made absolute) or a filesystem URI.

    ``retry_s``: how long each call to an S3 store keeps retrying a
    connection or server error (:func:`retry_attempts`).

    Raises:
        InputError: a URI with credentials in it, or one whose scheme or
            form ``pyarrow.fs`` rejects (``key`` names the config key or
            option in the message).
    """
    if not is_uri(location):
        return Location(None, str(Path(location).expanduser().resolve()), str(Path(location).expanduser().resolve()))
    check_no_credentials(location, key)
    try:
        filesystem, path = pafs.FileSystem.from_uri(location)
    except (ValueError, OSError, TypeError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise InputError(f"{key} {location} is not a storage URI this machine can use: {reason(exc)}") from None
    if isinstance(filesystem, pafs.LocalFileSystem):  # file:///abs/path
        return Location(None, path, path)
    if not path.strip("/"):
        raise InputError(f"{key} {location} names no bucket or directory")
    return Location(_with_retries(filesystem, location, retry_s), path.rstrip("/"), location)


def _at_start(location: Location) -> Location:
    """``location`` on a filesystem that retries for :data:`START_RETRY_S` at most: nothing to protect yet."""
    filesystem = location.filesystem
    if not isinstance(filesystem, RetryingS3FileSystem):
        return location
    attempts = min(filesystem.attempts, retry_attempts(START_RETRY_S))
    budget = "before the run starts" if attempts < filesystem.attempts else filesystem.budget
    return dataclasses.replace(location, filesystem=filesystem.with_attempts(attempts, budget))


def check_writable(location: Location, key: str) -> None:
    """Fail now, in one line, if ``location`` cannot be reached or written (bucket, network, credentials).

    Writes and deletes a small probe object, the one test every store
    answers the same way. Before a run: an S3 store is retried for
    :data:`START_RETRY_S` at most, whatever ``run.storage_retry_s`` says.
    """
    probe = _at_start(location).child(_PROBE)
    try:
        write_bytes(probe, b"")
        delete(probe)
    except OSError as exc:
        raise InputError(f"{key} {location}: cannot write there: {reason(exc)}") from None


def check_reachable(location: Location, key: str) -> None:
    """Fail now, in one line, if ``location`` cannot be reached or read; writes nothing.

    For a start that reads before it may write (a finished job resubmitted
    writes nothing): the same short retry budget as :func:`check_writable`.
    """
    start = _at_start(location)
    try:
        _call(start, "read", lambda filesystem: filesystem.get_file_info(start.path))
    except OSError as exc:
        raise InputError(f"{key} {location}: cannot read there: {reason(exc)}") from None


def _call(location: Location, what: str, call: Callable[[pafs.FileSystem], _T]) -> _T:
    """``call`` on the location's filesystem; an S3 call that fails once says so in one warning, then retries.

    pyarrow's retries are silent, and a store that stays down holds a call
    for the whole budget: the first attempt is made without them, so the
    log says at once what failed, where, and for how long it is retried.
    """
    filesystem = _remote(location)
    if not isinstance(filesystem, RetryingS3FileSystem):
        return call(filesystem)
    try:
        return call(filesystem.first_try())
    except (FileNotFoundError, PermissionError):
        raise  # the store answered: nothing to retry
    except OSError as exc:
        if _ANSWERED.search(str(exc)):
            raise  # the same: the SDK would not retry it either
        log.warning(
            "storage: cannot %s %s: %s; retrying for up to %.3g s (%s)",
            what, location, reason(exc), filesystem.retry_s, filesystem.budget,
        )
    return call(filesystem)


def read_bytes(location: Location) -> bytes | None:
    """The file's bytes, or None when it does not exist."""

    def read(filesystem: pafs.FileSystem) -> bytes | None:
        if filesystem.get_file_info(location.path).type != pafs.FileType.File:
            return None
        with filesystem.open_input_stream(location.path) as stream:
            return stream.read()

    return _call(location, "read", read)


def object_store(filesystem: pafs.FileSystem) -> bool:
    """Whether a file appears only once its upload completes (S3, GCS): else it grows in place as written."""
    return isinstance(filesystem, (pafs.S3FileSystem, pafs.GcsFileSystem))


def write_bytes(location: Location, data: bytes) -> None:
    """Replace the file with ``data``: readers see the old file or the new one, never a part."""
    _call(location, "write", lambda filesystem: _write(filesystem, location.path, data))


def _write(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    parent = posixpath.dirname(path)
    if object_store(filesystem):
        # No create_dir: an object store's directories are key prefixes, and marker objects would be clutter.
        with filesystem.open_output_stream(path) as stream:
            stream.write(data)
        return
    filesystem.create_dir(parent, recursive=True)
    staging = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with filesystem.open_output_stream(staging) as stream:
            stream.write(data)
        filesystem.move(staging, path)
    except BaseException:
        with contextlib.suppress(OSError):
            filesystem.delete_file(staging)
        raise


def list_files(location: Location) -> dict[str, int]:
    """Every file below a remote directory: its path relative to ``location`` → size (empty if none)."""

    def listing(filesystem: pafs.FileSystem) -> dict[str, int]:
        if filesystem.get_file_info(location.path).type != pafs.FileType.Directory:
            return {}
        selector = pafs.FileSelector(location.path, recursive=True)
        prefix = location.path.rstrip("/") + "/"
        return {
            info.path[len(prefix):]: info.size
            for info in filesystem.get_file_info(selector)
            if info.type == pafs.FileType.File and info.path.startswith(prefix)
        }

    return _call(location, "list", listing)


def delete(location: Location) -> None:
    """Remove a file or a directory tree; nothing to remove is fine."""

    def remove(filesystem: pafs.FileSystem) -> None:
        kind = filesystem.get_file_info(location.path).type
        if kind == pafs.FileType.Directory:
            filesystem.delete_dir(location.path)
        elif kind == pafs.FileType.File:
            filesystem.delete_file(location.path)

    _call(location, "delete", remove)


def download(source: Location, target: Path) -> bool:
    """Copy a remote file or directory tree to ``target``; False when nothing was there to copy."""

    def copy(filesystem: pafs.FileSystem) -> bool:
        if filesystem.get_file_info(source.path).type == pafs.FileType.NotFound:
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            source.path, str(target), source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem()
        )
        return True

    return _call(source, "download", copy)


def _remote(location: Location) -> pafs.FileSystem:
    if location.filesystem is None:
        raise ValueError(f"{location} is a local path: the run directory there is written in place")
    return location.filesystem


def reason(exc: BaseException) -> str:
    """The first line of a storage error: pyarrow's messages run to several."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_input_file(location: Location) -> Any:
    """A remote file for random reads (``read_at``): one ranged request each, retried within the budget.

    The file belongs to the retrying filesystem whatever :func:`_call`'s
    first try did: a worker reads rows all through training, and a read in
    an outage must retry like every other call (only the look-up that opens
    it is tried once first, to warn; a file is opened once per worker, so
    its second HEAD request costs nothing).
    """
    info = _call(location, "open", lambda filesystem: filesystem.get_file_info(location.path))
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{location}: no such file")
    return _remote(location).open_input_file(location.path)
