"""Independent TagCLIP reference (Lin et al., AAAI 2024, linyq2117/TagCLIP) for clipmask's tests.

Written from the official classify.py (`classify`, `mask_attn`, `cwr`), utils.py
(`scoremap2bbox`, `_transform_resize`), clip/clip_model.py (the attention masks of
`ResidualAttentionBlock.attention`, `upsample_pos_emb`) and clip/multi_head_attn.py (the
attention it returns is the unmasked one), on clip_reference.py's CLIP (nn.MultiheadAttention).
Boxes come from OpenCV's findContours/boundingRect and crops from F.interpolate, as the official
code calls them. Class names, background words and templates are TagCLIP's, copied here from
clip_text.py and clip/clip.py. It shares no code with the Rust implementation.

  tagclip_reference.py SPEC.json OUT.safetensors
  spec: {"model": path, "threads": int, "round_fp16": bool, "threshold": 0.5,
         "cases": [{"id": str, "image": path}]}
"""
import json
import sys

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import clip_reference as ref

CLASS_NAMES_VOC = ['aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
                   'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train',
                   'tvmonitor']
BACKGROUND_CATEGORY_VOC = ['ground', 'land', 'grass', 'tree', 'building', 'wall', 'sky', 'lake', 'water', 'river',
                           'sea', 'railway', 'railroad', 'keyboard', 'helmet', 'cloud', 'house', 'mountain', 'ocean',
                           'road', 'rock', 'street', 'valley', 'bridge', 'sign']
TEMPLATES = [
    'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.', 'a photo of the hard to see {}.',
    'a low resolution photo of the {}.', 'a rendering of a {}.', 'graffiti of a {}.', 'a bad photo of the {}.',
    'a cropped photo of the {}.', 'a tattoo of a {}.', 'the embroidered {}.', 'a photo of a hard to see {}.',
    'a bright photo of a {}.', 'a photo of a clean {}.', 'a photo of a dirty {}.', 'a dark photo of the {}.',
    'a drawing of a {}.', 'a photo of my {}.', 'the plastic {}.', 'a photo of the cool {}.',
    'a close-up photo of a {}.', 'a black and white photo of the {}.', 'a painting of the {}.',
    'a painting of a {}.', 'a pixelated photo of the {}.', 'a sculpture of the {}.', 'a bright photo of the {}.',
    'a cropped photo of a {}.', 'a plastic {}.', 'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.', 'a photo of the {}.', 'a good photo of the {}.', 'a rendering of the {}.',
    'a {} in a video game.', 'a photo of one {}.', 'a doodle of a {}.', 'a close-up photo of the {}.',
    'a photo of a {}.', 'the origami {}.', 'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.',
    'a origami {}.', 'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
    'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.', 'a photo of a nice {}.',
    'a photo of a weird {}.', 'a blurry photo of a {}.', 'a cartoon {}.', 'art of a {}.', 'a sketch of the {}.',
    'a embroidered {}.', 'a pixelated photo of a {}.', 'itap of the {}.', 'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.', 'a plushie {}.', 'a photo of the nice {}.', 'a photo of the small {}.',
    'a photo of the weird {}.', 'the cartoon {}.', 'art of the {}.', 'a drawing of the {}.',
    'a photo of the large {}.', 'a black and white photo of a {}.', 'the plushie {}.', 'a dark photo of a {}.',
    'itap of a {}.', 'graffiti of the {}.', 'a toy {}.', 'itap of my {}.', 'a photo of a cool {}.',
    'a photo of a small {}.', 'a tattoo of the {}.', 'there is a {} in the scene.',
    'there is the {} in the scene.', 'this is a {} in the scene.', 'this is the {} in the scene.',
    'this is one {} in the scene.']


