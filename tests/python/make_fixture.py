"""Writes a random-weight CLIP ViT with OpenAI's parameter names and shapes, as a TorchScript
archive (model.pt, like OpenAI's releases) and as safetensors (model.safetensors).

  make_fixture.py OUT_DIR [--seed S] [--size tiny|tiny-soft|b16] [--fp16] [--logit-scale 10]

tiny: patch 16, vision width 128, 12 layers; text width 128, 3 layers; vocab 49408; embed 64.
tiny-soft: tiny with half the attention gain (in_proj 1.5 instead of 3): attention less peaked,
      so a rounding-level change stays rounding-level through the blocks (the peaked tiny model
      amplifies one about 2x per block); the fused-vs-explicit formulation tests use it.
b16:  ViT-B/16's dimensions (vision 768 x 12, text 512 x 12, embed 512), for benchmarks.
Weights are scaled so attention is peaked and maps have structure (unlike a zero-ish init).
exp(logit_scale) defaults to 10: with OpenAI's 100, random weights give present labels
probabilities ~1e-13 and GradCAM of such a probability is rounding noise; with 10 they are
~0.005-0.1, as with real CLIP, so parity on them means something.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clip_reference import CLIP  # noqa: E402

SIZES = {
    "tiny": dict(embed_dim=64, resolution=224, v_layers=12, v_width=128, patch=16, ctx=77, vocab=49408,
                 t_width=128, t_heads=2, t_layers=3),
    "tiny-soft": dict(embed_dim=64, resolution=224, v_layers=12, v_width=128, patch=16, ctx=77, vocab=49408,
                      t_width=128, t_heads=2, t_layers=3),
    "b16": dict(embed_dim=512, resolution=224, v_layers=12, v_width=768, patch=16, ctx=77, vocab=49408,
                t_width=512, t_heads=8, t_layers=12),
}
# The in_proj weights' gain: peaked attention (maps with structure) by default.
ATTENTION_GAIN = {"tiny-soft": 1.5}


def randomize(model, seed, logit_scale, attention_gain=3.0):
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    out = {}
    for name, t in sd.items():
        shape = t.shape
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or "ln_pre.weight" in name \
                or "ln_post.weight" in name or "ln_final.weight" in name:
            v = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            v = 0.05 * torch.randn(shape, generator=g)
        elif name == "logit_scale":
            v = torch.tensor(float(np.log(logit_scale)))
        elif name.endswith("in_proj_weight"):
            v = attention_gain * torch.randn(shape, generator=g) / shape[1] ** 0.5
        elif name.endswith("conv1.weight"):
            fan = shape[1] * shape[2] * shape[3]
            v = 2.0 * torch.randn(shape, generator=g) / fan ** 0.5
        elif name.endswith("positional_embedding") or name.endswith("class_embedding"):
            v = 0.5 * torch.randn(shape, generator=g)
        elif name == "token_embedding.weight":
            v = torch.randn(shape, generator=g)
        elif len(shape) == 2:
            # Linear weights (out, in) and projections (in, out): keep the residual stream O(1).
            fan = shape[1] if "weight" in name else shape[0]
            v = 0.5 * torch.randn(shape, generator=g) / fan ** 0.5
        else:
            v = 0.1 * torch.randn(shape, generator=g)
        out[name] = v.contiguous()
    model.load_state_dict(out)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", default="tiny", choices=SIZES)
    ap.add_argument("--fp16", action="store_true", help="store weights in fp16 like OpenAI's releases")
    ap.add_argument("--logit-scale", type=float, default=10.0, help="exp(logit_scale) of the model")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(a.seed)
    model = CLIP(**SIZES[a.size]).eval()
    sd = randomize(model, a.seed, a.logit_scale, ATTENTION_GAIN.get(a.size, 3.0))
    if a.fp16:
        model = model.half()
        sd = {k: v.half() for k, v in sd.items()}
    from safetensors.torch import save_file
    save_file(sd, os.path.join(a.out, "model.safetensors"))
    x = torch.zeros(1, 3, 32, 32, dtype=torch.float16 if a.fp16 else torch.float32)
    traced = torch.jit.trace(model, x, check_trace=False)
    traced.save(os.path.join(a.out, "model.pt"))


if __name__ == "__main__":
    main()
