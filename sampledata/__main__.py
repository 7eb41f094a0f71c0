"""``python -m sampledata [--config FILE] [--key value ...]``: write the sample dataset.

Exit codes: 0 written (or already there); 2 a setting refused, or --out holds another dataset;
1 --out cannot be written or the photos' wheel is missing (one line each, no traceback)."""
from __future__ import annotations

import sys

from common.config import ConfigError, load_config, split_config_arg
from common.config_help import print_help, settings_help, wants_help
from sampledata.generate import SampleConfig, generate


def _os_problem(out, exc: OSError) -> str:
    """One line for an ``OSError`` of writing: the path under ``out`` and why, or (no errno)
    the photos' own sentence (no wheel, a damaged one), which says what to run."""
    if exc.strerror is None:
        return str(exc)
    where = f"{exc.filename}: " if exc.filename else ""
    if str(exc.filename or "").startswith(str(out)):
        return f"cannot write {out} ({where}{exc.strerror})"
    return f"{where}{exc.strerror}"


def main(argv: list[str]) -> int:
    if wants_help(argv):
        text = settings_help(SampleConfig, "python -m sampledata", "Writes the sample dataset: an ImageNet-layout tree "
                             "(with ImageNet's quirks) made from the embedded photos, for `make shards`.")
        return print_help(text)
    try:
        path, overrides = split_config_arg(argv)
        cfg = load_config(SampleConfig, path, overrides).validate()
        generate(cfg)
    except ConfigError as exc:
        print(f"sampledata: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sampledata: {_os_problem(cfg.out, exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