def scoremap2bbox(scoremap, threshold):
    """utils.scoremap2bbox with multi_contour_eval=True (RETR_EXTERNAL contours)."""
    height, width = scoremap.shape
    img = np.expand_dims((scoremap * 255).astype(np.uint8), 2)
    _, thr = cv2.threshold(src=img, thresh=int(threshold * np.max(img)), maxval=255, type=cv2.THRESH_BINARY)
    contours = cv2.findContours(image=thr, mode=cv2.RETR_EXTERNAL, method=cv2.CHAIN_APPROX_SIMPLE)[0]
    if len(contours) == 0:
        return np.asarray([[0, 0, 0, 0]]), 1
    boxes = []
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
    return np.asarray(boxes), len(contours)


def run_visual(model, image, pos, mask_for_layer):
    """The official VisionTransformer.forward: tokens after ln_post @ proj (all of them) and
    each block's head-averaged attention, which the official attention reports before its mask
    (attn_output_weights_ori)."""
    v = model.visual
    x = ref.encode_tokens(model, image, pos)  # LND
    attns = []
    for i, blk in enumerate(v.transformer.resblocks):
        a = blk.ln_1(x)
        out, w = blk.attn(a, a, a, need_weights=True)
        m = mask_for_layer(i, x.shape[0])
        if m is not None:
            out, _ = blk.attn(a, a, a, need_weights=False, attn_mask=m.to(x.dtype))
        x = x + out
        x = x + blk.mlp(blk.ln_2(x))
        attns.append(w)
    x = v.ln_post(x.permute(1, 0, 2)) @ v.proj
    return x, attns


def mask_attn(logits_coarse, logits, gh, gw, attn_weight):
    logits_refined = logits.clone()
    logits_max = torch.max(logits, dim=0)[0]
    for ccls in [i for i, v in enumerate(logits_max) if v > 0]:
        t = logits[:, ccls]
        t = t - t.min()
        t = t / t.max()
        box, cnt = scoremap2bbox(t.reshape(gh, gw).numpy(), threshold=t.mean())
        aff = torch.zeros((gh, gw))
        for i in range(cnt):
            x0, y0, x1, y1 = box[i]
            aff[y0:y1, x0:x1] = 1
        trans = attn_weight * aff.view(1, gh * gw)
        logits_refined[:, ccls] = torch.matmul(trans, logits_coarse[:, ccls:ccls + 1]).squeeze()
    return logits_refined


def cwr(model, logits, logits_max, gh, gw, image, text, thres_abs, reid):
    v = model.visual
    patch = v.patch
    grid = int(round((v.positional_embedding.shape[0] - 1) ** 0.5))
    size = grid * patch
    thres = logits.min() + thres_abs * (logits.max() - logits.min())
    for ccls in [i for i, val in enumerate(logits_max) if val > thres]:
        t = logits[:, ccls]
        t = t - t.min()
        t = t / t.max()
        mask = (t > 0.5).reshape(gh, gw)
        cols = np.where(np.any(mask.numpy(), axis=0))[0]
        rows = np.where(np.any(mask.numpy(), axis=1))[0]
        if cols.shape[0]:
            x1, x2 = cols[[0, -1]]
            y1, y2 = rows[[0, -1]]
            x2 += 1
            y2 += 1
        else:
            x1, x2, y1, y2 = 0, 0, 0, 0
        y2 = min(y2, gh - 1)
        x2 = min(x2, gw - 1)
        if x1 == x2 or y1 == y2:
            return logits_max
        m = mask[y1:y2, x1:x2].float()[None, None]
        m = F.interpolate(m, size=(grid, grid), mode="nearest").reshape(-1).bool()
        cut = image[:, :, y1 * patch:y2 * patch, x1 * patch:x2 * patch]
        cut = F.interpolate(cut, size=(size, size), mode="bilinear", align_corners=False)
        cls_attn = torch.zeros((grid * grid + 1, grid * grid + 1))
        for j in range(1, cls_attn.shape[1]):
            if not m[j - 1]:
                cls_attn[0, j] = -1000
        feats, _ = run_visual(model, cut, v.positional_embedding, lambda i, n: cls_attn)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        cur = (model.logit_scale.exp() * feats @ text.t())[:, 0, :].softmax(dim=-1).squeeze()
        logits_max[ccls] = 0.5 * logits_max[ccls] + (1 - 0.5) * cur[ccls]
        reid.append(ccls)
    return logits_max


