"""Writes one random-weight CLIP (an OpenAI-layout model.safetensors from make_fixture.py) in the
layouts users download, for the layout tests:

  make_layouts.py FIXTURE_DIR OUT_DIR

  OUT/hf/            transformers' CLIPModel.save_pretrained: config.json (hidden_act quick_gelu)
                     + model.safetensors, the names and shapes transformers itself writes
  OUT/hf-gelu/       the same weights with hidden_act gelu
  OUT/openclip/      open_clip_model.safetensors (OpenAI names) + open_clip_config.json with
                     "quick_gelu": true (OpenAI/DFN/MetaCLIP style)
  OUT/openclip-gelu/ the same without quick_gelu (LAION/DataComp style: GELU)
  OUT/hf-bin/        save_pretrained(safe_serialization=False): config.json + pytorch_model.bin
  OUT/openclip-bin/  torch.save(state_dict) as open_clip_pytorch_model.bin (quick_gelu)
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel


def hf_config(sd, act):
    width = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    v_layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    t_width = sd["ln_final.weight"].shape[0]
    t_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    embed = sd["text_projection"].shape[1]
    return CLIPConfig(
        text_config=dict(vocab_size=sd["token_embedding.weight"].shape[0], hidden_size=t_width,
                         intermediate_size=4 * t_width, num_hidden_layers=t_layers, num_attention_heads=t_width // 64,
                         max_position_embeddings=sd["positional_embedding"].shape[0], hidden_act=act,
                         layer_norm_eps=1e-5, projection_dim=embed),
        vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=v_layers,
                           num_attention_heads=width // 64, image_size=patch * grid, patch_size=patch,
                           hidden_act=act, layer_norm_eps=1e-5, projection_dim=embed),
        projection_dim=embed)


def to_hf(sd):
    """OpenAI names -> transformers' CLIPModel names (q/k/v split from in_proj; projections as
    nn.Linear weights, i.e. transposed)."""
    out = {"logit_scale": sd["logit_scale"]}
    out["vision_model.embeddings.patch_embedding.weight"] = sd["visual.conv1.weight"]
    out["vision_model.embeddings.class_embedding"] = sd["visual.class_embedding"]
    out["vision_model.embeddings.position_embedding.weight"] = sd["visual.positional_embedding"]
    for a, b in [("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")]:
        for p in ["weight", "bias"]:
            out[f"vision_model.{a}.{p}"] = sd[f"visual.{b}.{p}"]
    out["visual_projection.weight"] = sd["visual.proj"].t().contiguous()
    out["text_model.embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = sd["positional_embedding"]
    for p in ["weight", "bias"]:
        out[f"text_model.final_layer_norm.{p}"] = sd[f"ln_final.{p}"]
    out["text_projection.weight"] = sd["text_projection"].t().contiguous()
    for src, dst in [("visual.transformer.resblocks", "vision_model.encoder.layers"),
                     ("transformer.resblocks", "text_model.encoder.layers")]:
        i = 0
        while f"{src}.{i}.ln_1.weight" in sd:
            s, d = f"{src}.{i}", f"{dst}.{i}"
            for p in ["weight", "bias"]:
                q, k, v = sd[f"{s}.attn.in_proj_{p}"].chunk(3, dim=0)
                out[f"{d}.self_attn.q_proj.{p}"], out[f"{d}.self_attn.k_proj.{p}"], out[f"{d}.self_attn.v_proj.{p}"] = q, k, v
                for a, b in [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]:
                    out[f"{d}.{a}.{p}"] = sd[f"{s}.{b}.{p}"]
            i += 1
    return {k: v.contiguous() for k, v in out.items()}


def main(fixture, out):
    sd = load_file(os.path.join(fixture, "model.safetensors"))
    for name, act in [("hf", "quick_gelu"), ("hf-gelu", "gelu")]:
        model = CLIPModel(hf_config(sd, act)).eval()
        missing, unexpected = model.load_state_dict(to_hf(sd), strict=False)
        # position_ids is a buffer transformers fills itself.
        assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
        d = os.path.join(out, name)
        shutil.rmtree(d, ignore_errors=True)
        model.save_pretrained(d, safe_serialization=True)
        if act == "quick_gelu":
            d = os.path.join(out, "hf-bin")
            shutil.rmtree(d, ignore_errors=True)
            model.save_pretrained(d, safe_serialization=False)
    for name, quick in [("openclip", True), ("openclip-gelu", None)]:
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        save_file(sd, os.path.join(d, "open_clip_model.safetensors"))
        cfg = {"model_cfg": {"embed_dim": sd["text_projection"].shape[1]}, "preprocess_cfg": {}}
        if quick is not None:
            cfg["model_cfg"]["quick_gelu"] = quick
        with open(os.path.join(d, "open_clip_config.json"), "w") as f:
            json.dump(cfg, f)
        if quick:
            b = os.path.join(out, "openclip-bin")
            os.makedirs(b, exist_ok=True)
            torch.save(sd, os.path.join(b, "open_clip_pytorch_model.bin"))
            shutil.copy(os.path.join(d, "open_clip_config.json"), b)


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1], sys.argv[2])
