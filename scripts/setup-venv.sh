#!/usr/bin/env bash
# Creates the Python environment that provides libtorch (torch==2.11.0 from PyPI) and the
# test-only packages. The torch wheel with its CUDA libraries is several GB, so the environment
# lives in a shared cache keyed by the torch version, and `.venv` in the checkout is a symlink
# to it: a fresh clone reuses it instead of reinstalling. The test requirements are re-applied
# whenever tests/python/requirements.txt changes.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.11.0
REQ=tests/python/requirements.txt
CACHE="${CLIPMASK_CACHE:-$HOME/.cache/clipmask}"
PY="${PYTHON:-python3}"
pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
VENV="$CACHE/venv-torch-$TORCH_VERSION-py$pyver"

if [ ! -f "$VENV/.torch-complete" ]; then
  echo "setup-venv: creating $VENV (torch==$TORCH_VERSION, a few GB, once per machine)" >&2
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
  touch "$VENV/.torch-complete"
fi
req_sha=$(sha256sum "$REQ" | cut -c1-16)
if [ "$(cat "$VENV/.requirements-sha" 2>/dev/null)" != "$req_sha" ]; then
  echo "setup-venv: installing test requirements ($REQ)" >&2
  "$VENV/bin/python" -m pip install --quiet -r "$REQ" "torch==$TORCH_VERSION"
  echo "$req_sha" > "$VENV/.requirements-sha"
fi
if [ "$(readlink .venv 2>/dev/null)" != "$VENV" ]; then
  rm -rf .venv
  ln -s "$VENV" .venv
fi
