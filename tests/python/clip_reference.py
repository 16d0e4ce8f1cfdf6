"""Independent PyTorch reference for clipmask's tests.

OpenAI's CLIP architecture written with nn.MultiheadAttention (as in openai/CLIP model.py), and
CLIP-ES's pipeline as its public code runs it: PIL preprocessing; GradCAM through the
pytorch-grad-cam library itself (`grad-cam` on PyPI) with the glue CLIP-ES adds around it (its
target, reshape transform and forward_last_layer), once per label; CAA with boxes from OpenCV's
findContours/boundingRect and resizes through cv2.resize, as the original calls them; CLIP's
zero-shot protocol. `convert_weights` gives the fp16 state OpenAI's clip.load leaves on CUDA.
It shares no code with the Rust implementation.
"""
import importlib.util
import math
import os
from collections import OrderedDict

import cv2
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

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def encode_text(self, text):
        x = self.token_embedding(text).type(self.dtype) + self.positional_embedding.type(self.dtype)
        x = x.permute(1, 0, 2)
        for blk in self.transformer.resblocks:
            x, _ = blk(x)
        x = x.permute(1, 0, 2)
        x = self.ln_final(x).type(self.dtype)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


def convert_weights(model):
    """OpenAI's clip.model.convert_weights: what clip.load leaves on CUDA. Conv and Linear
    weights and biases, MultiheadAttention's packed projection, text_projection and visual.proj
    become fp16; LayerNorms, embeddings and logit_scale stay fp32."""

    def to_half(m):
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            m.weight.data = m.weight.data.half()
            if m.bias is not None:
                m.bias.data = m.bias.data.half()
        if isinstance(m, nn.MultiheadAttention):
            for attr in ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                         "in_proj_bias", "bias_k", "bias_v"]:
                t = getattr(m, attr)
                if t is not None:
                    t.data = t.data.half()
        for name in ["text_projection", "proj"]:
            t = getattr(m, name, None)
            if t is not None:
                t.data = t.data.half()

    model.apply(to_half)
    return model


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


