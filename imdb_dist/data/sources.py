"""Reading labeled reviews from the supported sources into memory.

Every source ends as the same :class:`Reviews`: raw review strings and 0/1
labels, in a deterministic order, so the seeded validation split and the
vocabulary are the same on every run and on every worker. The ``download``
source is the official aclImdb archive, fetched and verified by
:mod:`imdb_dist.data.download`, then read like any aclImdb tarball.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import logging
import lzma
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import sys
import tarfile
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import BinaryIO

import numpy as np

from imdb_dist.config import DataConfig
from imdb_dist.data.download import fetch
from imdb_dist.data.splits import fold_indices, split_indices
from imdb_dist.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
ENV_PATH = "IMDB_DATA"
# Reviews are ID_RATING.txt files in <split>/pos and <split>/neg; train/unsup
# (unlabeled) and anything not directly inside pos/ or neg/ is ignored.
_COMPRESSED = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}
_REVIEW = re.compile(r"(?:^|/)(train|test)/(pos|neg)/([^/]+\.txt)$")
# The official archive's train/urls_pos.txt etc.: line N is the IMDB page of
# the movie that review N_*.txt is about (a title id tt0123456).
_URLS = re.compile(r"(?:^|/)(train|test)/urls_(pos|neg)\.txt$")
_TITLE = re.compile(r"tt\d+")


@dataclasses.dataclass(frozen=True)
class Reviews:
    """Labeled reviews held in memory (the whole of IMDB is ~33 MB of text)."""

    texts: list[str]
    labels: np.ndarray  # int32, 1 = positive
    # int32 movie number per review, where the source says which movie each
    # review is about; splits then keep a movie's reviews on one side.
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.texts)


def resolve_source(cfg: DataConfig) -> tuple[str, str | None]:
    """Return ``(source, path)`` with ``auto`` resolved.

    ``auto`` uses ``data.path``, else ``$IMDB_DATA``, as an aclImdb directory
    or tarball, and without either downloads the archive at ``data.url``
    into the default cache (``download``). An explicit ``download`` takes
    ``data.path`` as its cache directory. TensorFlow Datasets'
    ``imdb_reviews`` is only read when ``data.source`` says ``tfds``.
    """
    path = cfg.path or os.environ.get(ENV_PATH) or None
    if cfg.source == "aclimdb":
        return "aclimdb", path
    if cfg.source != "auto":
        return cfg.source, cfg.path
    return ("aclimdb", path) if path else ("download", None)


def load_reviews(cfg: DataConfig, split: str) -> Reviews:
    """Load one split: ``train`` and ``validation`` partition the source's train split.

    The validation part is a fixed fraction drawn with ``data.seed``, or with
    ``data.folds`` one fold of a seeded k-fold partition; the two never
    overlap and together hold every training review. For both parts, call
    :func:`load_training_splits`: it reads the source once.

    Raises:
        DataError: the source, or the split in it, is missing or malformed.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    if split == "test":
        return _read_source(cfg, "test")
    train, val = _partition(cfg, _read_source(cfg, "train"))
    return train if split == "train" else val


def load_training_splits(cfg: DataConfig) -> tuple[Reviews, Reviews]:
    """``(train, validation)`` as :func:`load_reviews` gives them, from one read of the source.

    Raises:
        DataError: the source, or its train split, is missing or malformed.
    """
    return _partition(cfg, _read_source(cfg, "train"))


