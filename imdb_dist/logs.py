"""Log setup shared by the CLI process and Ray Train worker processes."""

from __future__ import annotations

import logging
import os
import sys


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
