"""The token store: every review's token ids, written once at preparation, read by rows at training.

Layout (one split; ``train`` and ``validation`` each have their three files)::

    <split>.tokens.npy   1-D, every review's ids one after another (uint16, or uint32 past 65,536 ids)
    <split>.lengths.npy  1-D, ids per review (uint16, or uint32 for max_len past 65,535)
    <split>.labels.npy   1-D uint8, 1 = positive

Each review is stored as the model sees it: its last ``max_len`` ids
(pre-truncation), no padding. Review ``i``'s ids are the ``lengths[i]`` ids
from ``sum(lengths[:i])`` on, so one review is one byte range of
``<split>.tokens.npy``: a worker computes the offsets from the lengths it
holds anyway (the plan needs them) and reads only its own rows, with a
``pread`` per run of adjacent rows on a local or NFS run directory, and
on ``s3://`` one ranged GET per run of rows less than 8 KiB apart (pyarrow's
coalescing rule, :func:`coalesce`; the stream reads a window of batches at
once, :func:`imdb_dist.data.plan.stream`) (:class:`TokenStore`). The files are NumPy's
``.npy`` format (NEP 1): self-describing, ``np.load(..., mmap_mode="r")``
opens them, and a truncated file is caught by its size against its header.

Why flat arrays, not Parquet or ArrayRecord: a row here is a contiguous
range whose offset is arithmetic, so a random row costs exactly its bytes
and one request. Parquet reads a whole (compressed) page to get one list
value and ArrayRecord a whole compressed chunk, so random rows at their
granularity fetch many times the rows' bytes, and ArrayRecord is one more
dependency with Linux-only wheels.

The manifest entry (:func:`SplitWriter.close`, kept in the prepared data's
``manifest.json`` under ``store``) names each file's size, the id and
length types and the SHA-256 of the vocabulary the ids index: a store
missing a file, cut short, or tokenized with another vocabulary is refused
before training (``DataError``: one ``error:`` line, exit 2).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from imdb_dist import storage
from imdb_dist.errors import DataError

FORMAT = "imdb-dist token store 1"
_ID_LIMITS = (np.uint16, np.uint32)
# A ranged GET costs a round trip: a batch's rows are read with this many requests in flight.
_REMOTE_READERS = 16


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id of a ``vocab_size`` vocabulary (padding and unknown included)."""
    return np.dtype(np.uint16 if vocab_size - 1 <= np.iinfo(np.uint16).max else np.uint32)


def length_dtype(max_len: int) -> np.dtype:
    """The narrowest unsigned type for a review's count of ids, at most ``max_len``."""
    return np.dtype(np.uint16 if max_len <= np.iinfo(np.uint16).max else np.uint32)


def vocabulary_digest(vocabulary: Sequence[str]) -> str:
    """SHA-256 of the vocabulary as the run directory's vocab.txt holds it (one token a line)."""
    return hashlib.sha256("".join(f"{token}\n" for token in vocabulary).encode("utf-8")).hexdigest()


def file_names(split: str) -> dict[str, str]:
    """The store's file for each part of ``split``."""
    return {part: f"{split}.{part}.npy" for part in ("tokens", "lengths", "labels")}


def _header(dtype: np.dtype, count: int) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                  "fortran_order": False, "shape": (count,)})
    return buffer.getvalue()