def load_checkpoint(path, fp16=False):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        sd = torch.jit.load(path, map_location="cpu").state_dict()
    m = build_model(sd)
    return convert_weights(m) if fp16 else m


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
    x = v.conv1(x.type(model.dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
    x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
    return v.ln_pre(x).permute(1, 0, 2)  # LND


@torch.no_grad()
def zero_shot_probs(model, path, classnames, templates):
    v = model.visual
    res = v.patch * int(math.sqrt(v.positional_embedding.shape[0] - 1))
    x = encode_tokens(model, zero_shot_input(path, res), v.positional_embedding)
    for blk in v.transformer.resblocks:
        x, _ = blk(x)
    f = (v.ln_post(x[0]) @ v.proj).float()
    f = f / f.norm(dim=-1, keepdim=True)
    t = zeroshot_classifier(model, classnames, templates).float()
    return (model.logit_scale.exp() * f @ t.t()).softmax(dim=-1)[0], f[0]


# ---- CLIP-ES: GradCAM through pytorch-grad-cam, CAA through OpenCV -----------------------

def reshape_transform(tensor, height, width):
    """CLIP-ES's reshape transform: LND tokens -> (N, D, h, w) patch grid, class token dropped."""
    t = tensor.permute(1, 0, 2)
    grid = t[:, 1:, :].reshape(t.size(0), height, width, t.size(2))
    return grid.permute(0, 3, 1, 2)


class LastLayer(nn.Module):
    """CLIP-ES's `forward_last_layer` as a module for pytorch-grad-cam: block L on the stored
    block-L input, CLIP-ES's image feature (mean of ln_post over patch tokens, @ proj), cosine
    logits scaled by exp(logit_scale) and the softmax over the candidate texts.

    pytorch-grad-cam takes the CAM's target size from the input tensor, and CLIP-ES's vendored
    copy passes target_size=None (no resize). So the input given to the CAM is a dummy of the
    patch grid's size, which cv2.resize leaves unchanged; the tokens come from `set_input`."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.tokens = None
        self.text = None
        self.last_attn = None

    def set_input(self, tokens, text):
        self.tokens, self.text = tokens, text

    def forward(self, _dummy):
        v = self.clip.visual
        x, attn = v.transformer.resblocks[-1](self.tokens)
        self.last_attn = attn
        x = v.ln_post(x.permute(1, 0, 2))
        x = torch.mean(x[:, 1:, :], dim=1) @ v.proj
        image_features = x / x.norm(dim=1, keepdim=True)
        text_features = self.text / self.text.norm(dim=1, keepdim=True)
        # Python evaluates `a * b @ c` left to right: the scale multiplies the image feature.
        logits = self.clip.logit_scale.exp() * image_features @ text_features.t()
        return logits.softmax(dim=-1)


class ClipOutputTarget:
    """CLIP-ES's target: the probability of one candidate."""

    def __init__(self, category):
        self.category = category

    def __call__(self, model_output):
        if len(model_output.shape) == 1:
            return model_output[self.category]
        return model_output[:, self.category]


def make_grad_cam(layer_model, gh, gw):
    from pytorch_grad_cam import GradCAM

    class ClipesGradCAM(GradCAM):
        # Odd thing the original does: CLIP-ES's vendored base_cam casts the (fp16) weighted
        # map to float32 right after the ReLU ("#float16->32"), before the two min-max passes;
        # the PyPI release scales it in its own dtype. np.maximum(f32(cam), 0) equals
        # f32(np.maximum(cam, 0)), so casting here reproduces the original.
        def get_cam_image(self, *args, **kwargs):
            return super().get_cam_image(*args, **kwargs).astype(np.float32)

    # CLIP-ES's reshape transform takes the grid size; this release calls it with the tensor only.
    return ClipesGradCAM(model=layer_model, target_layers=[layer_model.clip.visual.transformer.resblocks[-1].ln_1],
                         reshape_transform=lambda t: reshape_transform(t, gh, gw))


def scoremap2bbox(scoremap, threshold):
    """CLIP-ES's utils.scoremap2bbox with multi_contour_eval=True, through OpenCV."""
    height, width = scoremap.shape
    img = np.expand_dims((scoremap * 255).astype(np.uint8), 2)
    _, thr = cv2.threshold(src=img, thresh=int(threshold * np.max(img)), maxval=255, type=cv2.THRESH_BINARY)
    contours = cv2.findContours(image=thr, mode=cv2.RETR_TREE, method=cv2.CHAIN_APPROX_SIMPLE)[0]
    if len(contours) == 0:
        # Odd thing the original does: a dummy [0, 0, 0, 0] box, which masks nothing.
        return [[0, 0, 0, 0]]
    boxes = []
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        # Odd thing the original does: the exclusive end is clipped to width-1 / height-1, so a
        # box touching the right or bottom edge loses its last column or row.
        boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
    return boxes


def caa_attention(attns, last_attn):
    """CLIP-ES's CAA affinity source: the head-averaged attention of the last 8 blocks (the
    kept blocks 1..L-1 and block L), class token dropped, averaged, in fp32."""
    aw = [a[:, 1:, 1:] for a in attns + [last_attn]]
    return torch.mean(torch.stack(aw, dim=0)[-8:], dim=0)[0].cpu().detach()


def caa_refine(attn_weight, grayscale_cam, gh, gw, box_threshold, ori_w, ori_h):
    """CLIP-ES's CAA for one label (generate_cams_voc12.py): boxes from the raw grid map, the
    Sinkhorn-normalised symmetric affinity squared and masked by the boxes, applied to the raw
    grid map, then one min-max pass and cv2.resize to the original size."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    attn_weight = attn_weight.float()
    mask = torch.zeros(gh, gw)
    for x0, y0, x1, y1 in scoremap2bbox(grayscale_cam, box_threshold):
        mask[y0:y1, x0:x1] = 1
    mask = mask.view(1, gh * gw)
    t = attn_weight / torch.sum(attn_weight, dim=0, keepdim=True)
    t = t / torch.sum(t, dim=1, keepdim=True)
    for _ in range(2):
        t = t / torch.sum(t, dim=0, keepdim=True)
        t = t / torch.sum(t, dim=1, keepdim=True)
    t = (t + t.transpose(1, 0)) / 2
    t = torch.matmul(t, t)
    t = t * mask
    refined = torch.matmul(t, torch.FloatTensor(grayscale_cam).view(-1, 1)).reshape(gh, gw)
    refined = refined.cpu().numpy().astype(np.float32)
    return scale_cam_image([refined], (ori_w, ori_h))[0]


def clipes_maps(model, path, label_ids, fg_text, bg_text, box_threshold=0.4, round_fp16=True):
    """CLIP-ES for one image file, as generate_cams_voc12.py runs it (input of clipes_input)."""
    x, ori_h, ori_w = clipes_input(path, model.visual.patch)
    return clipes_maps_input(model, x, ori_h, ori_w, label_ids, fg_text, bg_text, box_threshold, round_fp16)


def clipes_maps_input(model, x, ori_h, ori_w, label_ids, fg_text, bg_text, box_threshold=0.4,
                      round_fp16=True):
    """CLIP-ES on a preprocessed (1, 3, H, W) input whose sides are multiples of the patch:
    one GradCAM call (forward of block L and one backward) per label, CAA with the first
    call's block-L attention. Maps at the original size ori_h x ori_w."""
    v = model.visual
    H, W = x.shape[-2:]
    gh, gw = H // v.patch, W // v.patch
    blocks = list(v.transformer.resblocks)
    with torch.no_grad():
        tokens = encode_tokens(model, x, upsample_pos_emb(v.positional_embedding, (gh, gw), round_fp16))
        attns = []
        for blk in blocks[:-1]:
            tokens, a = blk(tokens)
            attns.append(a)
    text = torch.cat([fg_text[label_ids], bg_text], dim=0).to(model.dtype)
    layer_model = LastLayer(model)
    layer_model.set_input(tokens.detach(), text)
    cam = make_grad_cam(layer_model, gh, gw)
    dummy = torch.zeros(1, 1, gh, gw)
    raw_grid, raw_hi, ref_hi, probs, last_attn = [], [], [], None, None
    attn_weight = None
    try:
        for idx in range(len(label_ids)):
            grayscale_cam = cam(input_tensor=dummy, targets=[ClipOutputTarget(idx)])[0, :]
            if probs is None:
                probs = cam.outputs[0].detach().float().numpy()
            raw_grid.append(grayscale_cam)
            raw_hi.append(cv2.resize(grayscale_cam, (ori_w, ori_h)))
            if idx == 0:
                last_attn = layer_model.last_attn.detach()
                attn_weight = caa_attention(attns, last_attn)
            ref_hi.append(caa_refine(attn_weight, grayscale_cam, gh, gw, box_threshold, ori_w, ori_h))
    finally:
        cam.activations_and_grads.release()
    return {
        "raw": np.stack(raw_hi).astype(np.float32),
        "refined": np.stack(ref_hi).astype(np.float32),
        "raw_grid": np.stack(raw_grid).astype(np.float32),
        "attn": torch.stack([a[0] for a in attns + [last_attn]]).float().numpy(),
        "tokens": tokens.permute(1, 0, 2)[0].float().numpy(),
        "probs": probs.astype(np.float32),
    }


def labels_from_maps(maps, keys, alpha=1.0):
    bg = np.power(1 - np.max(maps, axis=0, keepdims=True), alpha)
    scores = np.concatenate([bg, maps], axis=0)
    ids = np.concatenate([[0], np.asarray(keys) + 1])
    return ids[np.argmax(scores, axis=0)].astype(np.uint8), scores
