"""``--help`` for the entry points that read a config dataclass (``common.config``).

The settings are documented where they are declared: a comment on a field's line or on the lines
just above it.  ``--help`` prints those comments next to each key, its type and its default, so
the help can never disagree with the code it describes (a hand-written usage text would drift
as settings are added).  Comments are read with ``tokenize`` from the class's source, so a ``#``
inside a string default is not mistaken for one.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any

from common.config import field_types
from common.streams import READER_GONE, silence

HELP_FLAGS = ("-h", "--help")
WIDTH = 100


def wants_help(argv: list[str]) -> bool:
    """``-h``/``--help`` anywhere among the flags (not as the value of another flag)."""
    values = {i + 1 for i, arg in enumerate(argv) if arg.startswith("--") and "=" not in arg and arg not in HELP_FLAGS}
    return any(arg in HELP_FLAGS and i not in values for i, arg in enumerate(argv))


def field_notes(cls: type) -> dict[str, str]:
    """Each field's comments in ``cls``'s source: the comment lines right above it, then the one
    on its own line(s), joined into one text."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    source = textwrap.dedent("".join(lines))
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    code_lines = source.splitlines()
    notes = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line in comments and code_lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        notes[node.target.id] = " ".join(above + own)
    return notes


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return "A,B,..."
    if origin is not None:  # a union: X | None
        return "|".join(_type_name(a) for a in typing.get_args(tp))
    return {bool: "true|false", Path: "PATH", type(None): "none"}.get(tp, getattr(tp, "__name__", str(tp)).upper())


def _default(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or '""'
    return '""' if value == "" else str(value)


def _lines(cls: type, instance: Any, prefix: str) -> list[str]:
    """The help lines of ``cls``'s keys, nested dataclasses as their own sections after the plain keys."""
    notes, out, sections = field_notes(cls), [], []
    for name, tp in field_types(cls).items():
        value = getattr(instance, name)
        if dataclasses.is_dataclass(tp):
            doc = (inspect.getdoc(tp) or "").split("\n\n")[0].replace("\n", " ")
            sections += ["", f"[{prefix}{name}]  {doc}".rstrip(), *_lines(tp, value, f"{prefix}{name}.")]
            continue
        out.append(f"  --{prefix}{name} {_type_name(tp)}  (default {_default(value)})")
        if notes.get(name):
            out += textwrap.wrap(notes[name], WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return out + sections


def settings_help(cls: type, prog: str, summary: str) -> str:
    """The ``--help`` text of an entry point whose settings are the dataclass ``cls``."""
    how = ("Every key below is a TOML key (sections as tables) and a flag; the flags win over the file, "
           "the file over the defaults. Lists are comma-separated on the command line.")
    head = [f"usage: {prog} [--config FILE.toml] [--key value | --key=value ...]", "",
            textwrap.fill(summary, WIDTH), "", textwrap.fill(how, WIDTH)]
    return "\n".join(head + ["", "Settings:"] + _lines(cls, cls(), "")) + "\n"


def print_help(text: str) -> int:
    """Print ``text`` (a command's ``--help``); its exit code: 0, or 141 when the reader went away
    (``--help | head``: a BrokenPipeError traceback at print or at exit's flush, exit 1)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        silence(sys.stdout.fileno())
        return READER_GONE
    return 0
