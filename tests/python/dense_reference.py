"""Independent PyTorch reference for clipmask's gradient-free map sources and test-time
augmentation (issue 17): `--cam maskclip|sclip|clearclip|naclip`, `--scales`, `--flip`.

Written from the published methods and their official code (read, not copied; the exact
formulas, temperatures and file:line citations are in docs/sources.md):

- MaskCLIP (Zhou et al., ECCV 2022, github.com/chongzhou96/MaskCLIP): last block's attention
  replaced by its value path, out_proj(v_proj(ln_1 x)); residual and FFN of the block kept.
- SCLIP (Wang et al., ECCV 2024, github.com/wangf3014/SCLIP): correlative self-attention
  softmax(q q^T s) + softmax(k k^T s) in the last block; residual and FFN kept.
- ClearCLIP (Lan et al., ECCV 2024, github.com/mc-lan/ClearCLIP): q-q attention in the last
  block; residual and FFN removed.
- NACLIP (Hajimiri et al., WACV 2025, github.com/sinahmr/NACLIP): k-k attention plus a Gaussian
  neighbourhood bias over patch-grid distance ('reduced' architecture: residual and FFN
  removed).

Blocks 1..L-1, the input resize, the positional table and the CLIP-ES post-processing (two
min-max passes, cv2 resize, CAA with the unmodified blocks' attention) are those of
clip_reference.clipes_maps, so a dense source differs from gradcam only in how the grid map of
each label is obtained. It shares no code with the Rust implementation.
"""
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import clip_reference as ref

SOURCES = ("gradcam", "maskclip", "sclip", "clearclip", "naclip")
DENSE_SOURCES = SOURCES[1:]
# Per-patch softmax temperatures of the official segmentors (docs/sources.md). MaskCLIP has
# none of its own (cosine logits); it gets the checkpoint's exp(logit_scale) (100 for OpenAI).
FIXED_TEMPERATURE = {"sclip": 40.0, "clearclip": 50.0, "naclip": 40.0}
NACLIP_STD = 5.0


def default_temperature(model, source):
    if source == "maskclip":
        return float(model.logit_scale.detach().exp())
    return FIXED_TEMPERATURE[source]


# ---- the modified last block ------------------------------------------------------------

