"""The search space of ``tune.space``: checked before any trial starts, then handed to Ray Tune.

``space`` maps dotted config keys to one of ``{choice: [values]}``,
``{grid: [values]}`` (every value, ``tune.trials`` times each),
``{uniform: [low, high]}``, ``{loguniform: [low, high]}`` or
``{randint: [low, high]}`` (``high`` excluded). This module imports neither
TensorFlow nor Ray at its top, so ``imdb-dist tune`` refuses a bad space
before either loads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from imdb_dist.config import Config, TuneConfig, with_values
from imdb_dist.errors import ConfigError

SPACE_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
# Keys a search may not vary: where results go, and the search itself.
UNTUNABLE = ("run.output_dir", "ray.storage_path", "ray.name")


def check_space(config: Config) -> None:
    """Refuse a ``tune.space`` that is empty or names a key, kind or range no trial could train.

    Every value a trial could be given is checked against its key's type and
    range (a range by its ends), so a bad space fails before any trial starts.

    Raises:
        ConfigError: naming ``tune.space.<key>`` (and the kind) at fault.
    """
    space = config.tune.space
    if not space:
        raise ConfigError("tune.space", "is empty: name at least one config key to search over")
    base = dataclasses.replace(config, tune=TuneConfig())
    for key, spec in space.items():
        where = f"tune.space.{key}"
        if key.startswith("tune.") or key in UNTUNABLE:
            raise ConfigError(where, "cannot be searched over")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
            raise ConfigError(where, f"must be one of {', '.join(f'{{{k}: [...]}}' for k in SPACE_KINDS)}")
        ((kind, values),) = spec.items()
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{kind}", "must be a non-empty list")
        for value in values if kind in ("choice", "grid") else _range_ends(f"{where}.{kind}", kind, values):
            try:
                with_values(base, {key: value})
            except ConfigError as exc:
                raise ConfigError(where, f"{value!r} is not a valid value ({exc})") from None


def param_space(settings: TuneConfig) -> dict[str, Any]:
    """``settings.space`` as Ray Tune's ``param_space`` (its sampling functions)."""
    from ray import tune as ray_tune

    kinds = {
        "choice": ray_tune.choice,
        "grid": ray_tune.grid_search,
        "uniform": lambda values: ray_tune.uniform(*values),
        "loguniform": lambda values: ray_tune.loguniform(*values),
        "randint": lambda values: ray_tune.randint(*values),
    }
    space = {}
    for key, spec in settings.space.items():
        ((kind, values),) = spec.items()
        space[key] = kinds[kind](values)
    return space


def _range_ends(where: str, kind: str, values: list[Any]) -> list[Any]:
    """The two values a range's trials can come nearest to, after refusing a range no sampler can draw from."""
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(where, f"must be [low, high], not {values!r}")
    low, high = values
    if not low < high:
        raise ConfigError(where, f"impossible range: low {low!r} is not below high {high!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(where, f"impossible range: loguniform needs low > 0, not {low!r}")
    if kind == "randint" and not all(isinstance(v, int) for v in values):
        raise ConfigError(where, f"needs integer ends, not {values!r}")
    return [low, high - 1] if kind == "randint" else [float(low), float(high)]
