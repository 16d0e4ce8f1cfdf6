#!/usr/bin/env bash
# `make demo`: classify the example photos, then generate pseudo-masks and overlays for them.
# Uses the real OpenAI ViT-B/16 when it is cached or downloadable; otherwise a random-weight
# test model, whose outputs are meaningless (the commands and files are the real ones).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/clipmask
OUT=demo-out
MODEL=ViT-B/16
if ! $BIN classify --model "$MODEL" --config voc12 --device cpu examples/images/2011_000096.jpg >/dev/null 2>/tmp/clipmask-demo.err; then
  echo "WARNING: the real ViT-B/16 is not cached and could not be downloaded ($(head -c 300 /tmp/clipmask-demo.err | tr '\n' ' '))." >&2
  echo "WARNING: using a RANDOM-WEIGHT test model instead: its classes and masks are meaningless." >&2
  MODEL=target/test-fixtures/tiny-seed0/model.safetensors
  if [ ! -f "$MODEL" ]; then
    .venv/bin/python tests/python/make_fixture.py target/test-fixtures/tiny-seed0 --seed 0
    touch target/test-fixtures/tiny-seed0/.complete
  fi
fi
echo "== clipmask classify (zero-shot, model $MODEL)"
$BIN classify --model "$MODEL" --config voc12 --top 3 examples/images/*.jpg
echo
echo "== clipmask generate (pseudo-masks, model $MODEL)"
$BIN generate --model "$MODEL" --config voc12 --images examples/images --labels examples/labels.json \
  --out "$OUT" --save-cams --overlays --overwrite
echo
echo "masks:    $OUT/masks/*.png   (8-bit grayscale PNG, value = class id: 0 = background, 1..20 = VOC classes, 255 = ignore)"
echo "maps:     $OUT/cams/*.npz    (numpy.load: keys, cams, raw_cams)"
echo "overlays: $OUT/overlays/*.jpg (open these to look at the masks)"
