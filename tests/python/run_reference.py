"""Runs the independent reference (clip_reference.py) on a JSON spec and writes its outputs as
safetensors, for the Rust parity tests.

spec: {"model": path, "config": path, "round_fp16": bool, "fp16": bool, "threads": int,
       "cases": [{"id": str, "image": path, "labels": [class index, ...]}],
       "zero_shot": [path, ...], "sentences": [str, ...]}
"""
import json
import sys

import numpy as np
import torch
from safetensors.torch import save_file

import clip_reference as ref


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
        r = ref.clipes_maps(model, case["image"], case["labels"], fg, bg, cfg["box_threshold"],
                            spec.get("round_fp16", True))
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