def split_heads(t, heads):
    """(N, 1, D) LND -> (heads, N, D/heads); head h holds channels [h*dh, (h+1)*dh)."""
    n, b, d = t.shape
    assert b == 1
    return t.reshape(n, heads, d // heads).permute(1, 0, 2)


def merge_heads(t):
    """(heads, N, dh) -> (N, 1, heads*dh), heads concatenated in order."""
    h, n, dh = t.shape
    return t.permute(1, 0, 2).reshape(n, 1, h * dh)


def naclip_bias(gh, gw, std=NACLIP_STD):
    """NACLIP's neighbourhood term, (n+1) x (n+1) with n = gh*gw patch tokens in row-major
    order after the class token: B[1+i, 1+j] = exp(-((r_i-r_j)^2 + (c_i-c_j)^2) / (2 std^2)),
    where (r, c) is a patch's row and column on the gh x gw grid. Not normalised (1 on the
    diagonal); the class token's row and column are 0."""
    idx = torch.arange(gh * gw)
    r, c = idx // gw, idx % gw
    d2 = (r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2
    g = torch.exp(-d2.to(torch.float32) / (2.0 * std * std))
    out = torch.zeros(gh * gw + 1, gh * gw + 1)
    out[1:, 1:] = g
    return out


def modified_last_block(blk, x, source, grid, naclip_std=NACLIP_STD):
    """The source's replacement of block L on its input x (N, 1, D, LND, model dtype). Returns
    the tokens that go to ln_post (all N rows; the class token is dropped afterwards)."""
    mha = blk.attn
    heads = mha.num_heads
    d = x.shape[-1]
    scale = (d // heads) ** -0.5
    y = blk.ln_1(x)
    q, k, v = F.linear(y, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    if source == "maskclip":
        # Value path only: no token mixing, so heads do not matter.
        h = x + mha.out_proj(v)
        return h + blk.mlp(blk.ln_2(h))
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    if source == "sclip":
        w = torch.softmax(torch.bmm(qh, qh.transpose(1, 2)) * scale, dim=-1) \
            + torch.softmax(torch.bmm(kh, kh.transpose(1, 2)) * scale, dim=-1)
    elif source == "clearclip":
        w = torch.softmax(torch.bmm(qh, qh.transpose(1, 2)) * scale, dim=-1)
    elif source == "naclip":
        bias = naclip_bias(grid[0], grid[1], naclip_std).to(x.dtype)
        w = torch.softmax(torch.bmm(kh, kh.transpose(1, 2)) * scale + bias, dim=-1)
    else:
        raise ValueError(f"unknown dense source {source!r}")
    out = mha.out_proj(merge_heads(torch.bmm(w, vh)))
    if source == "sclip":
        h = x + out
        return h + blk.mlp(blk.ln_2(h))
    return out  # ClearCLIP and NACLIP ('reduced'): no residual, no FFN


# ---- pytorch-grad-cam's scaling, as CLIP-ES's GradCAM output goes through it ------------

def gradcam_scaling(cam):
    """BaseCAM's two min-max passes on one (gh, gw) map: compute_cam_per_layer (ReLU, then
    scale_cam_image at the input's own size, which is the grid here) and
    aggregate_multi_layers (ReLU, mean over the one layer, scale_cam_image)."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    cam = np.maximum(np.asarray(cam, dtype=np.float32)[None], 0)
    per_layer = scale_cam_image(cam, None)[:, None, :]
    agg = np.mean(np.maximum(np.concatenate([per_layer], axis=1), 0), axis=1)
    return scale_cam_image(agg)[0]


# ---- one input ----------------------------------------------------------------------------

def dense_features(model, x, round_fp16=True):
    """Block L input (CLIP-ES's trunk) and the attention of the unmodified blocks 1..L."""
    v = model.visual
    gh, gw = x.shape[-2] // v.patch, x.shape[-1] // v.patch
    blocks = list(v.transformer.resblocks)
    with torch.no_grad():
        tokens = ref.encode_tokens(model, x, ref.upsample_pos_emb(v.positional_embedding, (gh, gw), round_fp16))
        attns = []
        for blk in blocks[:-1]:
            tokens, a = blk(tokens)
            attns.append(a)
        _, last_attn = blocks[-1](tokens)
    return tokens, attns, last_attn, (gh, gw)


def patch_probabilities(model, tokens, grid, text, source, temperature, naclip_std=NACLIP_STD):
    """Per-patch softmax over the K+M texts, (n, K+M) fp32, from the modified last block."""
    v = model.visual
    with torch.no_grad():
        h = modified_last_block(v.transformer.resblocks[-1], tokens, source, grid, naclip_std)
        f = v.ln_post(h.permute(1, 0, 2)[0, 1:]) @ v.proj
        f = f / f.norm(dim=-1, keepdim=True)
        t = text.to(model.dtype)
        t = t / t.norm(dim=-1, keepdim=True)
        cos = (f @ t.t()).float()
        return torch.softmax(temperature * cos, dim=-1)


def dense_maps(model, x, ori_h, ori_w, label_ids, fg_text, bg_text, source, box_threshold=0.4,
               round_fp16=True, temperature=None, naclip_std=NACLIP_STD):
    """A dense source's maps for one preprocessed (1, 3, H, W) input, with clipes_maps's keys.

    "probs" is the per-patch probability averaged over the patches, (K+M,) like clipes_maps's
    image-level probabilities; "patch_probs" (K+M, gh, gw) holds them per patch."""
    if temperature is None:
        temperature = default_temperature(model, source)
    tokens, attns, last_attn, (gh, gw) = dense_features(model, x, round_fp16)
    text = torch.cat([fg_text[label_ids], bg_text], dim=0)
    p = patch_probabilities(model, tokens, (gh, gw), text, source, temperature, naclip_std)
    attn_weight = ref.caa_attention(attns, last_attn)
    raw_grid, raw_hi, ref_hi = [], [], []
    for idx in range(len(label_ids)):
        grid_map = gradcam_scaling(p[:, idx].reshape(gh, gw).numpy())
        raw_grid.append(grid_map)
        raw_hi.append(cv2.resize(grid_map, (ori_w, ori_h)))
        ref_hi.append(ref.caa_refine(attn_weight, grid_map, gh, gw, box_threshold, ori_w, ori_h))
    return {
        "raw": np.stack(raw_hi).astype(np.float32),
        "refined": np.stack(ref_hi).astype(np.float32),
        "raw_grid": np.stack(raw_grid).astype(np.float32),
        "attn": torch.stack([a[0] for a in attns + [last_attn]]).float().numpy(),
        "tokens": tokens.permute(1, 0, 2)[0].float().numpy(),
        "probs": p.mean(dim=0).numpy().astype(np.float32),
        "patch_probs": p.t().reshape(-1, gh, gw).numpy().astype(np.float32),
        "temperature": float(temperature),
    }


def source_maps(model, x, ori_h, ori_w, label_ids, fg_text, bg_text, source="gradcam",
                box_threshold=0.4, round_fp16=True, temperature=None, naclip_std=NACLIP_STD):
    if source == "gradcam":
        return ref.clipes_maps_input(model, x, ori_h, ori_w, label_ids, fg_text, bg_text, box_threshold,
                                     round_fp16)
    return dense_maps(model, x, ori_h, ori_w, label_ids, fg_text, bg_text, source, box_threshold,
                      round_fp16, temperature, naclip_std)


# ---- test-time augmentation ----------------------------------------------------------------

def tta_input_size(ori_h, ori_w, scale, patch):
    """CLIP-ES's img_ms_and_flip: each side ceil(scale * side / patch) * patch, evaluated in
    float64 in that order."""
    return (int(np.ceil(scale * int(ori_h) / patch) * patch),
            int(np.ceil(scale * int(ori_w) / patch) * patch))


def tta_inputs(path, scales, flip, patch):
    """[(scale, flipped, x)] in order: per scale the resized input, then (with flip) the same
    tensor mirrored along its width, as img_ms_and_flip builds them."""
    img = Image.open(path)
    ori_w, ori_h = img.size
    out = []
    for s in scales:
        nh, nw = tta_input_size(ori_h, ori_w, s, patch)
        x = ref.to_tensor(img.resize((nw, nh), Image.BICUBIC).convert("RGB"))
        out.append((s, False, x))
        if flip:
            out.append((s, True, torch.flip(x, [-1])))
    return out, ori_h, ori_w


def tta_maps(model, path, label_ids, fg_text, bg_text, source="gradcam", scales=(1.0,), flip=False,
             box_threshold=0.4, round_fp16=True, temperature=None, naclip_std=NACLIP_STD):
    """Maps averaged over scales and flips. Each variant's raw and refined maps (already at the
    original size) are mirrored back when its input was mirrored; raw and refined are then
    averaged separately (float64 sum in variant order, divided by the count, cast to fp32).
    raw_grid, attn, tokens, probs (and patch_probs) are those of the first variant
    (scales[0], not flipped)."""
    variants, ori_h, ori_w = tta_inputs(path, scales, flip, model.visual.patch)
    raw_sum, ref_sum, first, meta = None, None, None, []
    for s, flipped, x in variants:
        r = source_maps(model, x, ori_h, ori_w, label_ids, fg_text, bg_text, source, box_threshold,
                        round_fp16, temperature, naclip_std)
        raw, refined = r["raw"], r["refined"]
        if flipped:
            raw, refined = raw[:, :, ::-1], refined[:, :, ::-1]
        raw_sum = raw.astype(np.float64) if raw_sum is None else raw_sum + raw
        ref_sum = refined.astype(np.float64) if ref_sum is None else ref_sum + refined
        if first is None:
            first = r
        meta.append((s, flipped, tuple(x.shape[-2:])))
    out = dict(first)
    out["raw"] = (raw_sum / len(variants)).astype(np.float32)
    out["refined"] = (ref_sum / len(variants)).astype(np.float32)
    out["variants"] = meta
    return out


def is_default(source="gradcam", scales=(1.0,), flip=False):
    return source == "gradcam" and [float(s) for s in scales] == [1.0] and not flip


__all__ = ["SOURCES", "DENSE_SOURCES", "FIXED_TEMPERATURE", "NACLIP_STD", "default_temperature",
           "naclip_bias", "modified_last_block", "gradcam_scaling", "dense_maps", "source_maps",
           "tta_input_size", "tta_inputs", "tta_maps", "is_default"]
