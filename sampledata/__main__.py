"""``python -m sampledata [--config FILE] [--key value ...]``: write the sample dataset."""
from __future__ import annotations

import sys

from common.config import ConfigError, load_config, split_config_arg
from sampledata.generate import SampleConfig, generate


def main(argv: list[str]) -> int:
    path, overrides = split_config_arg(argv)
    try:
        cfg = load_config(SampleConfig, path, overrides)
    except ConfigError as exc:
        print(f"sampledata: {exc}", file=sys.stderr)
        return 2
    generate(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