class ReadAhead:
    """The training splits, being read by :func:`read_ahead`; :meth:`result` waits for them."""

    def __init__(self, cfg: DataConfig, context: multiprocessing.context.BaseContext | None = None) -> None:
        """With a ``fork`` context, start the child that reads; without, read in :meth:`result`."""
        self._cfg = cfg
        self._process: multiprocessing.process.BaseProcess | None = None
        if context is not None:
            self._receive, send = context.Pipe(duplex=False)
            # A daemon: a parent that exits before asking (say, the run was
            # already complete) takes the reader down with it.
            self._process = context.Process(
                target=_read_into, args=(cfg, send, self._receive), name="imdb-dist-read", daemon=True
            )
            self._process.start()
            send.close()

    @property
    def in_background(self) -> bool:
        """Whether a child process is reading (else :meth:`result` reads in this process)."""
        return self._process is not None

    def result(self) -> tuple[Reviews, Reviews]:
        """What ``load_training_splits(cfg)`` returns, or the ``DataError`` it raised, raised here."""
        if self._process is None:
            return load_training_splits(self._cfg)
        try:
            ok, value = self._receive.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(
                f"the process reading the training reviews died (exit code {self._process.exitcode})"
            ) from None
        finally:
            self._receive.close()
        self._process.join()
        if not ok:
            raise value
        return value


def _read_into(
    cfg: DataConfig, send: multiprocessing.connection.Connection, receive: multiprocessing.connection.Connection
) -> None:
    # Ctrl-C is the parent's to handle. The parent reaps this daemon on its
    # way out with SIGTERM: leave through the finally blocks then, so that a
    # download in progress removes its temporary file.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    # The fork copied the parent's end too: holding it, a send bigger than the
    # pipe's buffer would wait forever for a parent that was killed.
    receive.close()
    try:
        result: tuple[bool, object] = (True, load_training_splits(cfg))
    except DataError as exc:
        result = (False, exc)
    try:
        send.send(result)
    except BrokenPipeError:
        pass  # the parent is gone (killed before it asked): nobody to tell
    finally:
        send.close()


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def read_ahead(cfg: DataConfig) -> ReadAhead:
    """Start reading the training splits in a child process, while this one goes on loading.

    ``imdb-dist train`` calls this before it imports TensorFlow: decompressing
    and parsing the archive (about 2 s here), and for ``download`` first
    fetching or verifying it, then runs on a second core during the import
    (about 5 s) instead of after it. Forking is only safe while this process
    has a single thread and no TensorFlow runtime, and only the aclImdb
    reader and the download need neither; otherwise nothing starts and
    :meth:`ReadAhead.result` reads in this process.
    """
    source, _ = resolve_source(cfg)
    forkable = threading.active_count() == 1 and "tensorflow" not in sys.modules
    # On macOS urllib looks up the system proxy settings through an API that
    # crashes a forked child (CPython documents it: gh-105912), so there the
    # download runs in this process.
    if source == "download" and sys.platform == "darwin":
        forkable = False
    if source not in ("aclimdb", "download") or not forkable or "fork" not in multiprocessing.get_all_start_methods():
        return ReadAhead(cfg)
    return ReadAhead(cfg, multiprocessing.get_context("fork"))


def _read_source(cfg: DataConfig, raw_split: str) -> Reviews:
    source, path = resolve_source(cfg)
    if source == "aclimdb":
        if not path:
            raise DataError(
                "data.source aclimdb needs data.path or $IMDB_DATA (an aclImdb directory or .tar.gz); "
                "data.source auto or download fetches the official archive instead"
            )
        return read_aclimdb(path, raw_split)
    if source == "download":
        # Both splits come from the one archive; a second call finds it cached.
        return read_aclimdb(fetch(cfg.url, cfg.sha256, Path(path) if path else None), raw_split)
    if source == "tfds":
        return _read_tfds(path, raw_split)
    return _read_keras(path, raw_split, cfg.vocab_size)


def _partition(cfg: DataConfig, reviews: Reviews) -> tuple[Reviews, Reviews]:
    if cfg.folds:
        train_idx, val_idx = fold_indices(len(reviews), cfg.folds, cfg.fold, cfg.seed, reviews.groups)
    else:
        train_idx, val_idx = split_indices(len(reviews), cfg.validation_fraction, cfg.seed, reviews.groups)
    return subset(reviews, train_idx), subset(reviews, val_idx)


