"""Typed configuration: frozen dataclasses from a TOML file plus command-line overrides.

Every entry point declares one frozen dataclass (nested dataclasses become TOML tables and
dotted flags).  Values are resolved in this order: dataclass defaults, then the TOML file,
then ``--key value`` / ``--section.key=value`` flags.  Unknown keys and values of the wrong
type are rejected with a message that names the key and the source it came from.  Flags are
strings, parsed into each key's type; a file's values are typed by TOML and taken as they are
(``batch_size = "24"`` is a string, refused: a number is written without quotes).
"""
from __future__ import annotations

import argparse
import codecs
import dataclasses
import difflib
import os
import tomllib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key or value that cannot be accepted."""


# Field metadata key: a setting that is an action for one start, not a standing part of a config
# (the service's ``fresh``, which deletes the run).  A config file is read again at every start,
# restarts included, so such a key is refused there; its value is why, said in the refusal.
COMMAND_LINE_ONLY = "command_line_only"


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


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
            return _coerce(value, option, key, where, parse)
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


def _coerce(value: Any, tp: Any, key: str, where: str, parse: bool = True) -> Any:
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
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, item_tp, key, where, parse) for v in items)
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
        return _path(value, f"{where}: {key}")
    raise ConfigError(f"{where}: {key} has unsupported type {tp!r}")


def _path(value: str | Path, what: str, hint: str = " (use . for the working directory)") -> Path:
    """``value`` as a path, refusing an empty one: ``Path("")`` is ``.``, so an empty ``--out``
    would put a run's files in (and ``--fresh true`` delete them from) the working directory."""
    if isinstance(value, str) and not value.strip():
        raise ConfigError(f"{what} is empty: give a path{hint}")
    return Path(value)


def path_arg(value: str) -> Path:
    """An ``argparse`` ``type=`` for paths: an empty one is refused, as in settings (``_path``)."""
    try:
        return _path(value, "path")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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


