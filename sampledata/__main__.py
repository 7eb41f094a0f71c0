"""``python -m sampledata [--config FILE] [--key value ...]``: write the sample dataset."""
from __future__ import annotations

import sys

from common.config import ConfigError, load_config, split_config_arg
from common.config_help import print_help, settings_help, wants_help
from sampledata.generate import SampleConfig, generate


def main(argv: list[str]) -> int:
    if wants_help(argv):
        text = settings_help(SampleConfig, "python -m sampledata", "Writes the sample dataset: an ImageNet-layout tree "
                             "(with ImageNet's quirks) made from the embedded photos, for `make shards`.")
        return print_help(text)
    try:
        path, overrides = split_config_arg(argv)
        cfg = load_config(SampleConfig, path, overrides).validate()
    except ConfigError as exc:
        print(f"sampledata: {exc}", file=sys.stderr)
        return 2
    generate(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