def movies(reviews: Reviews) -> int | None:
    """How many movies ``reviews`` are about; None where the source does not say."""
    return None if reviews.groups is None else int(np.unique(reviews.groups).size)


def subset(reviews: Reviews, indices: np.ndarray) -> Reviews:
    """The reviews at ``indices``, in that order."""
    groups = None if reviews.groups is None else reviews.groups[indices]
    return Reviews([reviews.texts[i] for i in indices], reviews.labels[indices], groups)


def read_aclimdb(path: str | os.PathLike, split: str) -> Reviews:
    """Read ``split`` (train or test) from an aclImdb directory or tarball.

    Reviews must be UTF-8: a file that is not is rejected with its name,
    since it means a corrupt or wrongly converted dataset. Empty review
    files are skipped with a warning: they carry no signal to learn from.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"data path {root} does not exist")
    if root.is_dir():
        files = _iter_dir(root)
    elif not os.access(root, os.R_OK):
        raise DataError(f"data path {root} is not readable")
    elif _looks_like_archive(root):
        files = _iter_tar(root)
    else:
        raise DataError(f"data path {root} is neither a directory nor a tar archive")

    found: dict[tuple[str, str], list[tuple[str, str]]] = {}
    urls: dict[tuple[str, str], list[str]] = {}
    empty = 0
    for name, payload in files:
        match = _REVIEW.search(name)
        if match is None:
            listing = _URLS.search(name)
            if listing is not None:
                urls[listing.group(1), listing.group(2)] = payload.decode("utf-8", "replace").splitlines()
            continue
        file_split, label = match.group(1), match.group(2)
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{root}: {name} is not valid UTF-8 (byte {exc.start})") from None
        if not text.strip():
            empty += 1
            continue
        found.setdefault((file_split, label), []).append((name, text))
    if empty:
        log.warning("%s: skipped %d empty review file(s)", root, empty)
    return _collect(root, split, found, urls)


def _collect(
    root: Path,
    split: str,
    found: dict[tuple[str, str], list[tuple[str, str]]],
    urls: dict[tuple[str, str], list[str]],
) -> Reviews:
    present = sorted({s for s, _ in found})
    if split not in present:
        holds = ", ".join(present) if present else "no reviews in the aclImdb layout"
        raise DataError(f"{root} has no {split} split (it holds: {holds})")
    pairs: list[tuple[str, str, int]] = []
    for label, value in (("neg", 0), ("pos", 1)):
        items = found.get((split, label), [])
        if not items:
            raise DataError(f"{root}: {split}/{label} holds no reviews")
        pairs += [(name, text, value) for name, text in items]
    # Sort by file name so the order (and so the seeded split) never depends
    # on directory listing or archive member order.
    pairs.sort(key=lambda p: p[0])
    groups = _movies(root, split, [name for name, _, _ in pairs], urls)
    return Reviews([p[1] for p in pairs], np.array([p[2] for p in pairs], dtype=np.int32), groups)


def _movies(root: Path, split: str, names: list[str], urls: dict[tuple[str, str], list[str]]) -> np.ndarray | None:
    """The movie number of each review named, from ``<split>/urls_{pos,neg}.txt``; None without both files."""
    if (split, "pos") not in urls or (split, "neg") not in urls:
        return None
    titles: list[str] = []
    for name in names:
        match = _REVIEW.search(name)
        assert match is not None  # names are the reviews _REVIEW matched
        label, file_name = match.group(2), match.group(3)
        lines = urls[split, label]
        number = file_name.split("_", 1)[0]
        if not number.isdigit() or int(number) >= len(lines):
            raise DataError(
                f"{root}: {split}/urls_{label}.txt has {len(lines)} lines, none for {split}/{label}/{file_name} "
                "(review N's movie is on line N); remove the urls files to split without movie grouping"
            )
        url = lines[int(number)].strip()
        title = _TITLE.search(url)
        titles.append(title.group(0) if title else url)
    _, numbers = np.unique(np.array(titles), return_inverse=True)
    return numbers.astype(np.int32)


def _iter_dir(root: Path) -> Iterator[tuple[str, bytes]]:
    base = root / "aclImdb" if (root / "aclImdb").is_dir() else root
    for split in ("train", "test"):
        for label in ("pos", "neg"):
            urls = base / split / f"urls_{label}.txt"
            if urls.is_file():
                yield f"{split}/{urls.name}", urls.read_bytes()
            folder = base / split / label
            if not folder.is_dir():
                continue
            for file in folder.iterdir():
                if file.suffix == ".txt" and file.is_file():
                    try:
                        yield f"{split}/{label}/{file.name}", file.read_bytes()
                    except OSError as exc:
                        raise DataError(f"cannot read {file}: {exc.strerror}") from None


def _open_stream(path: Path) -> BinaryIO:
    """The archive's bytes, decompressed if its magic number says gzip, bzip2 or xz."""
    with path.open("rb") as handle:
        head = handle.read(6)
    for magic, opener in _COMPRESSED.items():
        if head.startswith(magic):
            return opener(path, "rb")
    return path.open("rb")


