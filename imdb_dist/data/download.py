"""Fetching a file into a local cache, verified against its sha256 before it is cached.

``data.source: download`` (and ``auto`` without a data path) reads the
official aclImdb archive through :func:`fetch`. The file is streamed into a
hidden temporary file beside its final name, hashed as it is written, and
renamed into place only once its length and sha256 match, so no partial or
wrong file ever sits under the final name; the temporary file is removed on
any error, Ctrl-C or SIGTERM. Only SIGKILL or a crash can leave a hidden
``.part`` file behind: nothing reads it, and the next fetch of the same
file removes it once it has been untouched for ten read timeouts.
``tf_keras.utils.get_file`` is not used because it downloads straight to the
final path and, when the hash does not match, raises with that file left in
place.

No TensorFlow here: :func:`imdb_dist.data.sources.read_ahead` runs this in a
forked child before the parent imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from imdb_dist.config import OFFICIAL_SHA256, OFFICIAL_URL
from imdb_dist.errors import DataError

__all__ = ["ABANDONED_AFTER_S", "ENV_CACHE", "OFFICIAL_SHA256", "OFFICIAL_URL", "cache_dir", "fetch", "file_sha256"]

log = logging.getLogger(__name__)

ENV_CACHE = "IMDB_DIST_CACHE"
# Seconds one read of the connection may wait (urllib's timeout is per
# socket operation): a stalled server fails instead of hanging the job.
READ_TIMEOUT_S = 60.0
# A temporary download file untouched this long was left by a process that
# died mid-download (see _remove_abandoned).
ABANDONED_AFTER_S = 10 * READ_TIMEOUT_S
_CHUNK = 256 * 1024
# Progress lines: every tenth of a known size, else every this many bytes.
_UNKNOWN_SIZE_STEP = 16 * 1024 * 1024
_OFFLINE_HINT = "offline, set data.path or $IMDB_DATA to an aclImdb directory or .tar.gz"


def cache_dir() -> Path:
    """The download cache: ``$IMDB_DIST_CACHE``, else ``$XDG_CACHE_HOME/imdb-dist``, else ``~/.cache/imdb-dist``."""
    explicit = os.environ.get(ENV_CACHE)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec: a relative path there is invalid and to be ignored.
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "imdb-dist"
    return Path.home() / ".cache" / "imdb-dist"


def file_sha256(path: Path) -> str:
    """The hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, sha256: str, cache: Path | None = None) -> Path:
    """The file at ``url`` with this ``sha256``, from ``cache`` or downloaded into it.

    The cached file is ``cache/<last part of the URL's path>``. One whose
    sha256 matches is returned without touching the network; one that does
    not is downloaded again (with a warning), and stays as it was until a
    verified download replaces it: a mistyped ``sha256`` costs a download,
    never a good cached file.

    Args:
        url: an http://, https:// or file:// URL.
        sha256: the file's expected hex sha256 (either case).
        cache: the cache directory; default :func:`cache_dir`.

    Raises:
        DataError: the download failed, was cut short or does not match
            ``sha256``, or the cache cannot be written. One line that names
            the URL; nothing new is left in the cache.
    """
    cache = cache if cache is not None else cache_dir()
    expected = sha256.lower()
    name = PurePosixPath(urllib.parse.urlsplit(url).path).name
    if name in ("", ".", ".."):
        raise DataError(f"cannot download {url}: its path names no file to cache")
    target = cache / name
    _remove_abandoned(cache, name)
    if _cached(target, expected):
        log.info("using %s (sha256 verified)", target)
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create the download cache {cache}: {exc.strerror}; set ${ENV_CACHE} to a writable directory"
        ) from None
    # Hidden and unique: a reader of the cache never sees it, and two
    # processes fetching at once each write their own and rename.
    part = cache / f".{name}.{secrets.token_hex(6)}.part"
    try:
        try:
            handle = part.open("xb")
        except OSError as exc:
            raise DataError(
                f"cannot write to the download cache {cache}: {exc.strerror}; set ${ENV_CACHE} to a writable directory"
            ) from None
        started = time.perf_counter()
        with handle:
            received, got = _download(url, handle, target)
        if got != expected:
            raise DataError(
                f"download of {url} does not match its checksum: received {received} bytes with sha256 {got}, "
                f"expected {expected}; nothing was cached (the file at the URL changed, or data.sha256 is wrong)"
            )
        try:
            os.replace(part, target)
        except OSError as exc:
            raise DataError(f"cannot move the download of {url} into {target}: {exc.strerror}") from None
    except BaseException:
        # Whatever stopped it (an error, Ctrl-C, the SIGTERM a read-ahead
        # child gets), no partial or unverified file stays behind.
        part.unlink(missing_ok=True)
        raise
    log.info(
        "downloaded %s in %.1f s (%s, sha256 verified) to %s",
        url, time.perf_counter() - started, _megabytes(received), target,
    )
    return target


