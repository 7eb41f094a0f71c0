"""``python -m shards --src DIR --out DIR [--config FILE] [--key value ...]``."""
from __future__ import annotations

import signal
import sys

from common.config import ConfigError, load_config, split_config_arg
from shards.build import TooManySkipped, build
from shards.config import ShardConfig
from shards.layouts import LayoutError


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM takes the same path as Ctrl-C: unfinished temp files are removed on the way out.
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    path, overrides = split_config_arg(argv)
    try:
        cfg = load_config(ShardConfig, path, overrides).validate()
    except ConfigError as exc:
        print(f"shards: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    try:
        build(cfg)
    except (LayoutError, TooManySkipped) as exc:
        print(f"shards: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("shards: interrupted; finished shards are kept, re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