def _merge(cls: type[T], base: T, table: dict[str, Any], where: str, prefix: str = "", file: bool = False) -> T:
    """Return ``base`` with the keys of ``table`` applied, recursing into nested dataclasses.
    ``file``: the table is a config file's, where ``COMMAND_LINE_ONLY`` keys are refused."""
    fields = field_types(cls)
    actions = {f.name: f.metadata.get(COMMAND_LINE_ONLY) for f in dataclasses.fields(cls)} if file else {}
    changes: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {name!r}{_meant(name, cls, prefix)}; "
                              f"valid keys: {', '.join(prefix + k for k in fields)}")
        if actions.get(key):
            raise ConfigError(f"{where}: {name} is a command-line-only setting ({actions[key]}): remove it from the file "
                              f"and give --{name} on the command line of the one start that needs it")
        tp = fields[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {name} must be a table")
            changes[key] = _merge(tp, getattr(base, key), value, where, f"{name}.", file)
        elif isinstance(value, dict):  # --steps.max 4, or a [steps] table: keys under a setting
            raise ConfigError(f"{where}: {name} is a setting, not a section: it takes a value, not the keys "
                              f"{', '.join(value)}")
        else:
            changes[key] = _coerce(value, tp, name, where, parse=not file)
    return dataclasses.replace(base, **changes)


def _keys_under(cls: type, prefix: str) -> list[str]:
    """Every key of ``cls`` dotted from ``prefix``: its sections and, below them, their keys."""
    keys = []
    for name, tp in field_types(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            keys += _keys_under(tp, f"{prefix}{name}.")
    return keys


def _meant(name: str, cls: type, prefix: str) -> str:
    """" (did you mean K?)" for the key of ``cls`` closest to the unknown ``name`` (sections' keys
    included: ``batch_size`` given without its section is ``loader.batch_size``), else ""."""
    keys = _keys_under(cls, prefix)
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    # 0.8: a typo (epoch, batchsize, layuot), not a likeness (shard_samples is no misspelt shards)
    close = difflib.get_close_matches(name, keys, n=1, cutoff=0.8)
    if not close and (near := difflib.get_close_matches(name.rsplit(".", 1)[-1], leaves, n=1, cutoff=0.8)):
        close = [keys[leaves.index(near[0])]]
    if close and close[0] == name:  # a file's "optim.lr" = 0.1: one key with a dot in its name
        return f" (a quoted key names no section: write {name} without the quotes)"
    return f" (did you mean {close[0]}?)" if close else ""


def _overrides_to_table(args: list[str]) -> dict[str, Any]:
    """Turn ``--a.b value`` / ``--a.b=value`` into a nested dict of strings."""
    table: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"command line: expected --key value, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):  # --out $RUN --steps 3, $RUN empty
                after = f" (the next argument is the flag {args[i + 1]}: an empty variable?)" if i + 1 < len(args) else ""
                raise ConfigError(f"command line: {arg} needs a value{after}")
            key, value = arg[2:], args[i + 1]
            i += 2
        parts = key.replace("-", "_").split(".")
        if "" in parts:
            raise ConfigError(f"command line: --{key} is not a key (an empty name beside a dot): write --key value "
                              "or --section.key value")
        node = table
        for n, part in enumerate(parts[:-1], 1):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # --steps 3 --steps.max 4: a value where a section would be
                setting = ".".join(parts[:n])
                raise ConfigError(f"command line: --{key} after --{setting} {node}: {setting} cannot take both a "
                                  "value and keys")
        node[parts[-1]] = value
    return table


def _read_toml(path: Path) -> dict[str, Any]:
    """The table of a TOML file; ``ConfigError`` naming the file when it cannot be read, is not
    UTF-8 (TOML's only encoding) or is not TOML: a setting's problem, not a traceback."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror or exc}): make it readable for uid "
                          f"{os.getuid()}, or pass another --config") from None
    # "UTF-8 with BOM" (Windows editors): a mark, not a statement.  Skipped, not cut off, so a bad
    # byte's offset is the file's own (a hex editor's), not 3 short.
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return tomllib.loads(data[bom:].decode("utf-8"))
    except UnicodeDecodeError as exc:
        at = bom + exc.start
        raise ConfigError(f"{path}: not UTF-8 text (byte {at}: {data[at:at + 1]!r}); "
                          "TOML files are UTF-8: save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(cls: type[T], toml_path: Path | str | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from its defaults, an optional TOML file and ``--key value`` overrides."""
    config = cls()
    if toml_path is not None:
        path = Path(toml_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (or is not a file): "
                              "pass an existing one with --config")
        config = _merge(cls, config, _read_toml(path), str(path), file=True)
    if overrides:
        config = _merge(cls, config, _overrides_to_table(overrides), "command line")
    return config


def split_config_arg(argv: list[str]) -> tuple[Path | None, list[str]]:
    """Pull ``--config FILE`` out of ``argv``; the rest are overrides.  One file: a second one
    would replace the first whole (``make demo TRAIN_ARGS="--config mine.toml"`` dropped every
    setting of configs/demo.toml), unlike a repeated ``--key``, where the later value wins."""
    rest, path = [], None
    i = 0
    while i < len(argv):
        given = None
        if argv[i] == "--config" and i + 1 < len(argv) and not argv[i + 1].startswith("--"):  # else: needs a value
            given, i = argv[i + 1], i + 2
        elif argv[i].startswith("--config="):
            given, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
        if given is not None:
            if path is not None:
                raise ConfigError(f"command line: --config given twice ({path}, then {given}): one file is read; "
                                  "put the settings in one file, or give the others as --section.key value")
            path = _path(given, "command line: --config", "")
    return path, rest


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config (paths as strings), for manifests and logs."""
    def convert(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v
    return convert(dataclasses.asdict(config))
