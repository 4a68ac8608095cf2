"""Log setup shared by the CLI process and Ray Train worker processes."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import IO, Any

# TensorFlow's native start-up lines: absl's pre-init notice, INFO/WARNING
# lines in absl's format (CUDA stubs on machines without a GPU, CPU feature
# and oneDNN notices), the CPU-feature notice's continuation, and the
# "failed call to cuInit" ERROR a CUDA build prints on a CPU-only machine.
_STARTUP_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} \S+\s+\d+ \S+\] .*"
    r"|E\d{4} \S+\s+\d+ \S+\] failed call to cuInit.*"
    r"|To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\.)$"
)
# What a start-up line says about the accelerators is never noise: on a GPU
# machine it is why TensorFlow found no GPU ("Cannot dlopen some GPU
# libraries ... Skipping registering GPU devices"), or which cuDNN and NCCL it loaded.
_ACCELERATOR = re.compile(r"gpu|cuda|cudnn|nccl", re.IGNORECASE)
# absl's line format: severity, date, time, thread, file:line, then the message.
_ABSL = re.compile(r"^([IWEF])\d{4} \S+\s+\d+ (\S+)\] (.*)$")
_SEVERITY = {"I": "info", "W": "warning", "E": "error", "F": "fatal"}


@dataclasses.dataclass(frozen=True)
class _Note:
    """One accelerator line TensorFlow wrote: absl's severity letter, its source file:line, the message."""

    severity: str
    where: str
    message: str

    def relay(self, level: int) -> None:
        log.log(level, "TensorFlow %s (%s): %s", _SEVERITY[self.severity], self.where, self.message)


# Every accelerator line TensorFlow wrote while it loaded in this process.
_accelerator_notes: list[_Note] = []

log = logging.getLogger(__name__)


