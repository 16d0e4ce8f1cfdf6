"""The GPU check of issue 16, in one run: correctness of the CUDA path against the CPU, fp16
against fp32, and throughput against the straightforward PyTorch pipeline on the same GPU.

  gpu_check.py --out DIR [--dry-run] [--images N] [--bin PATH]

Steps (each result goes to DIR/gpu-check.json and a markdown section DIR/gpu-check.md):
1. A random-weight CLIP with ViT-B/16's dimensions (tiny with --dry-run), made here with
   tests/python/make_fixture.py, and synthetic photos at VOC's sizes (500x375, 375x500).
2. cuda vs cpu on the same 8 photos, fp32 with TF32 off (NVIDIA_TF32_OVERRIDE=0): maps within
   1e-4, labels >= 99.9 % identical.
3. fp16 on CUDA against fp32 on CUDA.
4. images/s of `generate` for maps and for maps + CRF, fp16 and fp32, and of the PyTorch
   pipeline (per-label backward, as the original) on the same device, while nvidia-smi samples
   GPU memory and utilisation; CPU use from the process times.
With --dry-run every step runs on the CPU (the device is "cpu" for both sides), so CI proves
the script itself.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
import clip_reference as ref  # noqa: E402

CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
           "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
           "tvmonitor"]


def make_images(d, n, dry):
    """Smooth random photos with VOC's two common sizes (smaller for the dry run)."""
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = {}
    sizes = [(160, 120), (120, 160)] if dry else [(500, 375), (375, 500)]
    for i in range(n):
        w, h = sizes[i % 2]
        base = rng.random((h // 25 + 2, w // 25 + 2, 3)) * 255
        img = Image.fromarray(base.astype(np.uint8)).resize((w, h), Image.BICUBIC)
        ident = f"im{i:04d}"
        img.save(os.path.join(d, ident + ".jpg"), quality=92)
        k = 1 + i % 3
        labels[ident] = [CLASSES[(i * 7 + j * 5) % 20] for j in range(k)]
    json.dump(labels, open(os.path.join(d, "..", "labels.json"), "w"))
    return labels


class Sampler:
    """nvidia-smi samples (memory used MiB, utilisation %) every 0.2 s while running."""

    def __init__(self, enabled):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.samples = []
        self._stop = threading.Event()

    def __enter__(self):
        if self.enabled:
            self._t = threading.Thread(target=self._run, daemon=True)
            self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,utilization.gpu",
                                      "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=5).stdout
                mem, util = [float(x) for x in out.strip().split(",")[:2]]
                self.samples.append((mem, util))
            except Exception:
                pass
            time.sleep(0.2)

    def __exit__(self, *a):
        self._stop.set()

    def summary(self):
        if not self.samples:
            return {"peak_gpu_mem_mib": None, "gpu_busy_fraction": None}
        return {"peak_gpu_mem_mib": max(m for m, _ in self.samples),
                "gpu_busy_fraction": float(np.mean([u > 0 for _, u in self.samples])),
                "mean_gpu_util_pct": float(np.mean([u for _, u in self.samples]))}


def run_timed(cmd, env=None, sample=False):
    """Runs cmd; returns (wall s, CPU s of the children, sampler summary)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.time()
    with Sampler(sample) as s:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, s.summary()


def generate(args, model, images, labels, out, device, precision, extra=(), env=None, sample=False):
    summary = os.path.join(out + ".summary.json")
    cmd = [args.bin, "generate", "--model", model, "--config", "voc12", "--device", device,
           "--precision", precision, "--images", images, "--labels", labels, "--out", out, "--overwrite",
           "--summary-json", summary] + list(extra)
    wall, cpu, gpu = run_timed(cmd, env=env, sample=sample)
    s = json.load(open(summary))
    # images/s over the run itself (model load and text features excluded, as for the baseline).
    return {"wall_s": wall, "cpu_s": cpu, "cpu_cores_busy": cpu / wall, "images_per_s": s["images_per_s"],
            "done": s["done"], "failed": s["failed"], "stage_images_per_s": s["stage_images_per_s"],
            "batch_size": s["batch_size"], **gpu}


def compare(a_dir, b_dir, ids):
    d_raw = d_ref = 0.0
    same = total = 0
    for i in ids:
        a = np.load(os.path.join(a_dir, "cams", i + ".npz"))
        b = np.load(os.path.join(b_dir, "cams", i + ".npz"))
        d_raw = max(d_raw, float(np.abs(a["raw_cams"] - b["raw_cams"]).max()))
        d_ref = max(d_ref, float(np.abs(a["cams"] - b["cams"]).max()))
        ma = np.array(Image.open(os.path.join(a_dir, "masks", i + ".png")))
        mb = np.array(Image.open(os.path.join(b_dir, "masks", i + ".png")))
        same += int((ma == mb).sum())
        total += ma.size
    return {"raw_max_diff": d_raw, "refined_max_diff": d_ref, "labels_identical": same / max(total, 1)}


def baseline(model_path, images, labels, ids, device, fp16, box_threshold=0.4):
    """The straightforward PyTorch CLIP-ES pipeline: per label, block L forward + one backward
    (as the original's GradCAM loop), CAA with OpenCV boxes, argmax; plain autograd (no
    pytorch-grad-cam on the device machine). Returns images/s over `ids` (model load excluded)."""
    import cv2
    cfg = json.load(open(os.path.join(ROOT, "configs/voc12.json")))
    model = ref.load_checkpoint(model_path, fp16=fp16)
    names = [c["name"] for c in cfg["classes"]]
    prompts = [c.get("prompt", c["name"]) for c in cfg["classes"]]
    # Text features on the CPU (the reference's tokenizer makes CPU tensors), then the model moves.
    with torch.no_grad():
        fg = ref.zeroshot_classifier(model, prompts, cfg["templates"]).to(device)
        bg = ref.zeroshot_classifier(model, cfg["background_words"], cfg["templates"]).to(device)
    model = model.to(device)
    v = model.visual
    blocks = list(v.transformer.resblocks)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.time()
    for i in ids:
        x, h, w = ref.clipes_input(os.path.join(images, i + ".jpg"), v.patch)
        x = x.to(device)
        gh, gw = x.shape[-2] // v.patch, x.shape[-1] // v.patch
        keys = [names.index(n) for n in dict.fromkeys(labels[i])]
        # The reference makes some tensors without a device (the class token's zeros).
        torch.set_default_device(device)
        with torch.no_grad():
            pos = ref.upsample_pos_emb(v.positional_embedding.float().cpu(), (gh, gw)).to(device)
            tokens = ref.encode_tokens(model, x, pos)
            attns = []
            for blk in blocks[:-1]:
                tokens, a = blk(tokens)
                attns.append(a)
        text = torch.cat([fg[keys], bg], 0).to(model.dtype)
        text = text / text.norm(dim=-1, keepdim=True)
        maps = []
        last = None
        for k in range(len(keys)):
            blk = blocks[-1]
            a_in = blk.ln_1(tokens).detach().requires_grad_(True)
            y, attn = blk.attn(a_in, a_in, a_in, need_weights=True, average_attn_weights=True)
            y = tokens + y
            y = y + blk.mlp(blk.ln_2(y))
            feat = v.ln_post(y.permute(1, 0, 2)[:, 1:]).mean(1) @ v.proj
            feat = feat / feat.norm(dim=-1, keepdim=True)
            probs = (model.logit_scale.exp() * feat @ text.t()).softmax(-1)
            probs[0, k].backward()
            g = a_in.grad.permute(1, 0, 2)[0, 1:].float()
            act = a_in.detach().permute(1, 0, 2)[0, 1:].float()
            cam = torch.relu((g.mean(0) * act).sum(-1)).reshape(gh, gw).cpu().numpy()
            cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-7)
            maps.append(cam)
            last = attn.detach()
        with torch.no_grad():
            aw = torch.stack([a[0, 1:, 1:].float() for a in attns[-7:]] + [last[0, 1:, 1:].float()]).mean(0)
            t = aw / aw.sum(0, keepdim=True)
            t = t / t.sum(1, keepdim=True)
            for _ in range(2):
                t = t / t.sum(0, keepdim=True)
                t = t / t.sum(1, keepdim=True)
            t = (t + t.t()) / 2
            t = t @ t
            out = []
            for cam in maps:
                u8 = (cam * 255).astype(np.uint8)
                _, th = cv2.threshold(u8, int(box_threshold * u8.max()), 255, cv2.THRESH_BINARY)
                cnts, _ = cv2.findContours(th, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
                mask = torch.zeros(gh, gw, device=device)
                for c in cnts:
                    x0, y0, bw, bh = cv2.boundingRect(c)
                    mask[y0:y0 + bh, x0:x0 + bw] = 1
                r = (t * mask.view(1, -1)) @ torch.from_numpy(cam).to(device).view(-1, 1)
                r = r.view(1, 1, gh, gw)
                r = torch.nn.functional.interpolate(r, (h, w), mode="bilinear", align_corners=False)[0, 0]
                out.append((r - r.min()) / (r.max() - r.min() + 1e-7))
            m = torch.stack(out)
            labels_map = torch.cat([1 - m.max(0, keepdim=True)[0], m]).argmax(0).to(torch.uint8).cpu().numpy()
            del labels_map
        torch.set_default_device("cpu")
    sync()
    return len(ids) / (time.time() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true", help="CPU only, tiny model (proves the script in CI)")
    p.add_argument("--images", type=int, default=0, help="images for the throughput runs (default 200; 8 dry)")
    p.add_argument("--bin", default=os.path.join(ROOT, "target/release/clipmask"))
    args = p.parse_args()
    dry = args.dry_run
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible; use --dry-run on a CPU machine")
    t_start = time.time()
    model_dir = os.path.join(out, "model")
    size = "tiny" if dry else "b16"
    subprocess.run([sys.executable, os.path.join(ROOT, "tests/python/make_fixture.py"), model_dir, "--size", size],
                   check=True, capture_output=True)
    model = os.path.join(model_dir, "model.safetensors")
    n = args.images or (8 if dry else 200)
    data = os.path.join(out, "data")
    labels = make_images(os.path.join(data, "images"), max(n, 8), dry)
    images, labels_path = os.path.join(data, "images"), os.path.join(data, "labels.json")
    ids = sorted(labels)
    # The 8 photos of the correctness checks.
    small = os.path.join(data, "eight")
    os.makedirs(small, exist_ok=True)
    for i in ids[:8]:
        shutil.copy(os.path.join(images, i + ".jpg"), small)
    res = {"device": device, "dry_run": dry, "model": f"random-weight CLIP, {size}", "images": n,
           "gpu": torch.cuda.get_device_name(0) if not dry else None, "cpu_cores": os.cpu_count()}

    # 2. cuda vs cpu, fp32, TF32 off.
    env = dict(os.environ, NVIDIA_TF32_OVERRIDE="0")
    r = os.path.join(out, "runs")
    generate(args, model, small, labels_path, os.path.join(r, "cpu-fp32"), "cpu", "fp32", ["--save-cams"], env)
    generate(args, model, small, labels_path, os.path.join(r, "dev-fp32"), device, "fp32", ["--save-cams"], env)
    res["cuda_vs_cpu_fp32"] = compare(os.path.join(r, "cpu-fp32"), os.path.join(r, "dev-fp32"), ids[:8])
    # 3. fp16 on the device against fp32 on the device.
    generate(args, model, small, labels_path, os.path.join(r, "dev-fp16"), device, "fp16", ["--save-cams"])
    res["fp16_vs_fp32"] = compare(os.path.join(r, "dev-fp32"), os.path.join(r, "dev-fp16"), ids[:8])

    # 4. Throughput.
    thr = {}
    for precision in ["fp16", "fp32"]:
        for crf in [False, True]:
            name = f"{precision}{'-crf' if crf else ''}"
            thr[name] = generate(args, model, images, labels_path, os.path.join(r, "tp-" + name), device, precision,
                                 ["--crf"] if crf else [], sample=not dry)
    res["clipmask"] = thr
    base = {}
    for precision in ["fp16", "fp32"]:
        m = min(len(ids), 8 if dry else 40)
        base[precision] = baseline(os.path.join(model_dir, "model.pt"), images, labels, ids[:m], device,
                                   precision == "fp16")
    res["pytorch_baseline_images_per_s"] = base
    res["ratio_maps"] = {p: thr[p]["images_per_s"] / base[p] for p in base}
    res["seconds"] = time.time() - t_start
    res["checks"] = {
        "cuda_vs_cpu_maps_le_1e-4": res["cuda_vs_cpu_fp32"]["refined_max_diff"] <= 1e-4
        and res["cuda_vs_cpu_fp32"]["raw_max_diff"] <= 1e-4,
        "cuda_vs_cpu_labels_ge_99.9": res["cuda_vs_cpu_fp32"]["labels_identical"] >= 0.999,
    }
    json.dump(res, open(os.path.join(out, "gpu-check.json"), "w"), indent=1)

    def f(v, fmt="{:.2f}"):
        return "n/a" if v is None else fmt.format(v)
    c = res["cuda_vs_cpu_fp32"]
    h = res["fp16_vs_fp32"]
    md = [f"## {'Dry run (CPU)' if dry else 'GPU: ' + str(res['gpu'])}, `make gpu-check`",
          "",
          f"Random-weight CLIP ({size}), synthetic photos at VOC sizes; {n} images for throughput; "
          f"{os.cpu_count()} CPU cores; measured {time.strftime('%Y-%m-%d')} in {res['seconds']:.0f} s.",
          "",
          f"- {device} vs cpu, fp32 (TF32 off), 8 photos: raw maps max |diff| {c['raw_max_diff']:.1e}, refined "
          f"{c['refined_max_diff']:.1e}; labels {100 * c['labels_identical']:.3f} % identical.",
          f"- fp16 vs fp32 on {device}: raw max |diff| {h['raw_max_diff']:.1e}, refined {h['refined_max_diff']:.1e}; "
          f"labels {100 * h['labels_identical']:.2f} % identical.",
          "",
          "| run | images/s | vs PyTorch pipeline | batch | stage images/s (model / write) | peak GPU MiB | GPU busy | CPU cores busy |",
          "|---|---|---|---|---|---|---|---|"]
    for name, t in thr.items():
        prec = name.split("-")[0]
        st = t["stage_images_per_s"]
        md.append(f"| generate {name} | {t['images_per_s']:.2f} | {t['images_per_s'] / base[prec]:.1f}x | "
                  f"{t['batch_size']} | {f(st.get('model'))} / {f(st.get('write'))} | "
                  f"{f(t.get('peak_gpu_mem_mib'), '{:.0f}')} | {f(t.get('gpu_busy_fraction'))} | "
                  f"{t['cpu_cores_busy']:.1f} |")
    for prec, v in base.items():
        md.append(f"| PyTorch pipeline {prec} (per-label backward) | {v:.2f} | 1.0x | 1 | | | | |")
    open(os.path.join(out, "gpu-check.md"), "w").write("\n".join(md) + "\n")
    print("\n".join(md))
    print(json.dumps(res["checks"]))


if __name__ == "__main__":
    main()
