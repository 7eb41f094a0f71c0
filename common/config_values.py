"""A setting's value checked against its field's type: a flag's string parsed, a file's value as typed.

Flags are strings, parsed into each key's type; a file's values are typed by TOML and taken as
they are (``batch_size = "24"`` is a string, refused: a number is written without quotes).  A
value that cannot be accepted is a ``ConfigError`` naming the key and where it came from.
``common.config`` reads the files and flags; these are its checks, and the ``argparse`` types
of the entry points that take plain flags.
"""
from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration key or value that cannot be accepted."""


def _coerce_union(value: Any, tp: Any, key: str, where: str, parse: bool) -> Any:
    """``value`` as the first member of the union ``tp`` that accepts it (``None``, or the string
    "none", where the union allows None: TOML has no null); the first member's complaint when none does."""
    options = typing.get_args(tp)
    if value is None or (isinstance(value, str) and value.lower() == "none" and type(None) in options):
        if type(None) in options:
            return None
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return coerce(value, option, key, where, parse)
        except ConfigError as exc:
            errors.append(str(exc))
    raise ConfigError(errors[0] if errors else f"{where}: {key} cannot be None")


def _quoted(value: str, expected: str, toml: str, key: str, where: str) -> ConfigError:
    """A file's string where another type belongs: TOML values carry their type, and parsing
    the string as the command line's would take ``batch_size = "24"`` or ``seed = " 7 "``."""
    return ConfigError(f"{where}: {key} must be {expected} ({toml}), got the string {value!r}")


def _number(value: Any, tp: type, key: str, where: str, parse: bool) -> int | float:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    if isinstance(value, str):
        if not parse:
            raise _quoted(value, tp.__name__, "a TOML number, without quotes", key, where)
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{where}: {key} must be {tp.__name__}, got {value!r}") from None
    if tp is int and isinstance(value, int):
        return value
    if tp is float and isinstance(value, (int, float)):
        return float(value)
    raise ConfigError(f"{where}: {key} must be {tp.__name__}, got {value!r}")


def coerce(value: Any, tp: Any, key: str, where: str, parse: bool = True) -> Any:
    """Check ``value`` against ``tp``; ``parse``: ``value`` may be a string to parse (the command
    line's, where every value is one), else a file's, already typed by TOML."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, key, where, parse)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, str) and parse:  # from the command line: "4" is the member 4 of Literal[3, 4]
            value = next((a for a in allowed if not isinstance(a, str) and str(a) == value), value)
        if value not in allowed:
            raise ConfigError(f"{where}: {key} must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str) and not parse:
            raise _quoted(value, "a list", 'a TOML array: ["a", "b"]', key, where)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else str
        return tuple(coerce(v.strip() if isinstance(v, str) else v, item_tp, key, where, parse) for v in items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and not parse:
            raise _quoted(value, "true or false", "a TOML boolean, without quotes", key, where)
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    if tp in (int, float):
        return _number(value, tp, key, where, parse)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: {key} must be a path, got {value!r}")
        return nonempty_path(value, f"{where}: {key}")
    raise ConfigError(f"{where}: {key} has unsupported type {tp!r}")


def nonempty_path(value: str | Path, what: str, hint: str = " (use . for the working directory)") -> Path:
    """``value`` as a path, refusing an empty one: ``Path("")`` is ``.``, so an empty ``--out``
    would put a run's files in (and ``--fresh true`` delete them from) the working directory."""
    if isinstance(value, str) and not value.strip():
        raise ConfigError(f"{what} is empty: give a path{hint}")
    return Path(value)


def path_arg(value: str) -> Path:
    """An ``argparse`` ``type=`` for paths: an empty one is refused, as in settings (``nonempty_path``)."""
    try:
        return nonempty_path(value, "path")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def file_in_the_way(folder: Path) -> Path | None:
    """The first of ``folder`` and its parents that exists as a file, not a directory, or None:
    mkdir under it says only "File exists" or "Not a directory", which reads as if the path asked
    for were in the way, and a permission hint would be wrong."""
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


def at_least_one(meaning: str = "") -> Callable[[str], int]:
    """An ``argparse`` ``type=`` for a whole number of at least 1; ``meaning`` (e.g. "the number of
    classes to show per image") goes into the refusal of a smaller one."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {value!r}") from None
        if number < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1{f' ({meaning})' if meaning else ''}, got {value}")
        return number
    return parse
