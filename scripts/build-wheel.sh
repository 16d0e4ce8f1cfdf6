#!/usr/bin/env bash
# Builds the Python wheel (dist/clipmask-<version>-cp39-abi3-linux_x86_64.whl) with maturin,
# against the project's torch 2.11 (.venv, see setup-venv.sh). Prints the build time and size.
set -euo pipefail
cd "$(dirname "$0")/.."
export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1
export PYO3_PYTHON="$PWD/.venv/bin/python"
start=$(date +%s)
rm -rf dist
# maturin builds crates/clipmask-py (pyproject.toml) in the workspace's target/ with cargo's
# release profile, so the library compiled for the binary is reused.
maturin build --release --interpreter "$PYO3_PYTHON" --out dist 2>&1 | grep -v '^\s*Compiling ' || true
whl=$(ls dist/clipmask-*.whl 2>/dev/null | head -1)
[ -n "$whl" ] || { echo "build-wheel: no wheel was built" >&2; exit 1; }
echo "build-wheel: $whl ($(du -h "$whl" | cut -f1), $(( $(date +%s) - start )) s)"
