#!/usr/bin/env bash
# Create .venv with every pinned dependency; idempotent (a second run does nothing).
#
# Pillow-SIMD is built from source (AVX2 flags only where the CPU has AVX2) and the
# packages that depend on "pillow" are installed without their dependencies, so
# nothing can pull Pillow back over Pillow-SIMD.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY=${PYTHON:-python3}
PILLOW_SIMD=12.1.1.post0
MATPLOTLIB=3.11.2
SKIMAGE=0.26.0
# Pillow-SIMD's build requirements (its pyproject.toml), installed into .venv first so the one
# build (without isolation: no per-build download of them) finds them.
BUILD_REQUIREMENTS=("setuptools==84.2.1" "pybind11==3.1.0")
STAMP="$VENV/.setup-done"
HASH=$(cat requirements.txt scripts/setup.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  echo "setup: .venv is up to date (delete $STAMP to force a reinstall)"
  exit 0
fi

need_apt=()
[ -f /usr/include/jpeglib.h ] || need_apt+=(libjpeg-dev)
[ -f /usr/include/zlib.h ] || need_apt+=(zlib1g-dev)
[ -f /usr/include/png.h ] || need_apt+=(libpng-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing build headers for Pillow-SIMD: ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    echo "setup: Pillow-SIMD needs the headers of ${need_apt[*]}; install them (apt-get install ${need_apt[*]}) and re-run" >&2
    exit 1
  fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# -qq: errors only (pip's -q still prints warnings, e.g. about index folders a machine's pip
# configuration names but does not have).
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

echo "setup: installing pinned requirements"
# DALI was pinned to its CUDA 12 build before: both builds install nvidia/dali, so the old one goes first.
"${PIP[@]}" uninstall -qq -y nvidia-dali-cuda120 2>/dev/null || true
"${PIP[@]}" install -qq -r requirements.txt

if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('Pillow-SIMD') != '$PILLOW_SIMD')" 2>/dev/null; then
  cflags=""
  grep -qw avx2 /proc/cpuinfo && cflags="-mavx2"
  echo "setup: building Pillow-SIMD $PILLOW_SIMD from source (CC='cc $cflags', about a minute)"
  "${PIP[@]}" uninstall -qq -y pillow pillow-simd 2>/dev/null || true
  "${PIP[@]}" install -qq "${BUILD_REQUIREMENTS[@]}"
  CC="cc $cflags" "${PIP[@]}" install -qq --no-binary :all: --no-build-isolation --no-deps "pillow-simd==$PILLOW_SIMD"
fi

# Depend on "pillow": installed without dependencies (their other needs are pinned above).
"${PIP[@]}" install -qq --no-deps "matplotlib==$MATPLOTLIB"
# scikit-image is never imported: its wheel is kept only for the real photographs it ships,
# which `make sample-data` reads straight out of the zip.
mkdir -p "$VENV/photo-wheels"
ls "$VENV"/photo-wheels/scikit_image-$SKIMAGE-*.whl >/dev/null 2>&1 \
  || "${PIP[@]}" download -qq --no-deps --only-binary=:all: -d "$VENV/photo-wheels" "scikit-image==$SKIMAGE"

"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
import PIL
assert m.version("Pillow-SIMD"), "Pillow-SIMD missing"
try:
    m.version("Pillow")
    raise SystemExit("setup: Pillow was installed over Pillow-SIMD; remove it and re-run")
except m.PackageNotFoundError:
    pass
print(f"setup: PIL {PIL.__version__} (Pillow-SIMD) ok")
PY
echo "$HASH" > "$STAMP"
echo "setup: done"
