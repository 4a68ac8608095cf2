"""Log setup shared by the CLI process and Ray Train worker processes."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator

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


def setup_logging() -> None:
    """One timestamped line per event on stderr; TensorFlow's chatter kept to warnings."""
    # TensorFlow's C++ start-up chatter (CPU features, CUDA probing) is noise in job logs.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # SavedModel export and collective ops narrate every step at INFO.
    for chatty in ("absl", "tensorflow"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


@contextlib.contextmanager
def native_startup_filtered() -> Iterator[None]:
    """Drop TensorFlow's C++ start-up lines written to stderr inside the block; keep every other line.

    TensorFlow logs them through absl before ``TF_CPP_MIN_LOG_LEVEL`` can
    apply, so they can only be filtered at the file descriptor. Everything
    written to fd 2 inside the block is held in a temporary file and
    replayed, minus those lines, when the block ends (also on an exception).
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [
                line
                for line in held.read().decode("utf-8", "replace").splitlines(keepends=True)
                if not _STARTUP_NOISE.match(line.rstrip("\n"))
            ]
            if kept:
                os.write(2, "".join(kept).encode())


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