class SplitWriter:
    """Appends one split's reviews, batch by batch in order, to its three files (the ids streamed to disk)."""

    def __init__(self, directory: Path, split: str, *, vocab_size: int, max_len: int) -> None:
        self.split = split
        self._names = file_names(split)
        self._directory = directory
        self._ids = id_dtype(vocab_size)
        self._vocab_size = vocab_size
        self._lengths_type = length_dtype(max_len)
        self._max_len = max_len
        self._lengths: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._count = 0
        self._tokens = (directory / self._names["tokens"]).open("wb")
        # The header is written again with the final count at close: NumPy pads it
        # for the count's digits to grow in place, so its size never changes.
        self._tokens.write(_header(self._ids, 0))

    def append(self, values: np.ndarray, lengths: np.ndarray, labels: np.ndarray) -> None:
        """A batch of reviews: their ids one after another (``values``), ids per review, labels."""
        lengths = np.asarray(lengths)
        values = np.asarray(values)
        if len(lengths) and int(lengths.max()) > self._max_len:
            row = self._count + int(np.argmax(lengths > self._max_len))
            raise DataError(f"{self.split} review {row} has {int(lengths.max())} tokens, more than "
                            f"data.max_len {self._max_len}: it was not cut as the model reads it")
        if int(lengths.sum()) != len(values):
            raise ValueError(f"{len(values)} ids for reviews of {int(lengths.sum())} ids in all")
        if len(values) and (int(values.min()) < 0 or int(values.max()) >= self._vocab_size):
            raise DataError(f"{self.split} ids outside [0, {self._vocab_size}) (data.vocab_size)")
        self._tokens.write(values.astype(self._ids.newbyteorder("<"), copy=False).tobytes())
        self._lengths.append(lengths.astype(self._lengths_type))
        self._labels.append(np.asarray(labels).astype(np.uint8))
        self._count += len(lengths)

    def close(self) -> dict[str, Any]:
        """Finish the files; their manifest entry."""
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, self._lengths_type)
        labels = np.concatenate(self._labels) if self._labels else np.zeros(0, np.uint8)
        total = int(lengths.sum(dtype=np.int64))
        header = _header(self._ids, total)
        self._tokens.seek(0)
        if self._tokens.write(header) != len(_header(self._ids, 0)):
            raise AssertionError("the .npy header changed size")  # NumPy's growth padding promises it will not
        self._tokens.close()
        np.save(self._directory / self._names["lengths"], lengths.astype(self._lengths_type.newbyteorder("<")))
        np.save(self._directory / self._names["labels"], labels)
        return {
            "examples": len(lengths),
            "tokens": total,
            "files": {part: {"name": name, "bytes": (self._directory / name).stat().st_size}
                      for part, name in self._names.items()},
        }


def section(splits: dict[str, dict[str, Any]], *, vocabulary: Sequence[str], max_len: int, vocab_size: int) -> dict:
    """The manifest's ``store`` entry for the splits :meth:`SplitWriter.close` described."""
    return {
        "format": FORMAT,
        "vocabulary_sha256": vocabulary_digest(vocabulary),
        "max_len": max_len,
        "id_dtype": id_dtype(vocab_size).name,
        "length_dtype": length_dtype(max_len).name,
        "splits": splits,
    }


@dataclasses.dataclass(frozen=True)
class Files:
    """Where a store's files are read from: ``size``, whole ``read`` and ranged ``open`` by file name."""

    where: str  # for messages
    size: Callable[[str], int | None]  # None: missing
    read: Callable[[str], bytes]
    open: Callable[[str], Any]  # a pyarrow RandomAccessFile
    remote: bool = False
    local: Callable[[str], str] | None = None  # a file's local path, read with pread


def remote_files(location: storage.Location) -> Files:
    """A store below a remote run directory: sizes from a listing, ids by ranged reads (retried as storage.py says)."""
    listing = storage.list_files(location)

    def read(name: str) -> bytes:
        data = storage.read_bytes(location.child(name))
        if data is None:
            raise DataError(f"{location.child(name)} is missing: the token store is incomplete; prepare the run again")
        return data

    return Files(str(location), listing.get, read, lambda name: storage.open_input_file(location.child(name)),
                 remote=True)


def files_at(location: storage.Location, local: Path) -> Files:
    """A store's files in place: ``local`` for a local run directory, else ranged reads at ``location``."""
    return local_files(local) if location.local else remote_files(location)


def local_files(directory: Path) -> Files:
    """A store in a local (or NFS) directory."""
    filesystem = pafs.LocalFileSystem()

    def size(name: str) -> int | None:
        path = directory / name
        return path.stat().st_size if path.is_file() else None

    return Files(str(directory), size, lambda name: (directory / name).read_bytes(),
                 lambda name: filesystem.open_input_file(str(directory / name)),
                 local=lambda name: str(directory / name))