def setup_logging() -> None:
    """One timestamped line per event on stderr; TensorFlow's chatter kept to warnings."""
    # TensorFlow's C++ start-up chatter (CPU features, CUDA probing) is noise in job logs.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # SavedModel export and collective ops narrate every step at INFO; matplotlib announces the
    # font cache it builds on a fresh HOME (the curves).
    for chatty in ("absl", "tensorflow", "matplotlib"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


@dataclasses.dataclass
class _Redirect:
    """fd 2's while :func:`native_startup_filtered` holds it: the real one, the file it writes to, how many are inside."""

    saved: int
    held: IO[bytes]
    inside: int


_redirect_lock = threading.Lock()
_redirect: _Redirect | None = None


@contextlib.contextmanager
def native_startup_filtered() -> Iterator[None]:
    """Drop TensorFlow's C++ start-up noise written to stderr inside the block; keep every other line.

    TensorFlow logs it through absl before ``TF_CPP_MIN_LOG_LEVEL`` can
    apply, so it can only be filtered at the file descriptor. Everything
    written to fd 2 inside the block is held in a temporary file and
    replayed, minus the noise, when the block ends (also on an exception).
    A start-up line that mentions a GPU, CUDA, cuDNN or NCCL is never
    dropped: it is kept for :func:`accelerator_notes` and logged as one of
    ours, ``TensorFlow error (file:line): message``, at DEBUG whatever
    TensorFlow's severity: a CUDA build on a machine without a GPU says
    "error" about cuInit on every start, which is no error of a run that
    asked for no GPU. The device check relays the lines at INFO where a GPU
    was asked for, and quotes them in the ``devices:`` line's reason
    (:func:`imdb_dist.devices.check_devices`).
    """
    global _redirect
    with _redirect_lock:
        # Threads may overlap here (in a Ray process, the first import of TensorFlow and of
        # tf_keras can run in two threads): the first to enter redirects fd 2, the last to
        # leave restores it, so no thread restores a descriptor another one put there.
        if _redirect is None:
            sys.stderr.flush()
            held = tempfile.TemporaryFile()  # noqa: SIM115 - closed by the last thread to leave
            _redirect = _Redirect(saved=os.dup(2), held=held, inside=0)
            os.dup2(held.fileno(), 2)
        _redirect.inside += 1
    try:
        yield
    finally:
        with _redirect_lock:
            _redirect.inside -= 1
            if _redirect.inside == 0:
                ending, _redirect = _redirect, None
                sys.stderr.flush()
                os.dup2(ending.saved, 2)
                os.close(ending.saved)
                with ending.held:
                    ending.held.seek(0)
                    _replay(ending.held.read().decode("utf-8", "replace"))


def _replay(written: str) -> None:
    """Write what was held back to stderr, minus the start-up noise; log the accelerator lines at DEBUG."""
    # Without a configured log (a script that never called
    # setup_logging) the accelerator lines are kept as TensorFlow wrote them.
    relay = bool(logging.getLogger().handlers)
    kept, relayed = [], []
    for line in written.splitlines(keepends=True):
        text = line.rstrip("\n")
        absl = _ABSL.match(text)
        # The source file counts: cuda_platform.cc's "failed call to cuInit".
        if absl and _ACCELERATOR.search(text):
            note = _Note(*absl.groups())
            _accelerator_notes.append(note)
            if relay:
                relayed.append(note)
            else:
                kept.append(line)
        elif not _STARTUP_NOISE.match(text):
            kept.append(line)
    if kept:
        os.write(2, "".join(kept).encode())
    for note in relayed:
        note.relay(logging.DEBUG)


def accelerator_notes() -> tuple[str, ...]:
    """What TensorFlow said about GPUs, CUDA, cuDNN and NCCL while it loaded in this process (messages only).

    Empty when it said nothing, or loaded outside :func:`import_tensorflow_quietly`.
    """
    return tuple(note.message for note in _accelerator_notes)


def relay_accelerator_notes(level: int = logging.INFO) -> None:
    """Log each line of :func:`accelerator_notes` as ours at ``level``: ``TensorFlow error (file:line): message``.

    For a job that asked for a GPU, where what TensorFlow said about CUDA is
    the story of the run's devices (it was logged at DEBUG as it came).
    """
    for note in _accelerator_notes:
        note.relay(level)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow and tf_keras and probe the devices, without their native start-up lines."""
    # tf.keras then resolves to tf_keras, which this project uses, instead of
    # TensorFlow importing Keras 3 (and matplotlib with it) at start-up: 1.5 s
    # of every run here. Ray workers get the same setting (launch.WORKER_ENV).
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    with native_startup_filtered():
        import tensorflow as tf
        import tf_keras  # noqa: F401 - its import loads TensorFlow's libraries a second time

        tf.config.list_physical_devices()


# The packages whose first import in a process prints TensorFlow's start-up lines
# (tf_keras and Keras 3 load TensorFlow's libraries a second time).
_NOISY_PACKAGES = frozenset({"tensorflow", "tf_keras", "keras"})


class _QuietLoader(importlib.abc.Loader):
    """Runs a package's own loader inside :func:`native_startup_filtered`."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> Any:
        # Whatever else asks the spec's loader during the import (get_filename, is_package, ...).
        return getattr(self.loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # From here on the package sees its own loader (resources, reloads): only the import
        # system's call goes through this one.
        module.__loader__ = module.__spec__.loader = self.loader
        # Relays the accelerator lines as ours (a no-op where the process's log is set up).
        setup_logging()
        with native_startup_filtered():
            self.loader.exec_module(module)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds TensorFlow's and Keras' packages as the other finders do, and loads them quietly."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _NOISY_PACKAGES:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if finder is not self and find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


def quiet_tensorflow_imports() -> None:
    """Ray's ``worker_process_setup_hook`` for our jobs: TensorFlow loads without its start-up lines.

    A Ray Train worker imports TensorFlow when it unpickles the training
    function, before any line of ours runs there, and the start-up lines it
    prints reach the job's log. Ray runs this hook in every worker process of the job before
    any task or actor code (``imdb_dist.ray_cluster.connect`` sets it); it
    imports nothing itself, so a process that never imports TensorFlow pays
    nothing, and one that does loads it inside :func:`native_startup_filtered`.
    """
    if not any(isinstance(finder, _QuietTensorFlowFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())