def _remove_abandoned(cache: Path, name: str) -> None:
    """Remove temporary files of downloads of ``name`` that died (SIGKILL, a crash) in ``cache``.

    A live download writes at least once every ``READ_TIMEOUT_S`` or fails
    (and removes its file), so one untouched for ``ABANDONED_AFTER_S`` is
    nobody's; a concurrent fetch's fresh file is left alone.
    """
    for leftover in cache.glob(f".{name}.*.part"):
        try:
            if time.time() - leftover.stat().st_mtime > ABANDONED_AFTER_S:
                leftover.unlink()
                log.info("removed %s, left by a download that did not finish", leftover)
        except OSError:
            pass  # gone already (another fetch removed it), or not ours to remove


def _cached(target: Path, expected: str) -> bool:
    """Whether ``target`` is there and holds the file with sha256 ``expected``."""
    try:
        got = file_sha256(target)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("cannot read the cached %s (%s); downloading it again", target, exc.strerror)
        return False
    if got == expected:
        return True
    log.warning("cached %s has sha256 %s, not the expected %s; downloading it again", target, got, expected)
    return False


def _download(url: str, out: BinaryIO, target: Path) -> tuple[int, str]:
    """Stream ``url`` into ``out``; return the bytes received and their sha256."""
    try:
        # urllib asks for the identity encoding: the bytes hashed are the file's.
        response = urllib.request.urlopen(url, timeout=READ_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the error page's connection
        raise DataError(
            f"cannot download {url}: HTTP {exc.code} {exc.reason}; check data.url, or set data.path or "
            "$IMDB_DATA to an aclImdb directory or .tar.gz"
        ) from None
    except (http.client.HTTPException, OSError, ValueError) as exc:
        # URLError (refused, no route, name lookup), timeouts, resets, bad URLs.
        raise DataError(f"cannot download {url}: {_reason(exc)}; {_OFFLINE_HINT}") from None
    digest = hashlib.sha256()
    received = 0
    with response:
        total = _content_length(response)
        log.info("downloading %s (%s) to %s", url, _megabytes(total) if total is not None else "size unknown", target)
        step = total // 10 if total else _UNKNOWN_SIZE_STEP
        next_report = step
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (http.client.HTTPException, OSError) as exc:
                raise DataError(
                    f"download of {url} failed after {received} bytes: {_reason(exc)}; nothing was cached; "
                    f"{_OFFLINE_HINT}"
                ) from None
            if not chunk:
                break
            try:
                out.write(chunk)
            except OSError as exc:
                raise DataError(
                    f"cannot write the download of {url} to {out.name}: {exc.strerror}; nothing was cached"
                ) from None
            digest.update(chunk)
            received += len(chunk)
            if step and received >= next_report and received != total:
                share = f"{100 * received // total}%, " if total else ""
                log.info("downloading %s: %s%s", target.name, share, _megabytes(received))
                next_report = (received // step + 1) * step
    # A server that closes early looks like the end of the file to read():
    # only the announced length tells the two apart.
    if total is not None and received != total:
        raise DataError(
            f"download of {url} was cut short: received {received} of {total} bytes; nothing was cached; "
            f"{_OFFLINE_HINT}"
        )
    return received, digest.hexdigest()


def _content_length(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length", "")
    return int(value) if value.strip().isdigit() else None


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _reason(exc: BaseException) -> str:
    """One line of why a request failed, without urllib's wrapping ("<urlopen error [Errno 111] ...>")."""
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else ValueError(str(exc.reason))
    text = getattr(exc, "strerror", None) or str(exc)
    return text.splitlines()[0] if text.strip() else type(exc).__name__
