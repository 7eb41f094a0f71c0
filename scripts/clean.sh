#!/usr/bin/env bash
# make clean: remove what make demo, the tests and the benchmarks wrote; keep what took hours.
#
# data/shards is also the default --out of `make shards SRC=<imagenet>` (~31 GB, hours of
# sharding), and runs/ holds make train's checkpoints (runs/alexnet: days of GPU time): those are
# kept, and said. The sample's shards (its wnids are n9..., never ImageNet's) and the demo's run
# (runs/demo) are removed.
set -euo pipefail
cd "$(dirname "$0")/.."

kept() { echo "make clean: kept $1 ($2): rm -rf $1 to delete it"; }

if [ -f data/shards/manifest.json ] && grep -q '"wnid": "n[0-8]' data/shards/manifest.json; then
    kept data/shards "the shards of a dataset other than the sample"
    find data -mindepth 1 -maxdepth 1 ! -name shards -exec rm -rf {} +
else
    rm -rf data
fi
rm -rf runs/demo bench/*.json bench/*.png
if [ -d runs ]; then
    for run in runs/*/; do
        [ -d "$run" ] && kept "${run%/}" "a training run: not the demo's"
    done
    rmdir runs 2>/dev/null || true
fi
