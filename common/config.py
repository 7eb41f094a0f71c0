"""Typed configuration: frozen dataclasses from a TOML file plus command-line overrides.

Every entry point declares one frozen dataclass (nested dataclasses become TOML tables and
dotted flags).  Values are resolved in this order: dataclass defaults, then the TOML file,
then ``--key value`` / ``--section.key=value`` flags.  Unknown keys and values of the wrong
type are rejected with a message that names the key and the source it came from (the values'
checks: ``common.config_values``).
"""
from __future__ import annotations

import codecs
import dataclasses
import difflib
import os
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar

from common.config_values import ConfigError, coerce, nonempty_path

T = TypeVar("T")


# Field metadata key: a setting that is an action for one start, not a standing part of a config
# (the service's ``fresh``, which deletes the run).  A config file is read again at every start,
# restarts included, so such a key is refused there; its value is why, said in the refusal.
COMMAND_LINE_ONLY = "command_line_only"


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


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
            changes[key] = coerce(value, tp, name, where, parse=not file)
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
            path = nonempty_path(given, "command line: --config", "")
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
