#!/usr/bin/env bash
# The effect of `generate --cams-dtype / --cams-stride` on voc-sample (docs/cams-storage.md):
# per storage, the archives' size, eval --cams mIoU, the crf labels' mIoU, and how many label
# pixels differ from the float32 full-resolution archives (eval --cams labels at alpha 1, crf labels).
# Usage: scripts/cams-storage.sh [MODEL] [VOC_SAMPLE] [OUT]
set -euo pipefail
BIN=${BIN:-target/release/clipmask}
M=${1:-target/test-fixtures/tiny-seed0-ls10/model.safetensors}
V=${2:-../shared/data/voc-sample}
OUT=${3:-target/cams-storage}
PY=${CLIPMASK_PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
variants=("float32 1" "float16 1" "float32 2" "float16 2" "float16 4" "float16 8")
for v in "${variants[@]}"; do
  read -r dtype stride <<<"$v"
  d="$OUT/$dtype-s$stride"
  "$BIN" generate --device cpu --model "$M" --images "$V/JPEGImages" --labels "$V/labels.json" \
    --out "$d" --save-cams --cams-dtype "$dtype" --cams-stride "$stride" 2>/dev/null
  "$BIN" crf --cams "$d/cams" --images "$V/JPEGImages" --out "$d/crf" 2>/dev/null
  "$BIN" eval --cams "$d/cams" --gt "$V/SegmentationClass" --alpha 1 --json >"$d/eval-cams.json"
  "$BIN" eval --pred "$d/crf/masks" --gt "$V/SegmentationClass" --json >"$d/eval-crf.json"
done
"$PY" - "$OUT" "${variants[@]}" <<'PY'
import sys, os, json, glob
import numpy as np, torch
import torch.nn.functional as F
from PIL import Image
out, variants = sys.argv[1], [v.replace(" ", "-s") for v in sys.argv[2:]]
ref = f"{out}/{variants[0]}"

def maps(p):
    # What clipmask's reader hands on: float32, resized back to the original size bilinearly.
    z = np.load(p)
    m = torch.from_numpy(z["cams"].astype(np.float32))
    if "size" in z.files:
        m = F.interpolate(m[None], size=tuple(int(v) for v in z["size"]), mode="bilinear", align_corners=False)[0]
    return m.numpy()

def labels(m, alpha=1.0):
    # eval --cams's labelling (method.md §6): background (1 - max)^alpha, first index on ties.
    bg = (1.0 - m.max(0)) ** alpha
    return np.concatenate([bg[None], m]).argmax(0)

def differing(d, kind):
    n = diff = 0
    for p in sorted(glob.glob(f"{ref}/cams/*.npz")):
        q = p.replace(ref, d)
        if kind == "crf":
            a = np.array(Image.open(p.replace("/cams/", "/crf/masks/").replace(".npz", ".png")))
            b = np.array(Image.open(q.replace("/cams/", "/crf/masks/").replace(".npz", ".png")))
        else:
            a, b = labels(maps(p)), labels(maps(q))
        n += a.size; diff += int((a != b).sum())
    return diff, n

def size(d):
    return sum(os.path.getsize(p) for p in glob.glob(f"{d}/cams/*.npz"))

base = size(ref)
print("| storage | archives | smaller by | eval --cams mIoU (alpha 1) | labels moved (alpha 1) | crf mIoU | crf labels moved |")
print("|---|---|---|---|---|---|---|")
for v in variants:
    d = f"{out}/{v}"
    cams = json.load(open(f"{d}/eval-cams.json"))["miou"]
    crf = json.load(open(f"{d}/eval-crf.json"))["miou"]
    (ld, n), (cd, _) = differing(d, "cams"), differing(d, "crf")
    s = size(d)
    print(f"| {v.replace('-s', ', stride ')} | {s/1e6:.2f} MB | {base/s:.1f}x | {cams*100:.3f} | "
          f"{ld} ({100*ld/n:.4f} %) | {crf*100:.3f} | {cd} ({100*cd/n:.4f} %) |")
print(f"\n{n} pixels in all.")
PY
