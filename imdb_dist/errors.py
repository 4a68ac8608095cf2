"""Exception types that decide how the CLI exits, and the one-line reason of a failed write.

``InputError`` (and subclasses) is the user's to fix: the CLI prints one
``error: ...`` line and exits 2.  ``RunError`` is a run that failed for a
known reason (a diverged loss): one line, exit 1.  Anything else is a bug
and exits 1 with its traceback.
"""

import argparse
import re
from typing import NoReturn

EXIT_BAD_INPUT = 2

# TensorFlow prefixes op errors with the graph function's name and suffixes the op.
_TF_NOISE = re.compile(r"^\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\]$")


def write_failure(exc: BaseException) -> str:
    """The first line of why a write failed, from an ``OSError`` or a TensorFlow ``OpError``."""
    reason = getattr(exc, "message", None) or getattr(exc, "strerror", None) or str(exc)
    return _TF_NOISE.sub("", reason.splitlines()[0].strip()) if reason else type(exc).__name__


class InputError(Exception):
    """Bad input: config, data, paths or model directories."""


class ConfigError(InputError):
    """A config key is unknown, mistyped or holds an impossible value."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key {key}: {message}" if key else message)
        self.key, self.message = key, message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Rebuilt from (key, message), not from the formatted line: a Ray
        # worker's ConfigError is pickled to the driver (imdb_dist.launch).
        return type(self), (self.key, self.message)


class DataError(InputError):
    """The data source is missing, unreadable or not in the expected layout."""


class RunError(Exception):
    """The run stopped for a known reason that retrying will not fix."""


class ArgumentParser(argparse.ArgumentParser):
    """An argument parser whose refusal is one ``error: ...`` line and exit 2, like every other bad input.

    ``--help`` still shows the usage; the error line points at it.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")
