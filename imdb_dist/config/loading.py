"""Building a :class:`Config` from defaults, a YAML file and ``--set`` overrides, and writing it back out.

Precedence is ``--set`` overrides > YAML file > dataclass defaults. Every
value is checked against its field's type here (the sections then check
their ranges), so a typo fails before any data is read, naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from imdb_dist.config.schema import Config
from imdb_dist.errors import ConfigError


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Build the config from defaults, an optional YAML file, and ``key=value`` overrides.

    Args:
        path: a YAML file whose nested mapping mirrors :class:`Config`.
        overrides: ``dotted.key=value`` strings; values are parsed as YAML
            scalars and then checked against the field's type.

    Raises:
        ConfigError: unreadable file, bad YAML, unknown key, wrong type or
            out-of-range value.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(raw, item)
    return _build(Config, raw, prefix="")


def with_values(config: Config, values: dict[str, Any]) -> Config:
    """``config`` with dotted keys set to ``values``, type- and range-checked like ``--set``."""
    raw = to_dict(config)
    for key, value in values.items():
        _set(raw, key, value)
    return _build(Config, raw, prefix="")


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a config from :func:`to_dict` output (e.g. after crossing a process boundary)."""
    return _build(Config, raw, prefix="")


def to_dict(config: Config) -> dict[str, Any]:
    """The config as plain YAML-ready data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def dump_yaml(config: Config) -> str:
    """The resolved config as YAML, in field order, loadable by :func:`load_config`."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def type_words(hint: Any) -> str:
    """A field's type as a reader of YAML sees it: ``int``, ``str or null``, ``list of str``, ``[int, int]``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return "any"
    if origin is Literal:
        return "one of " + ", ".join(f"`{flow(a)}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_words(a) for a in args)
    if origin is tuple:
        if Ellipsis in args:
            return f"list of {type_words(args[0])}"
        return "[" + ", ".join(type_words(a) for a in args) + "]"
    if origin is dict:
        return f"mapping of {type_words(args[0])} to {type_words(args[1])}"
    return hint.__name__


def flow(value: Any) -> str:
    """``value`` as YAML flow style writes it on one line: ``null``, ``true``, ``[]``, ``{CPU: 1.0}``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{flow(k)}: {flow(v)}" for k, v in value.items()) + "}"
    return str(value)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc}") from None
    try:
        # safe_load never constructs Python objects from tags like !!python/object.
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError("", f"invalid YAML in {path}{line}: {reason}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError("", f"override {item!r} is not of the form key.path=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not a YAML scalar: keep the string and let the type check judge.
    _set(raw, key, value)


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` in the nested mapping ``raw``; :func:`_build` then judges names, types and ranges."""
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip("."), f"must be a mapping, not {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)  # YAML keys may be ints or bools
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown key (known here: {known})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, prefix=f"{key}.")
        else:
            values[name] = _coerce(key, hint, value)
    return cls(**values)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against ``hint``; the only conversions are int/numeric str->float and list->tuple."""
    if hint is Any:
        return value  # tune.space values: imdb_dist.tune.check_space judges them against their own keys
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(key, inner[0], value)
        for option in inner:  # int | tuple[int, int]: the first that fits
            try:
                return _coerce(key, option, value)
            except ConfigError:
                pass
        kinds = " or ".join(type_words(option) for option in inner)
        raise ConfigError(key, f"expected {kinds}, got {type(value).__name__} {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(key, args[0], k): _coerce(f"{key}.{k}", args[1], v) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {value!r}")
        if Ellipsis not in args and len(value) != len(args):  # tuple[int, int]: exactly two
            raise ConfigError(key, f"expected a list of {len(args)}, got {len(value)}: {list(value)!r}")
        return tuple(_coerce(f"{key}[{i}]", args[0 if Ellipsis in args else i], v) for i, v in enumerate(value))
    # bool is an int subclass: never let `true` pass for a count, or 1 for a flag.
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads 1e-3 as a string; it is how learning rates are written.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, str):
        return value
    raise ConfigError(key, f"expected {hint.__name__}, got {type(value).__name__} {value!r}")
