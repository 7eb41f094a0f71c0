#!/usr/bin/env bash
# make gpu-check [OUT=dir] [SECONDS=420] [PY=python3] [WHEELS=dir]: see bench/gpu_check.py.
#
# PY: the interpreter (default: the project's .venv, built by `make setup`).  On a bare GPU
# machine: PY=python3 (its CUDA PyTorch) and WHEELS=dir with DALI's CUDA wheel, its dependencies
# and webdataset: they are installed offline (--no-index) into a temporary folder that goes on
# PYTHONPATH, nothing else is touched.  The scikit-image wheel the sample photos come from is
# read from WHEELS too (never installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ -n "${WHEELS:-}" ]; then
  site=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-site.XXXXXX")
  mapfile -t wheels < <(find "$WHEELS" -maxdepth 1 -name '*.whl' ! -name 'scikit_image-*')
  echo "gpu-check: installing ${#wheels[@]} wheels from $WHEELS into $site (offline)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$site" "${wheels[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  export SAMPLEDATA_WHEELS=${SAMPLEDATA_WHEELS:-$WHEELS}
fi
exec "$PY" -m bench.gpu_check "$@"
