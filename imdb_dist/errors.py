"""Exception types that decide how the CLI exits.

``InputError`` (and subclasses) is the user's to fix: the CLI prints one
``error: ...`` line and exits 2.  ``RunError`` is a run that failed for a
known reason (a diverged loss): one line, exit 1.  Anything else is a bug
and exits 1 with its traceback.
"""


class InputError(Exception):
    """Bad input: config, data, paths or model directories."""


class ConfigError(InputError):
    """A config key is unknown, mistyped or holds an impossible value."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key {key}: {message}" if key else message)
        self.key = key


class DataError(InputError):
    """The data source is missing, unreadable or not in the expected layout."""


class RunError(Exception):
    """The run stopped for a known reason that retrying will not fix."""
