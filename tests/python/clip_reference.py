"""Independent PyTorch reference for clipmask's tests.

OpenAI's CLIP architecture written with nn.MultiheadAttention (as in openai/CLIP model.py),
CLIP-ES's pipeline as its public code runs it (PIL preprocessing, a per-label GradCAM loop with a
forward hook on block L's ln_1, CAA with Sinkhorn normalisation and boxes), and CLIP's zero-shot
protocol. It shares no code with the Rust implementation.
"""
import importlib.util
import math
import os
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class LayerNorm(nn.LayerNorm):
    def forward(self, x):
        t = x.dtype
        return super().forward(x.type(torch.float32)).type(t)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model, n_head, attn_mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))
        self.ln_2 = LayerNorm(d_model)
        self.attn_mask = attn_mask

    def forward(self, x):
        m = self.attn_mask.to(dtype=x.dtype, device=x.device) if self.attn_mask is not None else None
        a = self.ln_1(x)
        out, w = self.attn(a, a, a, need_weights=True, attn_mask=m)
        x = x + out
        x = x + self.mlp(self.ln_2(x))
        return x, w


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, attn_mask=None):
        super().__init__()
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])


class VisionTransformer(nn.Module):
    def __init__(self, resolution, patch, width, layers, heads, output_dim):
        super().__init__()
        self.patch = patch
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((resolution // patch) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))


class CLIP(nn.Module):
    def __init__(self, embed_dim, resolution, v_layers, v_width, patch, ctx, vocab, t_width, t_heads, t_layers):
        super().__init__()
        self.context_length = ctx
        self.visual = VisionTransformer(resolution, patch, v_width, v_layers, v_width // 64, embed_dim)
        mask = torch.empty(ctx, ctx).fill_(float("-inf")).triu_(1)
        self.transformer = Transformer(t_width, t_layers, t_heads, attn_mask=mask)
        self.token_embedding = nn.Embedding(vocab, t_width)
        self.positional_embedding = nn.Parameter(torch.empty(ctx, t_width))
        self.ln_final = LayerNorm(t_width)
        self.text_projection = nn.Parameter(torch.empty(t_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))

    def forward(self, image):
        # Only for tracing the TorchScript archive; the parameters are what matters.
        return self.visual.conv1(image)

    def encode_text(self, text):
        x = self.token_embedding(text) + self.positional_embedding
        x = x.permute(1, 0, 2)
        for blk in self.transformer.resblocks:
            x, _ = blk(x)
        x = x.permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


def build_model(sd):
    """openai/CLIP build_model: architecture from the state dict's shapes."""
    v_width = sd["visual.conv1.weight"].shape[0]
    v_layers = len([k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    embed_dim = sd["text_projection"].shape[1]
    ctx = sd["positional_embedding"].shape[0]
    vocab = sd["token_embedding.weight"].shape[0]
    t_width = sd["ln_final.weight"].shape[0]
    t_layers = len(set(k.split(".")[2] for k in sd if k.startswith("transformer.resblocks")))
    m = CLIP(embed_dim, patch * grid, v_layers, v_width, patch, ctx, vocab, t_width, t_width // 64, t_layers)
    m.load_state_dict({k: v.float() for k, v in sd.items()})
    return m.eval()


def load_checkpoint(path):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        sd = torch.jit.load(path, map_location="cpu").state_dict()
    return build_model(sd)


# ---- text -------------------------------------------------------------------------------

def _load_simple_tokenizer():
    """OpenAI's simple_tokenizer from the clip package, loaded without clip/__init__ (which
    imports torchvision)."""
    base = None
    for p in __import__("sys").path:
        cand = os.path.join(p, "clip", "simple_tokenizer.py")
        if os.path.exists(cand):
            base = os.path.dirname(cand)
            break
    s = importlib.util.spec_from_file_location("clip_simple_tokenizer", os.path.join(base, "simple_tokenizer.py"))
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod.SimpleTokenizer()


_TOK = None


def tokenize(texts, ctx=77):
    global _TOK
    if _TOK is None:
        _TOK = _load_simple_tokenizer()
    sot, eot = _TOK.encoder["<|startoftext|>"], _TOK.encoder["<|endoftext|>"]
    out = torch.zeros(len(texts), ctx, dtype=torch.long)
    for i, t in enumerate(texts):
        toks = [sot] + _TOK.encode(t) + [eot]
        assert len(toks) <= ctx
        out[i, :len(toks)] = torch.tensor(toks)
    return out


@torch.no_grad()
def zeroshot_classifier(model, classnames, templates):
    ws = []
    for name in classnames:
        e = model.encode_text(tokenize([t.format(name) for t in templates]))
        e = e / e.norm(dim=-1, keepdim=True)
        e = e.mean(dim=0)
        ws.append(e / e.norm())
    return torch.stack(ws, dim=0)


# ---- image ------------------------------------------------------------------------------

def to_tensor(img):
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    return ((a - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)).unsqueeze(0)


def clipes_input(path, patch=16):
    img = Image.open(path)
    w, h = img.size
    nh, nw = int(np.ceil(h / patch) * patch), int(np.ceil(w / patch) * patch)
    img = img.resize((nw, nh), Image.BICUBIC).convert("RGB")
    return to_tensor(img), h, w


def zero_shot_input(path, res):
    img = Image.open(path).convert("RGB")
    w, h = img.size
    if w <= h:
        nw, nh = res, int(res * h / w)
    else:
        nw, nh = int(res * w / h), res
    img = img.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - res) / 2.0)), int(round((nw - res) / 2.0))
    return to_tensor(img.crop((left, top, left + res, top + res)))


# ---- vision -----------------------------------------------------------------------------

def upsample_pos_emb(emb, new_size, round_fp16=True):
    first, grid = emb[:1], emb[1:]
    n, d = grid.shape
    s = int(math.sqrt(n))
    grid = F.interpolate(grid.permute(1, 0).reshape(1, d, s, s), size=new_size, mode="bilinear", align_corners=False)
    grid = grid.reshape(d, -1).permute(1, 0)
    out = torch.cat([first, grid], 0)
    return out.half().float() if round_fp16 else out


def encode_tokens(model, x, pos):
    v = model.visual
    x = v.conv1(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1) + pos
    return v.ln_pre(x).permute(1, 0, 2)  # LND


@torch.no_grad()
def zero_shot_probs(model, path, classnames, templates):
    v = model.visual
    res = v.patch * int(math.sqrt(v.positional_embedding.shape[0] - 1))
    x = encode_tokens(model, zero_shot_input(path, res), v.positional_embedding)
    for blk in v.transformer.resblocks:
        x, _ = blk(x)
    f = v.ln_post(x[0]) @ v.proj
    f = f / f.norm(dim=-1, keepdim=True)
    t = zeroshot_classifier(model, classnames, templates)
    return (model.logit_scale.exp() * f @ t.t()).softmax(dim=-1)[0], f[0]


def scale_cam(img):
    img = img - np.min(img)
    return img / (1e-7 + np.max(img))


def components(binary):
    """8-connected components by union-find; returns a list of bounding boxes (x, y, w, h)."""
    h, w = binary.shape
    parent = list(range(h * w))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for y in range(h):
        for x in range(w):
            if not binary[y, x]:
                continue
            for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and binary[yy, xx]:
                    parent[find(y * w + x)] = find(yy * w + xx)
    boxes = {}
    for y in range(h):
        for x in range(w):
            if binary[y, x]:
                r = find(y * w + x)
                b = boxes.get(r, [x, y, x, y])
                boxes[r] = [min(b[0], x), min(b[1], y), max(b[2], x), max(b[3], y)]
    return [(b[0], b[1], b[2] - b[0] + 1, b[3] - b[1] + 1) for b in boxes.values()]


def scoremap2bbox(scoremap, threshold):
    height, width = scoremap.shape
    u8 = (scoremap * 255).astype(np.uint8)
    thr = int(threshold * np.max(u8))
    boxes = []
    for x, y, w, h in components(u8 > thr):
        boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
    return boxes


def clipes_maps(model, path, label_ids, fg_text, bg_text, box_threshold=0.4, round_fp16=True):
    """CLIP-ES for one image: per-label GradCAM loop (one backward per label) and CAA."""
    v = model.visual
    x, ori_h, ori_w = clipes_input(path, v.patch)
    H, W = x.shape[-2:]
    gh, gw = H // v.patch, W // v.patch
    blocks = list(v.transformer.resblocks)
    with torch.no_grad():
        tokens = encode_tokens(model, x, upsample_pos_emb(v.positional_embedding, (gh, gw), round_fp16))
        attns = []
        for blk in blocks[:-1]:
            tokens, a = blk(tokens)
            attns.append(a)
    text = torch.cat([fg_text[label_ids], bg_text], dim=0)
    last = blocks[-1]
    acts = {}

    def hook(_m, _i, out):
        out.retain_grad()
        acts["a"] = out

    handle = last.ln_1.register_forward_hook(hook)
    raw, refined_all, last_attn = [], [], None
    try:
        for idx in range(len(label_ids)):
            y, a_last = last(tokens.detach())
            feat = v.ln_post(y.permute(1, 0, 2))[:, 1:, :].mean(dim=1) @ v.proj
            feat = feat / feat.norm(dim=1, keepdim=True)
            probs = (model.logit_scale.exp() * feat @ text.t()).softmax(dim=-1)
            model.zero_grad()
            probs[0, idx].backward()
            g = acts["a"].grad[1:, 0, :].reshape(gh, gw, -1).permute(2, 0, 1).numpy()
            A = acts["a"].detach()[1:, 0, :].reshape(gh, gw, -1).permute(2, 0, 1).numpy()
            w = g.mean(axis=(1, 2))
            cam = np.maximum((w[:, None, None] * A).sum(axis=0), 0)
            cam = scale_cam(cam).astype(np.float32)
            raw.append(cam)
            if last_attn is None:
                last_attn = a_last.detach()
    finally:
        handle.remove()
    attn = torch.stack([a[0] for a in attns + [last_attn]], dim=0)[-8:].mean(dim=0)[1:, 1:].float()
    t = attn / attn.sum(dim=0, keepdim=True)
    t = t / t.sum(dim=1, keepdim=True)
    for _ in range(2):
        t = t / t.sum(dim=0, keepdim=True)
        t = t / t.sum(dim=1, keepdim=True)
    t = (t + t.t()) / 2
    t = t @ t
    raw_hi, ref_hi, ref_lo = [], [], []
    for cam in raw:
        mask = torch.zeros(gh, gw)
        for x0, y0, x1, y1 in scoremap2bbox(cam, box_threshold):
            mask[y0:y1, x0:x1] = 1
        tm = t * mask.view(1, -1)
        r = (tm @ torch.from_numpy(cam).view(-1, 1)).reshape(gh, gw).numpy().astype(np.float32)
        r = scale_cam(r)
        ref_lo.append(r)
        up = lambda m: F.interpolate(torch.from_numpy(np.ascontiguousarray(m))[None, None].float(), size=(ori_h, ori_w),
                                     mode="bilinear", align_corners=False)[0, 0].numpy()
        ref_hi.append(up(r))
        raw_hi.append(up(cam))
    return {
        "raw": np.stack(raw_hi).astype(np.float32),
        "refined": np.stack(ref_hi).astype(np.float32),
        "raw_grid": np.stack(raw).astype(np.float32),
        "attn": torch.stack([a[0] for a in attns + [last_attn]]).numpy().astype(np.float32),
        "tokens": tokens.permute(1, 0, 2)[0].numpy().astype(np.float32),
        "probs": probs[0].detach().numpy().astype(np.float32),
    }


def labels_from_maps(maps, keys, alpha=1.0):
    bg = np.power(1 - np.max(maps, axis=0, keepdims=True), alpha)
    scores = np.concatenate([bg, maps], axis=0)
    ids = np.concatenate([[0], np.asarray(keys) + 1])
    return ids[np.argmax(scores, axis=0)].astype(np.uint8), scores
