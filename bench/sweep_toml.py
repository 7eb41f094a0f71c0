"""The sweep's recommendation as the lines to put in a config file (``OUT/recommended.toml``).

Issue 13 ends with "write the defaults into configs/paper.toml with the measurement behind
each": the recommendation is a list of the service's flags, and this turns it into TOML typed as
the service reads it (the service's own parser gives each value its type), with the measurement
as a comment, so what is copied is exactly what was measured.  Every key here is a speed setting
the service lets change between restarts, or the recipe's own value (batch 128, bf16 autocast).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.config import to_dict


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string, escaped as JSON escapes it


def as_toml(flags: list[str], shards: Path) -> str:
    """``--section.key value`` flags as TOML: keys without a section first, then one table each."""
    from service.app import parse  # torch and DALI: only when there is something to write

    values = to_dict(parse(["--shards", str(shards), *flags]))
    keys = list(dict.fromkeys(flag.removeprefix("--") for flag in flags[::2]))
    lines = [f"{key} = {toml_value(values[key])}" for key in keys if "." not in key]
    sections: dict[str, list[str]] = {}
    for key in (k for k in keys if "." in k):
        section, name = key.split(".", 1)
        sections.setdefault(section, []).append(name)
    for section, names in sections.items():
        lines += ["", f"[{section}]", *(f"{name} = {toml_value(values[section][name])}" for name in names)]
    return "\n".join(lines).lstrip("\n") + "\n"


def write_recommendation(out: Path, summary: dict, shards: Path) -> Path | None:
    """``OUT/recommended.toml``: the recommended configuration's keys, what it measured on top."""
    best = summary.get("recommended")
    if not best:
        return None
    ratio = best.get("ratio_to_model_alone")
    wait = best.get("data_wait_share")
    header = [f"# issue 13 sweep ({summary['mode']} mode, started {summary['started']}): the fastest end to end,",
              f"# {best['name']}",
              f"# {best['images_per_s']:.0f} images/s" + (f", data wait {wait:.1%}" if wait is not None else "")
              + (f", {ratio:.2f}x the same step alone" if ratio else "") + ".",
              "# Merge into configs/paper.toml (each key into its table there)."]
    path = out / "recommended.toml"
    path.write_text("\n".join(header) + "\n" + as_toml(best["flags"], shards))
    return path
