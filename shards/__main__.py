"""``python -m shards --src DIR --out DIR [--config FILE] [--key value ...]``."""
from __future__ import annotations

import signal
import sys

from common.config import ConfigError, load_config, split_config_arg
from common.config_help import print_help, settings_help, wants_help
from shards.build import Interrupted, OtherDataset, TooManySkipped, build
from shards.config import ShardConfig
from shards.layouts import LayoutError
from shards.outdir import OutDirError
from shards.report import NoTrainingImages
from shards.workers import WorkerError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM takes the same path as Ctrl-C: the workers are stopped, temp files removed, one line
    # printed.  A second signal (systemd repeats, a second Ctrl-C) must not cut that short: it
    # takes a few seconds at most.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


def _os_error(exc: OSError, cfg: ShardConfig) -> str:
    """An OSError of the parent in one line (it used to be a traceback), naming --out when the
    error does not name a file (ENOSPC from a write names none)."""
    return str(exc) if exc.filename else f"{exc} (writing to {cfg.out})"


def main(argv: list[str]) -> int:
    if wants_help(argv):
        text = settings_help(ShardConfig, "python -m shards", "Shards an ImageNet layout (--src) into checked, shuffled "
                             "WebDataset tars, DALI indexes, a manifest and the dataset statistics (--out).")
        return print_help(text)
    try:
        path, overrides = split_config_arg(argv)
        cfg = load_config(ShardConfig, path, overrides).validate()
    except ConfigError as exc:
        print(f"shards: {exc}", file=sys.stderr)
        return 2
    for sig in STOP_SIGNALS:
        signal.signal(sig, _terminate)
    try:
        build(cfg)
    except ConfigError as exc:  # a setting only the source tree can refuse (shards.layouts.ValLabelsError)
        print(f"shards: {exc}", file=sys.stderr)
        return 2
    except (LayoutError, TooManySkipped, OtherDataset, OutDirError, NoTrainingImages) as exc:
        print(f"shards: error: {exc}", file=sys.stderr)
        return 1
    except WorkerError as exc:
        print(f"shards: error: {exc}; finished shards are kept, re-run the same command to resume", file=sys.stderr)
        return 1
    except OSError as exc:  # this process's own writes (journal, statistics, manifest): a full disk, mostly
        print(f"shards: error: {_os_error(exc, cfg)}; finished shards are kept, re-run the same command to resume",
              file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"shards: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before build() could take over: nothing was started
        print("shards: interrupted before anything was written; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
