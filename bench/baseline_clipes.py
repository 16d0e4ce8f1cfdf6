"""The straightforward PyTorch CLIP-ES pipeline, as the original code runs it: per-label
GradCAM loop (block L recomputed and one backward per label), CAA, labels, .npy + PNG outputs.
Used by `make bench` as the speed baseline (same model, images and machine as clipmask).

  baseline_clipes.py [--crf] MODEL CONFIG IMAGES_DIR LABELS_JSON OUT_DIR ID...

With --crf the labels come from pydensecrf on [bg; maps] with the faithful image and
pixels below 0.95 confidence set to 255, as CLIP-ES's make_seg_labels does.
"""
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))
import clip_reference as ref  # noqa: E402


def main():
    args = sys.argv[1:]
    use_crf = "--crf" in args
    args = [a for a in args if a != "--crf"]
    model_path, config_path, images, labels_path, out, *ids = args
    if use_crf:
        from crf_reference import reference_crf, faithful
    t0 = time.time()
    cfg = json.load(open(config_path))
    names = [c["name"] for c in cfg["classes"]]
    prompts = [c.get("prompt", c["name"]) for c in cfg["classes"]]
    labels = json.load(open(labels_path))
    model = ref.load_checkpoint(model_path)
    fg = ref.zeroshot_classifier(model, prompts, cfg["templates"])
    bg = ref.zeroshot_classifier(model, cfg["background_words"], cfg["templates"])
    os.makedirs(out, exist_ok=True)
    t_setup = time.time() - t0
    t_maps = t_write = 0.0
    pal = [v for c in cfg["palette"] for v in c]
    for i in ids:
        t1 = time.time()
        keys = [names.index(n) for n in dict.fromkeys(labels[i])]
        r = ref.clipes_maps(model, os.path.join(images, i + ".jpg"), keys, fg, bg, cfg["box_threshold"])
        t2 = time.time()
        if use_crf:
            maps = r["refined"]
            probs = np.concatenate([1 - maps.max(axis=0, keepdims=True), maps], axis=0)
            rgb = np.array(Image.open(os.path.join(images, i + ".jpg")).convert("RGB"))
            q = reference_crf(faithful(rgb), probs.astype(np.float32))
            ids_ = np.concatenate([[0], np.asarray(keys) + 1])
            lab = ids_[q.argmax(axis=0)].astype(np.uint8)
            lab[q.max(axis=0) < 0.95] = 255
        else:
            lab, _ = ref.labels_from_maps(r["refined"], keys, 1.0)
        np.save(os.path.join(out, i + ".npy"), {"keys": np.array(keys), "attn_highres": r["refined"], "highres": r["raw"]})
        im = Image.fromarray(lab, mode="P")
        im.putpalette(pal)
        im.save(os.path.join(out, i + ".png"))
        t3 = time.time()
        t_maps += t2 - t1
        t_write += t3 - t2
    print(json.dumps({"setup_s": t_setup, "maps_s": t_maps, "write_s": t_write, "total_s": time.time() - t0}))


if __name__ == "__main__":
    main()
