"""Runs the independent reference (clip_reference.py) on a JSON spec and writes its outputs as
safetensors, for the Rust parity tests.

spec: {"model": path, "config": path, "round_fp16": bool, "fp16": bool, "threads": int,
       "cases": [{"id": str, "image": path, "labels": [class index, ...],
                  "source": "gradcam"|"maskclip"|"sclip"|"clearclip"|"naclip",  (optional)
                  "scales": [float, ...], "flip": bool,                          (optional)
                  "temperature": float, "naclip_std": float}],                   (optional)
       "zero_shot": [path, ...], "sentences": [str, ...]}

A case without "source", "scales" and "flip" (or with their defaults "gradcam", [1.0], false)
runs clip_reference.clipes_maps exactly as before. Otherwise dense_reference.tta_maps runs it
(one variant when scales is [1.0] and flip is false); the output keys are the same: raw and
refined are the averages over the variants, raw_grid, attn, tokens and probs those of the first
variant (for a dense source, probs is the per-patch probability averaged over the patches).
"temperature" (default: the source's, docs/sources.md) and "naclip_std" (default 5) only
matter for dense sources.
"""
import json
import sys

import numpy as np
import torch
from safetensors.torch import save_file

import clip_reference as ref
import dense_reference as dense


def main(spec_path, out_path):
    spec = json.load(open(spec_path))
    cfg = json.load(open(spec["config"]))
    torch.set_num_threads(spec.get("threads", 2))
    model = ref.load_checkpoint(spec["model"], fp16=spec.get("fp16", False))
    templates = cfg["templates"]
    names = [c.get("prompt", c["name"]) for c in cfg["classes"]]
    names = [n if isinstance(n, str) else ",".join(n) for n in names]
    fg = ref.zeroshot_classifier(model, names, templates)
    bg = ref.zeroshot_classifier(model, cfg["background_words"], templates)
    out = {"text.classes": fg.float(), "text.background": bg.float()}
    for i, s in enumerate(spec.get("sentences", [])):
        out[f"tokens.{i}"] = ref.tokenize([s])[0]
    for case in spec.get("cases", []):
        source = case.get("source", "gradcam")
        scales = case.get("scales", [1.0])
        flip = case.get("flip", False)
        if dense.is_default(source, scales, flip):
            r = ref.clipes_maps(model, case["image"], case["labels"], fg, bg, cfg["box_threshold"],
                                spec.get("round_fp16", True))
        else:
            r = dense.tta_maps(model, case["image"], case["labels"], fg, bg, source, scales, flip,
                               cfg["box_threshold"], spec.get("round_fp16", True), case.get("temperature"),
                               case.get("naclip_std", dense.NACLIP_STD))
        labels, scores = ref.labels_from_maps(r["refined"], case["labels"], 1.0)
        top2 = np.sort(scores, axis=0)[-2:]
        margin = top2[1] - top2[0] if scores.shape[0] > 1 else np.ones_like(scores[0])
        cid = case["id"]
        for k in ("raw", "refined", "raw_grid", "attn", "tokens", "probs"):
            out[f"{cid}.{k}"] = torch.from_numpy(np.ascontiguousarray(r[k]))
        out[f"{cid}.labels"] = torch.from_numpy(labels.astype(np.int64))
        out[f"{cid}.margin"] = torch.from_numpy(margin.astype(np.float32))
    for i, path in enumerate(spec.get("zero_shot", [])):
        probs, feat = ref.zero_shot_probs(model, path, names, templates)
        out[f"zs.{i}.probs"] = probs
        out[f"zs.{i}.feature"] = feat
    save_file({k: v.contiguous() for k, v in out.items()}, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
