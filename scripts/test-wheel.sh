#!/usr/bin/env bash
# Installs the wheel into a fresh virtual environment (with torch 2.11 and the test packages from
# PyPI, through uv's cache) and runs the pytest suite tests/wheel against the installed package,
# from outside the source tree so that `import clipmask` can only find the installed one.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
whl=$(ls dist/clipmask-*.whl 2>/dev/null | head -1)
[ -n "$whl" ] || { echo "test-wheel: no wheel in dist/ (make wheel)" >&2; exit 1; }
uv="$root/.venv/bin/uv"
env_dir=$(mktemp -d /tmp/clipmask-wheel-venv.XXXXXX)
trap 'rm -rf "$env_dir"' EXIT
"$uv" venv --quiet --python "$root/.venv/bin/python" "$env_dir"
# The wheel brings torch==2.11.* and numpy; pydensecrf2 is the reference for clipmask.densecrf.
"$uv" pip install --quiet --python "$env_dir/bin/python" "$whl" \
    pytest==8.4.2 pillow==11.3.0 pydensecrf2==1.1 matplotlib==3.11.2
export CLIPMASK_SOURCE="$root" CLIPMASK_BIN="$root/target/release/clipmask"
export CLIPMASK_TEST_MODEL="$root/target/test-fixtures/tiny-seed0-ls10/model.safetensors"
export CLIPMASK_VOC_SAMPLE="${CLIPMASK_VOC_SAMPLE:-$root/../shared/data/voc-sample}"
# No LD_LIBRARY_PATH: the extension must find libtorch by itself.
unset LD_LIBRARY_PATH VIRTUAL_ENV
cd "$env_dir"
PATH="$env_dir/bin:$PATH" "$env_dir/bin/python" -m pytest -q -p no:cacheprovider "$root/tests/wheel" "$@"