def coalesce(starts: np.ndarray, ends: np.ndarray, hole_bytes: int, range_bytes: int) -> list[tuple[int, int]]:
    """``(offset, size)`` reads covering the sorted byte ranges ``[starts, ends)``.

    A range joins the read before it when the gap between them is at most
    ``hole_bytes`` and the read stays within ``range_bytes`` (a range longer
    than that is read whole): pyarrow's ``CacheOptions`` rule for its own
    coalesced reads.
    """
    spans: list[tuple[int, int]] = []
    begin, end = int(starts[0]), int(ends[0])
    for start, stop in zip(starts[1:].tolist(), ends[1:].tolist()):
        if start - end <= hole_bytes and stop - begin <= range_bytes:
            end = stop
        else:
            spans.append((begin, end - begin))
            begin, end = start, stop
    spans.append((begin, end - begin))
    return spans


class TokenStore:
    """One split's reviews by global index, read by rows: the plan's random access (:class:`imdb_dist.data.plan.Examples`).

    Holds the lengths, labels and offsets (13 bytes a review); the ids stay
    in storage until a batch asks for them. Thread-safe: tf.data reads
    several batches at once.
    """

    def __init__(self, files: Files, entry: dict[str, Any], store: dict[str, Any], split: str) -> None:
        self.split = split
        self._ids = np.dtype(store["id_dtype"]).newbyteorder("<")
        self.lengths = _load_array(files, entry, "lengths", np.dtype(store["length_dtype"])).astype(np.int32)
        self.labels = _load_array(files, entry, "labels", np.dtype(np.uint8))
        self._name = entry["files"]["tokens"]["name"]
        self._data_start = _check_tokens(files, entry, self._ids, int(self.lengths.sum(dtype=np.int64)))
        self._offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        self._files = files
        self._fd = os.open(files.local(self._name), os.O_RDONLY) if files.local is not None else None
        self._file = files.open(self._name) if self._fd is None else None
        self._pool = concurrent.futures.ThreadPoolExecutor(_REMOTE_READERS) if files.remote else None
        # A request's round trip costs more than reading a small gap: a remote store reads across gaps up
        # to pyarrow's own default (CacheOptions: 8 KiB holes, 32 MiB requests); a local pread is cheap.
        defaults = pa.CacheOptions()
        self.hole_bytes = defaults.hole_size_limit if files.remote else 0
        self.range_bytes = defaults.range_size_limit
        self._lock = threading.Lock()
        self.fetched_bytes = 0
        self.requests = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def rows(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids of the reviews at ``index`` one after another (int64), and their lengths.

        Each review asked for is fetched once, however often ``index`` names
        it (a window of batches can span two epochs). Rows that touch are one
        read; on a remote store, so are rows with less than ``hole_bytes``
        between them (:func:`coalesce`).
        """
        index = np.asarray(index, dtype=np.int64)
        lengths = self.lengths[index]
        if not len(index):
            return np.zeros(0, np.int64), lengths
        unique, inverse = np.unique(index, return_inverse=True)
        item = self._ids.itemsize
        starts = self._offsets[unique] * item + self._data_start
        ends = self._offsets[unique + 1] * item + self._data_start
        spans = coalesce(starts, ends, self.hole_bytes, self.range_bytes)
        if self._fd is not None:  # a local file: one pread per span, no copy through pyarrow
            chunks = [os.pread(self._fd, size, offset) for offset, size in spans]
        elif self._pool is not None and len(spans) > 1:
            chunks = list(self._pool.map(lambda span: self._file.read_at(span[1], span[0]), spans))
        else:
            chunks = [self._file.read_at(size, offset) for offset, size in spans]
        data = b"".join(chunks)  # read_at gives bytes or a pyarrow Buffer: both are bytes-like
        with self._lock:
            self.fetched_bytes += len(data)
            self.requests += len(spans)
        if len(data) != sum(size for _, size in spans):
            raise DataError(f"{self._files.where}/{self._name} ended early: the token store is truncated")
        values = np.frombuffer(data, dtype=self._ids)
        # Where each unique row's ids start in ``values``: its offset within its span, plus the span's place.
        span_offsets = np.array([offset for offset, _ in spans], dtype=np.int64)
        span_places = np.concatenate([[0], np.cumsum([size for _, size in spans])[:-1]]).astype(np.int64)
        span_of = np.searchsorted(span_offsets, starts, side="right") - 1
        unique_starts = (starts - span_offsets[span_of] + span_places[span_of]) // item
        # Row k asked for: its ids are lengths[k] values from its unique row's start.
        within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return values[np.repeat(unique_starts[inverse], lengths) + within].astype(np.int64), lengths

    def gather(self, index: Any) -> tuple[Any, Any]:
        """Token rows (ragged int64) and int32 labels of the reviews at ``index`` (a tensor, in a tf.data map)."""
        import tensorflow as tf

        def read(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            values, lengths = self.rows(rows)
            return values, lengths.astype(np.int64), self.labels[rows].astype(np.int32)

        values, lengths, labels = tf.numpy_function(read, [index], [tf.int64, tf.int64, tf.int32], stateful=False)
        values.set_shape([None])
        lengths.set_shape([None])
        labels.set_shape([None])
        return tf.RaggedTensor.from_row_lengths(values, lengths, validate=False), labels

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        if self._fd is not None:
            os.close(self._fd)
        if self._file is not None:
            self._file.close()


def _parse_header(data: bytes, where: str) -> tuple[np.dtype, int, int]:
    """``(dtype, count, data offset)`` of a 1-D .npy file's first bytes."""
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(buffer)
    except (ValueError, SyntaxError) as exc:
        raise DataError(f"{where} is not a token store file ({exc})") from None
    if len(shape) != 1 or fortran:
        raise DataError(f"{where} is not a 1-D array")
    return dtype, shape[0], buffer.tell()


def _check_tokens(files: Files, entry: dict[str, Any], dtype: np.dtype, total: int) -> int:
    """Check the ids file against its manifest entry and the lengths; the offset its data starts at."""
    name = entry["files"]["tokens"]["name"]
    where = f"{files.where}/{name}"
    size = files.size(name)
    if size is None:
        raise DataError(f"{where} is missing: the token store is incomplete; prepare the run again")
    with files.open(name) as handle:
        head = handle.read_at(min(size, 4096), 0)
    found, count, start = _parse_header(bytes(head), where)  # bytes, or a pyarrow Buffer
    if found.newbyteorder("<") != dtype.newbyteorder("<") or count != total:
        raise DataError(f"{where} holds {count} {found} ids where the lengths say {total} {dtype}")
    expected = start + total * dtype.itemsize
    if size != expected or size != entry["files"]["tokens"]["bytes"]:
        raise DataError(f"{where} is {size} bytes where the token store's manifest says {entry['files']['tokens']['bytes']}: "
                        "it is truncated or was replaced; prepare the run again")
    return start


def _load_array(files: Files, entry: dict[str, Any], part: str, dtype: np.dtype) -> np.ndarray:
    name = entry["files"][part]["name"]
    where = f"{files.where}/{name}"
    size = files.size(name)
    if size is None:
        raise DataError(f"{where} is missing: the token store is incomplete; prepare the run again")
    if size != entry["files"][part]["bytes"]:
        raise DataError(f"{where} is {size} bytes where the token store's manifest says {entry['files'][part]['bytes']}: "
                        "it is truncated or was replaced; prepare the run again")
    data = files.read(name)
    found, count, start = _parse_header(data, where)
    if found.newbyteorder("<") != dtype.newbyteorder("<") or count != entry["examples"]:
        raise DataError(f"{where} holds {count} {found} values where the manifest says {entry['examples']} {dtype}")
    return np.frombuffer(data, dtype=found, count=count, offset=start)


def open_split(files: Files, store: dict[str, Any] | None, split: str, vocabulary: Sequence[str]) -> TokenStore:
    """The split's :class:`TokenStore`, checked against the manifest and the run's ``vocabulary``.

    Raises:
        DataError: no store, a file missing or cut short, or ids from another vocabulary.
    """
    if store is None or store.get("format") != FORMAT:
        raise DataError(f"{files.where} holds no token store ({FORMAT!r}); prepare the run again")
    if store["vocabulary_sha256"] != vocabulary_digest(vocabulary):
        raise DataError(f"the token store in {files.where} was tokenized with another vocabulary than the run's "
                        "vocab.txt; prepare the run again")
    if split not in store["splits"]:
        raise DataError(f"the token store in {files.where} has no {split} split")
    return TokenStore(files, store["splits"][split], store, split)
