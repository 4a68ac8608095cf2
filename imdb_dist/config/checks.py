"""The checks every config section runs on its own values: finite ranges, and no credentials in a location."""

from __future__ import annotations

import math

from imdb_dist.errors import ConfigError


def no_credentials(key: str, location: str, environment: str | None = None) -> None:
    """Refuse a URI with credentials in it before it can be stored anywhere (:mod:`imdb_dist.storage`).

    ``environment``: where its client takes credentials from instead (default: the storage clients').
    """
    # Imported on first use: importing the config (every imdb-dist command
    # does) then does not load pyarrow with the storage module.
    from imdb_dist.storage import check_no_credentials

    if environment is None:
        check_no_credentials(location, key)
    else:
        check_no_credentials(location, key, environment)


def check_range(
    key: str,
    value: float,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Refuse ``value`` unless it is finite and within ``[low, high]`` (an open end excludes its bound).

    Raises:
        ConfigError: naming ``key``, the value and the range, in interval notation.
    """
    if not math.isfinite(value):
        raise ConfigError(key, f"{value!r} is not a finite number")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ConfigError(key, f"{value!r} is out of range {lo}{low}, {high}{hi}")
