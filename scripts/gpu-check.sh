#!/usr/bin/env bash
# `make gpu-check`: one command for the device machine (see scripts/gpu_check.py). It needs the
# built binary (target/release/clipmask, carried there) and a python3 with torch, numpy, Pillow,
# OpenCV and safetensors; it makes its own model and images in a scratch directory. Writes
# gpu-check.json and gpu-check.md under $OUT (default ./gpu-check-out), and nothing else there,
# even when steps fail (each failure is an entry of the report's "errors").
#
#   scripts/gpu-check.sh             on a CUDA machine (about 3 minutes on one H200, at most ~6)
#   scripts/gpu-check.sh --dry-run   the same steps on the CPU with a tiny model (CI, about 2 minutes)
#
# Exit status: 0 when every step ran and every check passed, 1 otherwise, 2 when the python
# script could not run at all (a minimal report says why).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-gpu-check-out}
mkdir -p "$OUT_DIR"
PY=${CLIPMASK_PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

# A report even when python or torch is missing, or the script dies without writing one.
fallback_report() {
    local why=$1
    printf '{"finished": false, "errors": [{"step": "gpu-check.sh", "error": "%s"}], "checks": {}}\n' \
        "$(printf '%s' "$why" | tr -d '"\\' | tr '\n' ' ')" >"$OUT_DIR/gpu-check.json"
    printf '## gpu-check FAILED before any step\n\n%s\n' "$why" >"$OUT_DIR/gpu-check.md"
    echo "gpu-check: $why" >&2
}

# The binary links libtorch from the python's torch (LIBTORCH_USE_PYTORCH builds).
if ! TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>&1); then
    fallback_report "$PY cannot import torch: $(echo "$TORCH_LIB" | tail -3)"
    exit 2
fi
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

rm -f "$OUT_DIR/gpu-check.json" "$OUT_DIR/gpu-check.md"
"$PY" scripts/gpu_check.py --out "$OUT_DIR" "$@"
rc=$?
if [ ! -s "$OUT_DIR/gpu-check.json" ]; then
    fallback_report "scripts/gpu_check.py exited $rc without writing a report"
    exit 2
fi
if [ "$rc" -gt 1 ]; then
    # Died (a signal, a crash inside torch): the report has every step done before; say so.
    "$PY" - "$OUT_DIR" "$rc" <<'EOF' || true
import json, os, sys
out, rc = sys.argv[1], sys.argv[2]
p = os.path.join(out, "gpu-check.json")
r = json.load(open(p))
step = r.get("current_step")
r.setdefault("errors", []).append({"step": step or "gpu_check.py",
                                   "error": f"gpu_check.py died with exit status {rc} (in step: {step})"})
json.dump(r, open(p, "w"), indent=1)
with open(os.path.join(out, "gpu-check.md"), "a") as f:
    f.write(f"\n**gpu_check.py died with exit status {rc} during step: {step}; the report above is partial.**\n")
EOF
fi
exit "$rc"