@torch.no_grad()
def tag(model, path, text, n_classes, round_fp16=True, thres_abs=0.5):
    v = model.visual
    image, _, _ = ref.clipes_input(path, v.patch)
    h, w = image.shape[-2:]
    gh, gw = h // v.patch, w // v.patch
    grid = int(round((v.positional_embedding.shape[0] - 1) ** 0.5))
    if (gh, gw) == (grid, grid):
        pos = v.positional_embedding
    else:
        pos = ref.upsample_pos_emb(v.positional_embedding, (gh, gw), round_fp16)
    n_layers = len(v.transformer.resblocks)

    def eye_on_last(i, n):
        return (1 - torch.eye(n, n)) * float(-100) if i == n_layers - 1 else None

    feats, attns = run_visual(model, image, pos, eye_on_last)
    feats = feats / feats.norm(dim=-1, keepdim=True)
    attn_weight = [a[:, 1:, 1:] for a in attns]
    attn_vote = torch.stack(attn_weight, dim=0).squeeze()
    thres0 = torch.mean(attn_vote.reshape(attn_vote.shape[0], -1), dim=-1).reshape(attn_vote.shape[0], 1, 1)
    thres0 = thres0.repeat(1, attn_vote.shape[1], attn_vote.shape[2])
    attn_weight = torch.stack(attn_weight, dim=0)[8:-1]
    attn_cnt = torch.sum((attn_vote > thres0).float(), dim=0) >= 4
    attn_weight = torch.mean(attn_weight, dim=0)[0] * attn_cnt.float()
    logits = model.logit_scale.exp() * feats @ text.t()
    logits = logits[:, 1:, :].softmax(dim=-1)
    logits_coarse = logits.squeeze()
    logits = torch.matmul(attn_weight, logits).squeeze()
    logits = mask_attn(logits_coarse, logits, gh, gw, attn_weight)
    logits_max = torch.max(logits, dim=0)[0][:n_classes]
    local = logits_max.clone()
    reid = []
    logits_max = cwr(model, logits, logits_max, gh, gw, image, text, thres_abs, reid)
    return logits_max.numpy(), local.numpy(), reid


def labels_of(scores, thres_abs=0.5):
    """classify.py's --save_file rule: above min + t (max - min), else the argmax."""
    s = torch.from_numpy(scores)
    thr = s.min() + thres_abs * (s.max() - s.min())
    out = [i for i, v in enumerate(scores) if v > thr]
    return out if out else [int(np.argmax(scores))]


def main(spec_path, out_path):
    spec = json.load(open(spec_path))
    torch.set_num_threads(spec.get("threads", 2))
    model = ref.load_checkpoint(spec["model"])
    text = ref.zeroshot_classifier(model, CLASS_NAMES_VOC + BACKGROUND_CATEGORY_VOC, TEMPLATES)
    text = text / text.norm(dim=-1, keepdim=True)
    out = {"text": text.float()}
    for case in spec["cases"]:
        scores, local, reid = tag(model, case["image"], text, len(CLASS_NAMES_VOC), spec.get("round_fp16", True))
        cid = case["id"]
        out[f"{cid}.scores"] = torch.from_numpy(scores.astype(np.float32))
        out[f"{cid}.local"] = torch.from_numpy(local.astype(np.float32))
        out[f"{cid}.reid"] = torch.tensor(reid, dtype=torch.int64)
        out[f"{cid}.labels"] = torch.tensor(labels_of(scores, spec.get("threshold", 0.5)), dtype=torch.int64)
    save_file({k: v.contiguous() for k, v in out.items()}, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