def _looks_like_archive(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(6)
    if any(head.startswith(magic) for magic in _COMPRESSED):
        return True  # a compressed file: _iter_tar tells a corrupt one apart
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _iter_tar(path: Path) -> Iterator[tuple[str, bytes]]:
    try:
        # Stream mode reads the archive once, front to back, never seeking.
        with _open_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                if member.isfile() and (_REVIEW.search(member.name) or _URLS.search(member.name)):
                    handle = archive.extractfile(member)
                    if handle is not None:
                        yield member.name, handle.read()
            # Read to the end: a tarball cut at a member boundary otherwise
            # just looks shorter, while the decompressor's end-of-stream and
            # CRC checks catch the truncation.
            while stream.read(1 << 20):
                pass
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
        raise DataError(f"{path} is a corrupt or truncated archive: {exc}") from None


def _read_tfds(data_dir: str | None, split: str) -> Reviews:
    import tensorflow_datasets as tfds

    try:
        dataset = tfds.load("imdb_reviews", split=split, as_supervised=True, data_dir=data_dir)
        pairs = list(tfds.as_numpy(dataset))
    except Exception as exc:  # noqa: BLE001 - tfds raises many types (network, checksum, missing split).
        raise DataError(
            f"cannot load tfds imdb_reviews/{split}: {exc}; offline, point data.path "
            "(or $IMDB_DATA) at an aclImdb directory or .tar.gz"
        ) from None
    texts = [t.decode("utf-8", errors="replace") for t, _ in pairs]
    return Reviews(texts, np.array([int(y) for _, y in pairs], dtype=np.int32))


def _read_keras(path: str | None, split: str, vocab_size: int) -> Reviews:
    import tf_keras as keras

    imdb = keras.datasets.imdb
    try:
        # load_data verifies the archive's sha256 before opening it.
        (x_train, y_train), (x_test, y_test) = imdb.load_data(path=path or "imdb.npz", num_words=vocab_size)
        word_index = imdb.get_word_index()
    except Exception as exc:  # noqa: BLE001 - download and file errors surface as many types.
        raise DataError(f"cannot load keras.datasets.imdb: {exc}") from None
    sequences, labels = (x_train, y_train) if split == "train" else (x_test, y_test)
    return Reviews(decode_keras(sequences, word_index), np.asarray(labels, dtype=np.int32))


def decode_keras(sequences: list[list[int]], word_index: dict[str, int], index_from: int = 3) -> list[str]:
    """Turn keras.datasets.imdb's word ids back into text.

    The rest of the pipeline (and the exported model) works on raw strings,
    so the pre-indexed source is mapped back to words; ids below
    ``index_from`` are padding, start and out-of-vocabulary markers.
    """
    words = {i + index_from: w for w, i in word_index.items()}
    return [" ".join(words[i] for i in seq if i in words) for seq in sequences]
