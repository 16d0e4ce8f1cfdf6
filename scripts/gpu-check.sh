#!/usr/bin/env bash
# `make gpu-check`: one command for the device machine (see scripts/gpu_check.py). It needs the
# built binary (target/release/clipmask, carried there) and a python3 with torch, numpy, Pillow
# and OpenCV; it makes its own model and images. Writes gpu-check.json and gpu-check.md under
# $OUT (default ./gpu-check-out).
#
#   scripts/gpu-check.sh             on a CUDA machine (about 5 minutes on one H200)
#   scripts/gpu-check.sh --dry-run   the same steps on the CPU with a tiny model (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${CLIPMASK_PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# The binary links libtorch from the python's torch (LIBTORCH_USE_PYTORCH builds).
TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$PY" scripts/gpu_check.py --out "${OUT:-gpu-check-out}" "$@"
