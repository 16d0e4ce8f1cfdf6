"""The device check (issue 16; made truthful by issue 26 §3), in one run: correctness of the CUDA
path against the CPU, fp16 against fp32, and throughput against the straightforward PyTorch
pipeline on the same GPU.

  gpu_check.py --out DIR [--dry-run] [--images N] [--correct N] [--baseline-images N]
               [--size tiny|b16] [--bin PATH] [--work DIR] [--keep-work] [--budget-s S]

Defaults: on the device 200 throughput images, 8 correctness images, 40 for the PyTorch
pipeline, ViT-B/16 dimensions, a 300 s budget (no step starts after it; about 3 minutes are
expected on one H200); --dry-run: 24, 8, 4, tiny, 210 s (about 110 s on 2 busy CPU cores).

Only gpu-check.json and gpu-check.md are written under DIR (the device tool brings back a few
files only); the model, the images and the runs go to a scratch directory (--work, default a
new temporary directory, removed at the end unless --keep-work).

Steps, each wrapped: an exception, a non-zero exit or a wrong image count becomes an entry of
"errors" in the report and the next step runs; the report is rewritten after every step, so a
run killed from outside still leaves one. Exit status: 0 when every step ran and every check
passed, 1 otherwise (the report says which).
1. A random-weight CLIP with ViT-B/16's dimensions (tiny with --dry-run) and logit scale 10,
   the well-conditioned regime of the parity tests (tests/python/make_fixture.py): with
   OpenAI's 100 random weights give label probabilities ~1e-13 and GradCAM of those is noise
   (cuda vs cpu then "fails" at 99.6 % labels). Synthetic photos at VOC's sizes (500x375,
   375x500; 160x120 with --dry-run).
2. Correctness on the first --correct images (8), which have their own labels file so that
   only their ids run: cuda vs cpu, fp32 with TF32 off (NVIDIA_TF32_OVERRIDE=0), against
   targets.md (raw <= 1e-5, refined <= 1e-3 at any pixel and <= 1e-5 on average, labels >=
   99.9 % identical); fp16 on the device against fp32 on the device. The label probabilities
   of these images (the GradCAM targets, computed here in fp32 with the reference model and
   clipmask's own text features) are recorded: the range the check covers.
3. images/s of `generate` over the throughput set (--images, larger than the correctness set
   also in the dry run): maps in fp16 at batch 8 and 32 and fp32 at batch 8; maps + CRF with
   the CPU CRF (`--crf-device cpu`) at the same settings, and with the GPU CRF (`--crf-device
   cuda`; `tensor-cpu`, the same tensor code on the CPU, in the dry run) in fp16 at batch 8 and
   32: "gpu_crf" holds its images/s against the CPU CRF's, and its masks against the CPU
   CRF's (labels >= 99.9 % identical, a check); per-stage images/s
   from the run's --summary-json; nvidia-smi samples GPU memory and utilisation; CPU use from
   the process times. One more fp16 run with --max-gpu-mem 1K must run every input alone
   (the summary's model_batches). The dry run's throughput runs take the CUDA formulation
   (CLIPMASK_FORMULATION=fast: fused attention, batched kernels) on the CPU, so CI runs it.
4. The PyTorch pipeline (per-label backward, as the original) on the same device, fp16 and fp32,
   on at most --baseline-images images.
With --dry-run every step runs on the CPU (the device is "cpu" for both sides), on the same code
path with small sizes, so CI proves the script itself. The device machine has python3 with
torch, numpy, Pillow, OpenCV and safetensors but not ftfy, regex, OpenAI's clip package or
pytorch-grad-cam: those are made unimportable here, in the dry run too (ABSENT_ON_DEVICE).
"""
import importlib.abc
import sys


# Python packages the device machine does not have. Importing one raises ModuleNotFoundError
# here as well, so the dry run fails where the device run would. (The text features come from
# clipmask's own cache instead of OpenAI's tokenizer, which needs ftfy and regex.)
ABSENT_ON_DEVICE = ("ftfy", "regex", "clip", "pytorch_grad_cam", "ttach", "torchvision", "pydensecrf")


class _AbsentOnDevice(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT_ON_DEVICE:
            raise ModuleNotFoundError(f"No module named {name!r} (gpu_check: not installed on the device machine)",
                                      name=name)
        return None


sys.meta_path.insert(0, _AbsentOnDevice())

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))

CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
           "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
           "tvmonitor"]
# exp(logit_scale) of the fixture: 10 is the well-conditioned regime (present labels at
# p ~ 0.005-0.1, as with real CLIP); parity on 100 with random weights measures rounding noise.
LOGIT_SCALE = 10.0
# The smallest label probability for the fixture to count as well-conditioned (as parity.rs).
WELL_CONDITIONED_MIN_P = 1e-4
# targets.md, fp32 CPU vs CUDA with TF32 off.
RAW_MAX = 1e-5
REFINED_MAX = 1e-3
REFINED_MEAN = 1e-5
LABELS_MIN = 0.999
# Where the dense CRF runs in `generate --crf` (`--crf-device`): the CPU CRF (writer threads,
# one per core) and the GPU CRF (the tensor CRF on the device; in the dry run the same tensor
# code on the CPU, `tensor-cpu`). The GPU CRF runs at these settings only (fp16, as users run
# the GPU), each compared with the CPU CRF at the same settings.
CPU_CRF = "cpu"
GPU_CRF_SETTINGS = [("fp16", 8), ("fp16", 32)]


class StepFailed(Exception):
    """A step's failure with details for the report (command, counts, stderr tail, failures)."""

    def __init__(self, msg, details=None):
        super().__init__(msg)
        self.details = details or {}


def make_images(d, n, small):
    """Smooth random photos with VOC's two common sizes (smaller for the tiny model); labels by id."""
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = {}
    sizes = [(160, 120), (120, 160)] if small else [(500, 375), (375, 500)]
    for i in range(n):
        w, h = sizes[i % 2]
        base = rng.random((h // 25 + 2, w // 25 + 2, 3)) * 255
        img = Image.fromarray(base.astype(np.uint8)).resize((w, h), Image.BICUBIC)
        ident = f"im{i:04d}"
        img.save(os.path.join(d, ident + ".jpg"), quality=92)
        k = 1 + i % 3
        labels[ident] = [CLASSES[(i * 7 + j * 5) % 20] for j in range(k)]
    return labels


def nvidia_smi(query):
    """One nvidia-smi --query-gpu row for GPU 0 as a list of strings, or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", "0"],
                           capture_output=True, text=True, timeout=20)
        if r.returncode != 0:
            return None
        return [x.strip() for x in r.stdout.strip().splitlines()[0].split(",")]
    except Exception:
        return None


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
            row = nvidia_smi("memory.used,utilization.gpu")
            try:
                self.samples.append((float(row[0]), float(row[1])))
            except Exception:
                pass
            time.sleep(0.2)

    def __exit__(self, *a):
        self._stop.set()

    def summary(self):
        if not self.samples:
            return {"peak_gpu_mem_mib": None, "gpu_busy_fraction": None, "mean_gpu_util_pct": None}
        return {"peak_gpu_mem_mib": max(m for m, _ in self.samples),
                "gpu_busy_fraction": float(np.mean([u > 0 for _, u in self.samples])),
                "mean_gpu_util_pct": float(np.mean([u for _, u in self.samples]))}


def finite(v):
    """The report with NaN and infinities as strings (strict JSON readers reject them)."""
    if isinstance(v, float) and not np.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite(x) for x in v]
    return v


def tail(s, n=3000):
    s = s or ""
    return s[-n:]


class Check:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        self.work = os.path.abspath(args.work) if args.work else tempfile.mkdtemp(prefix="clipmask-gpu-check-")
        os.makedirs(self.work, exist_ok=True)
        self.device = "cpu" if self.dry else "cuda"
        self.size = args.size or ("tiny" if self.dry else "b16")
        self.n = args.images or (24 if self.dry else 200)
        self.n_correct = args.correct
        self.n_base = args.baseline_images or (4 if self.dry else 40)
        self.budget = args.budget_s or (210 if self.dry else 300)
        self.t0 = time.time()
        self.model_dir = os.path.join(self.work, "model")
        self.model = os.path.join(self.model_dir, "model.safetensors")
        self.images = os.path.join(self.work, "data", "images")
        self.labels_all = os.path.join(self.work, "data", "labels.json")
        self.labels_correct = os.path.join(self.work, "data", "labels-correct.json")
        self.runs = os.path.join(self.work, "runs")
        self.cache = os.path.join(self.work, "cache")
        self.labels = {}
        self.ids = []
        self.text = {}  # precision -> clipmask's text-feature cache file written by that run
        self.res = {
            "dry_run": self.dry, "device": self.device, "finished": False, "current_step": None,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "model": f"random-weight CLIP, {self.size}, logit scale {LOGIT_SCALE:g}",
            "logit_scale": LOGIT_SCALE,
            "correctness_images": self.n_correct, "throughput_images": self.n, "baseline_images": None,
            "budget_s": self.budget, "work_dir": self.work,
            "env": {}, "fixture": {}, "runs": {}, "cuda_vs_cpu_fp32": None, "fp16_vs_fp32": None,
            "label_probabilities": None, "clipmask": {},
            "crf_devices": {"cpu": CPU_CRF, "gpu": self.gpu_crf_device()},
            "gpu_crf": {"device": self.gpu_crf_device(), "images_per_s": None, "cpu_crf_images_per_s": None,
                        "vs_cpu_crf": None, "labels_identical_vs_cpu_crf": None},
            "pytorch_baseline_images_per_s": {}, "ratio_maps": {}, "checks": {},
            "steps": [], "errors": [],
        }

    def gpu_crf_device(self):
        """`--crf-device` of the GPU CRF rows: cuda, or its tensor code on the CPU when dry."""
        return "tensor-cpu" if self.dry else "cuda"

    # ---- bookkeeping -----------------------------------------------------------------------

    def elapsed(self):
        return time.time() - self.t0

    def timeout(self, cap):
        """A subprocess's timeout: `cap`, and never far past the budget."""
        return max(20.0, min(cap, self.budget + 45 - self.elapsed()))

    def step(self, name, fn, store=None, always=False):
        """Runs fn(); its result goes to store(result). Any failure becomes an error entry. Past
        the time budget the step is skipped (an error entry too) unless `always`."""
        entry = {"step": name, "status": None, "seconds": None}
        self.res["steps"].append(entry)
        if self.elapsed() > self.budget and not always:
            entry["status"] = "skipped"
            self.res["errors"].append({"step": name, "error": f"skipped: the time budget of {self.budget:.0f} s "
                                                              f"was spent ({self.elapsed():.0f} s)"})
            self.write_report()
            return None
        self.res["current_step"] = name
        self.write_report()
        t = time.time()
        print(f"[gpu-check {self.elapsed():6.1f} s] {name} ...", file=sys.stderr, flush=True)
        try:
            v = fn()
            entry["status"] = "ok"
            if store is not None:
                store(v)
            return v
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # SystemExit from argparse in the fixture included
            entry["status"] = "error"
            err = {"step": name, "error": f"{type(e).__name__}: {e}"[:4000],
                   "traceback": traceback.format_exc()[-3000:]}
            if isinstance(e, StepFailed):
                err["details"] = e.details
            self.res["errors"].append(err)
            print(f"[gpu-check] {name} FAILED: {err['error'][:500]}", file=sys.stderr, flush=True)
            return None
        finally:
            entry["seconds"] = round(time.time() - t, 2)
            self.res["current_step"] = None
            self.res["seconds"] = round(self.elapsed(), 1)
            self.write_report()

    def write_report(self):
        """gpu-check.json and gpu-check.md under OUT, atomically; never raises."""
        try:
            tmp = os.path.join(self.out, ".gpu-check.json.tmp")
            with open(tmp, "w") as f:
                json.dump(finite(self.res), f, indent=1, default=str)
            os.replace(tmp, os.path.join(self.out, "gpu-check.json"))
        except Exception as e:
            print(f"[gpu-check] cannot write gpu-check.json: {e}", file=sys.stderr)
        try:
            md = self.markdown()
        except Exception:
            md = ("## gpu-check: the markdown report failed to render; see gpu-check.json\n\n```\n"
                  + traceback.format_exc()[-2000:] + "\n```\n")
        try:
            tmp = os.path.join(self.out, ".gpu-check.md.tmp")
            with open(tmp, "w") as f:
                f.write(md)
            os.replace(tmp, os.path.join(self.out, "gpu-check.md"))
        except Exception as e:
            print(f"[gpu-check] cannot write gpu-check.md: {e}", file=sys.stderr)

    # ---- steps -----------------------------------------------------------------------------

    def environment(self):
        e = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
             "cuda_available_to_torch": torch.cuda.is_available(), "cpu_cores": os.cpu_count(),
             "bin": self.args.bin, "ld_library_path": os.environ.get("LD_LIBRARY_PATH")}
        row = nvidia_smi("name,driver_version,memory.total")
        e["nvidia_smi"] = {"name": row[0], "driver_version": row[1], "memory_total_mib": row[2]} if row else None
        self.res["env"] = e
        # The binary runs at all (libtorch found) and what it sees.
        r = subprocess.run([self.args.bin, "--version"], capture_output=True, text=True, timeout=60)
        e["clipmask_version"] = (r.stdout + r.stderr).strip()[-2000:]
        if r.returncode != 0:
            raise StepFailed(f"{self.args.bin} --version exited {r.returncode}", {"stderr": tail(r.stderr)})
        if not self.dry and not torch.cuda.is_available():
            raise StepFailed("no CUDA device visible to torch (use --dry-run on a CPU machine); the device steps "
                             "will fail too")
        return e

    def fixture(self):
        import make_fixture
        argv = sys.argv
        sys.argv = ["make_fixture.py", self.model_dir, "--size", self.size, "--seed", "0",
                    "--logit-scale", str(LOGIT_SCALE)]
        try:
            make_fixture.main()
        finally:
            sys.argv = argv
        from safetensors import safe_open
        with safe_open(self.model, "pt") as f:
            ls = float(f.get_tensor("logit_scale").exp())
        if abs(ls - LOGIT_SCALE) > 1e-3 * LOGIT_SCALE:
            raise StepFailed(f"the fixture's exp(logit_scale) is {ls}, not {LOGIT_SCALE}")
        return {"size": self.size, "seed": 0, "exp_logit_scale": ls, "file": "model.safetensors"}

    def make_data(self):
        labels = make_images(self.images, max(self.n, self.n_correct), self.size == "tiny")
        ids = sorted(labels)
        with open(self.labels_all, "w") as f:
            json.dump({i: labels[i] for i in ids[:self.n]}, f)
        # The correctness subset has its own labels file: with --images pointing at all the
        # photos, only these ids run (a labels file naming more ids than there are photos makes
        # every extra id a failure).
        with open(self.labels_correct, "w") as f:
            json.dump({i: labels[i] for i in ids[:self.n_correct]}, f)
        self.labels = labels
        self.ids = ids
        return {"throughput_ids": min(self.n, len(ids)), "correctness_ids": ids[:self.n_correct],
                "sizes": sorted({Image.open(os.path.join(self.images, i + ".jpg")).size for i in ids[:4]})}

    def run_timed(self, cmd, env, sample, cap):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.time()
        timed_out = False
        with Sampler(sample) as s:
            try:
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=self.timeout(cap))
                rc, so, se = r.returncode, r.stdout, r.stderr
            except subprocess.TimeoutExpired as e:
                timed_out = True
                rc = None
                so = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
                se = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        wall = time.time() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return {"rc": rc, "timed_out": timed_out, "stdout": so, "stderr": se, "wall_s": wall, "cpu_s": cpu,
                "gpu": s.summary()}

    def generate(self, name, labels, device, precision, extra=(), tf32_off=False, sample=False, expect=None,
                 cap=240, section=None, meta=None, out_name=None, formulation=None):
        """One `generate` run over self.images with `labels`; expects `expect` images done and
        none failed. Returns the run's figures (summary fields included), and stores them in
        self.res[section][name] also when the run fails (with "error")."""
        out = os.path.join(self.runs, out_name or name)
        summary = out + ".summary.json"
        if os.path.exists(summary):
            os.remove(summary)
        cmd = [self.args.bin, "generate", "--model", self.model, "--config", "voc12", "--device", device,
               "--precision", precision, "--images", self.images, "--labels", labels, "--out", out, "--overwrite",
               "--summary-json", summary] + list(extra)
        env = dict(os.environ, CLIPMASK_CACHE=self.cache)
        if tf32_off:
            env["NVIDIA_TF32_OVERRIDE"] = "0"
        if formulation:
            # The CUDA formulation (fused attention, batched kernels) also on the CPU (dry run).
            env["CLIPMASK_FORMULATION"] = formulation
        text_dir = os.path.join(self.cache, "text")
        text_before = set(os.listdir(text_dir)) if os.path.isdir(text_dir) else set()
        r = self.run_timed(cmd, env, sample, cap)
        rec = {**(meta or {}), "device": device, "precision": precision, "args": list(extra), "wall_s": r["wall_s"],
               "cpu_s": r["cpu_s"], "cpu_cores_busy": r["cpu_s"] / max(r["wall_s"], 1e-9), "rc": r["rc"], **r["gpu"]}
        s = None
        if os.path.exists(summary):
            try:
                s = json.load(open(summary))
            except Exception:
                s = None
        if s is not None:
            # images/s over the run itself (model load and text features excluded, as for the baseline).
            for k in ("total", "done", "failed", "skipped", "seconds", "images_per_s", "stage_images_per_s",
                      "stages", "batch_size", "model_batches", "peak_rss_mib"):
                rec[k] = s.get(k)
            st = {k: v for k, v in (s.get("stage_images_per_s") or {}).items() if k in ("decode", "model", "write")}
            rec["slowest_stage"] = min(st, key=st.get) if st else None
        text_after = set(os.listdir(text_dir)) if os.path.isdir(text_dir) else set()
        new = sorted(text_after - text_before)
        if new and precision not in self.text:
            self.text[precision] = os.path.join(text_dir, new[0])
        problems = []
        if r["timed_out"]:
            problems.append(f"timed out after {r['wall_s']:.0f} s")
        elif r["rc"] != 0:
            problems.append(f"exit status {r['rc']}")
        if s is None:
            problems.append("no summary JSON")
        elif expect is not None and (s.get("done") != expect or s.get("failed")):
            problems.append(f"{s.get('done')} images done and {s.get('failed')} failed, expected {expect} and 0")
        if problems:
            rec["error"] = "; ".join(problems)
        if section is not None:
            self.res[section][name] = rec
        if problems:
            details = {"command": " ".join(cmd), "stderr_tail": tail(r["stderr"]),
                       "stdout_tail": tail(r["stdout"], 1000)}
            fj = os.path.join(out, "failures.jsonl")
            if os.path.exists(fj):
                lines = open(fj).read().splitlines()
                details["failures_count"] = len(lines)
                details["failures_head"] = lines[:5]
            raise StepFailed(f"generate {name}: " + "; ".join(problems), details)
        return rec

    def compare(self, a, b, ids):
        if not ids:
            raise StepFailed("no correctness images to compare")
        a_dir, b_dir = os.path.join(self.runs, a), os.path.join(self.runs, b)
        d_raw = d_ref = 0.0
        s_raw = s_ref = 0.0
        n_px = 0
        same = total = 0
        for i in ids:
            x = np.load(os.path.join(a_dir, "cams", i + ".npz"))
            y = np.load(os.path.join(b_dir, "cams", i + ".npz"))
            if not np.array_equal(x["keys"], y["keys"]):
                raise StepFailed(f"{i}: keys differ: {x['keys']} vs {y['keys']}")
            raw = np.abs(x["raw_cams"].astype(np.float64) - y["raw_cams"])
            ref = np.abs(x["cams"].astype(np.float64) - y["cams"])
            d_raw, d_ref = max(d_raw, float(raw.max())), max(d_ref, float(ref.max()))
            s_raw += float(raw.sum())
            s_ref += float(ref.sum())
            n_px += raw.size
            ma = np.array(Image.open(os.path.join(a_dir, "masks", i + ".png")))
            mb = np.array(Image.open(os.path.join(b_dir, "masks", i + ".png")))
            same += int((ma == mb).sum())
            total += ma.size
        return {"images": len(ids), "raw_max_diff": d_raw, "raw_mean_diff": s_raw / max(n_px, 1),
                "refined_max_diff": d_ref, "refined_mean_diff": s_ref / max(n_px, 1),
                "labels_identical": same / max(total, 1)}

    def text_features(self, random_ok=False):
        """clipmask's own text features (its cache, written by the first run): class rows in
        the config's order, then background words. fp32 preferred. (OpenAI's tokenizer needs
        ftfy and regex, which the device machine lacks.) With random_ok and no cache (every
        clipmask run failed), random unit rows of the right shape: enough to time the PyTorch
        pipeline, whose speed does not depend on the text."""
        from safetensors.torch import load_file
        path = self.text.get("fp32") or self.text.get("fp16")
        if path is None:
            cands = sorted(os.listdir(os.path.join(self.cache, "text"))) if os.path.isdir(
                os.path.join(self.cache, "text")) else []
            if not cands:
                if random_ok:
                    from safetensors import safe_open
                    with safe_open(self.model, "pt") as f:
                        dim = f.get_tensor("text_projection").shape[1]
                    n_bg = len(json.load(open(os.path.join(ROOT, "configs/voc12.json")))["background_words"])
                    g = torch.Generator().manual_seed(0)
                    t = torch.randn(len(CLASSES) + n_bg, dim, generator=g)
                    t = t / t.norm(dim=-1, keepdim=True)
                    return t[:len(CLASSES)], t[len(CLASSES):], "random (no clipmask text cache: every run failed)"
                raise StepFailed("no text features: no clipmask run wrote its text cache")
            path = os.path.join(self.cache, "text", cands[0])
        t = load_file(path)
        return t["classes"].float(), t["background"].float(), os.path.basename(path)

    def label_probabilities(self):
        """The GradCAM targets' probabilities of the correctness images (fp32, CPU, reference
        model, clipmask's text features): softmax over [the image's classes; background words]
        of exp(logit_scale) * image feature . text, as CLIP-ES (clip_reference.LastLayer)."""
        import clip_reference as ref
        fg, bg, text_file = self.text_features()
        model = ref.load_checkpoint(self.model)
        v = model.visual
        blocks = list(v.transformer.resblocks)
        per_image = {}
        for i in self.ids[:self.n_correct]:
            x, _, _ = ref.clipes_input(os.path.join(self.images, i + ".jpg"), v.patch)
            gh, gw = x.shape[-2] // v.patch, x.shape[-1] // v.patch
            keys = [CLASSES.index(n) for n in dict.fromkeys(self.labels[i])]
            with torch.no_grad():
                tokens = ref.encode_tokens(model, x, ref.upsample_pos_emb(v.positional_embedding, (gh, gw)))
                for blk in blocks[:-1]:
                    tokens, _ = blk(tokens)
                last = ref.LastLayer(model)
                last.set_input(tokens, torch.cat([fg[keys], bg], 0).to(model.dtype))
                p = last(None)[0, :len(keys)].float()
            per_image[i] = [float(q) for q in p]
        allp = [q for ps in per_image.values() for q in ps]
        lo, hi = min(allp), max(allp)
        return {"min": lo, "max": hi, "median": float(np.median(allp)), "labels": len(allp),
                "images": len(per_image), "well_conditioned": lo > WELL_CONDITIONED_MIN_P,
                "well_conditioned_min": WELL_CONDITIONED_MIN_P, "text_features": text_file, "per_image": per_image}

    def baseline(self, precision, ids, max_s):
        """The straightforward PyTorch CLIP-ES pipeline: per label, block L forward + one
        backward (as the original's GradCAM loop), CAA with OpenCV boxes, argmax; plain autograd
        (no pytorch-grad-cam on the device machine). images/s over the images done within
        max_s (model load and text features excluded)."""
        import cv2
        import clip_reference as ref
        device = self.device
        fp16 = precision == "fp16"
        box_threshold = json.load(open(os.path.join(ROOT, "configs/voc12.json"))).get("box_threshold", 0.4)
        fg, bg, text_file = self.text_features(random_ok=True)
        model = ref.load_checkpoint(self.model, fp16=fp16).to(device)
        fg, bg = fg.to(device), bg.to(device)
        v = model.visual
        blocks = list(v.transformer.resblocks)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        t0 = time.time()
        done = 0
        try:
            for i in ids:
                if done and time.time() - t0 > max_s:
                    break
                x, h, w = ref.clipes_input(os.path.join(self.images, i + ".jpg"), v.patch)
                x = x.to(device)
                gh, gw = x.shape[-2] // v.patch, x.shape[-1] // v.patch
                keys = [CLASSES.index(n) for n in dict.fromkeys(self.labels[i])]
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
                done += 1
            sync()
        finally:
            torch.set_default_device("cpu")
        secs = time.time() - t0
        return {"images": done, "seconds": secs, "images_per_s": done / secs, "text_features": text_file}

    # ---- the run ---------------------------------------------------------------------------

    def run(self):
        a, dev = self.args, self.device
        self.step("environment", self.environment)
        self.step("fixture", self.fixture, lambda v: self.res.__setitem__("fixture", v))
        self.step("images", self.make_data, lambda v: self.res.__setitem__("data", v))
        ids_c = self.ids[:self.n_correct]
        nc = len(ids_c)

        # 2. Correctness on the correctness subset only (its own labels file).
        for key, device, precision, extra, tf32_off in [
                ("cpu-fp32", "cpu", "fp32", [], True),
                ("dev-fp32", dev, "fp32", ["--batch-size", "8"], True),
                ("dev-fp16", dev, "fp16", ["--batch-size", "8"], False)]:
            self.step(f"correctness: generate {key} (--device {device} --precision {precision})",
                      lambda key=key, device=device, precision=precision, extra=extra, tf32_off=tf32_off:
                      self.generate(key, self.labels_correct, device, precision, ["--save-cams"] + extra,
                                    tf32_off=tf32_off, expect=nc, cap=240, section="runs"))
        self.step(f"correctness: compare {dev} vs cpu fp32", lambda: self.compare("cpu-fp32", "dev-fp32", ids_c),
                  lambda v: self.res.__setitem__("cuda_vs_cpu_fp32", v), always=True)
        self.step(f"correctness: compare fp16 vs fp32 on {dev}", lambda: self.compare("dev-fp32", "dev-fp16", ids_c),
                  lambda v: self.res.__setitem__("fp16_vs_fp32", v), always=True)
        # The label probabilities the correctness check covered (Python, CPU, fp32).
        self.step("label probabilities of the correctness images", self.label_probabilities,
                  lambda v: self.res.__setitem__("label_probabilities", v))

        # 3. Throughput over the whole set (larger than the correctness set, also when dry).
        n_tp = min(self.n, len(self.ids))
        plan = []
        for precision, batch in [("fp16", 8), ("fp16", 32), ("fp32", 8)]:
            plan.append((f"{precision}-b{batch}", precision, batch, None))
        for precision, batch in [("fp16", 8), ("fp16", 32), ("fp32", 8)]:
            plan.append((f"{precision}-b{batch}-crf-{CPU_CRF}", precision, batch, CPU_CRF))
        gpu_crf = self.gpu_crf_device()
        for precision, batch in GPU_CRF_SETTINGS:
            plan.append((f"{precision}-b{batch}-crf-{gpu_crf}", precision, batch, gpu_crf))
        # --max-gpu-mem: a budget of one input per batch, so that the split runs (issue 26).
        plan.append(("fp16-b8-memsplit", "fp16", 8, None))
        for name, precision, batch, crf_dev in plan:
            extra = ["--batch-size", str(batch)] + (["--crf", "--crf-device", crf_dev] if crf_dev else [])
            if name.endswith("memsplit"):
                extra += ["--max-gpu-mem", "1K"]
            kind = "CPU CRF" if crf_dev == CPU_CRF else "GPU CRF"
            meta = {"what": ("maps + CRF (" + kind + ")" if crf_dev else "maps")
                    + (", --max-gpu-mem 1K" if name.endswith("memsplit") else ""), "crf": bool(crf_dev),
                    "crf_device": crf_dev, "precision": precision, "requested_batch": batch,
                    "formulation": "fast" if self.dry else "device default (fast on CUDA)"}
            # A row for every planned run, also when its step fails or is skipped.
            self.res["clipmask"][name] = dict(meta, error="not run yet")
            self.step(f"throughput: generate {name}",
                      lambda name=name, precision=precision, extra=extra, meta=meta: self.generate(
                          name, self.labels_all, dev, precision, extra, sample=not self.dry, expect=n_tp, cap=240,
                          section="clipmask", meta=meta, out_name="tp-" + name,
                          formulation="fast" if self.dry else None))
            if self.res["clipmask"][name].get("error") == "not run yet":
                self.res["clipmask"][name]["error"] = "not run; see errors"

        # The GPU CRF against the CPU CRF: images/s at the same settings, and their masks.
        self.step("throughput: GPU CRF vs CPU CRF", lambda: self.compare_crf(n_tp),
                  lambda v: self.res["gpu_crf"].update(v), always=True)

        # 4. The PyTorch pipeline on the same device.
        ids_b = self.ids[:min(n_tp, self.n_base)]
        self.res["baseline_images"] = len(ids_b)
        for precision in ["fp16", "fp32"]:
            def store_base(v, precision=precision):
                self.res["pytorch_baseline_images_per_s"][precision] = v["images_per_s"]
                self.res.setdefault("pytorch_baseline", {})[precision] = v
            self.step(f"baseline: PyTorch pipeline {precision}",
                      lambda precision=precision: self.baseline(precision, ids_b, 10 if self.dry else 45), store_base)
        self.step("summary: ratios and checks", lambda: self.summarize(nc, n_tp), always=True)
        self.res["seconds"] = round(self.elapsed(), 1)
        self.res["finished"] = True
        self.write_report()
        if not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        return self.res["checks"].get("all_passed", False)

    def compare_crf(self, n_tp):
        """images/s of the GPU CRF rows against the CPU CRF rows at the same settings, and the
        share of identical mask pixels (255 included) over every throughput image."""
        gpu = self.gpu_crf_device()
        out = {"by_setting": {}}
        same = total = 0
        for precision, batch in GPU_CRF_SETTINGS:
            key = f"{precision}-b{batch}-crf-"
            c, g = self.res["clipmask"].get(key + CPU_CRF) or {}, self.res["clipmask"].get(key + gpu) or {}
            if c.get("images_per_s") and g.get("images_per_s"):
                out["by_setting"][f"{precision}-b{batch}"] = {
                    "cpu_crf_images_per_s": c["images_per_s"], "gpu_crf_images_per_s": g["images_per_s"],
                    "vs_cpu_crf": g["images_per_s"] / c["images_per_s"]}
            a_dir, b_dir = os.path.join(self.runs, "tp-" + key + CPU_CRF), os.path.join(self.runs, "tp-" + key + gpu)
            for i in self.ids[:n_tp]:
                pa, pb = os.path.join(a_dir, "masks", i + ".png"), os.path.join(b_dir, "masks", i + ".png")
                if not (os.path.exists(pa) and os.path.exists(pb)):
                    raise StepFailed(f"{i}: a mask of the CRF runs {key}{CPU_CRF} / {key}{gpu} is missing")
                ma, mb = np.array(Image.open(pa)), np.array(Image.open(pb))
                same += int((ma == mb).sum())
                total += ma.size
        best = max(out["by_setting"].values(), key=lambda v: v["gpu_crf_images_per_s"], default=None)
        if best:
            out.update(images_per_s=best["gpu_crf_images_per_s"], cpu_crf_images_per_s=best["cpu_crf_images_per_s"],
                       vs_cpu_crf=best["vs_cpu_crf"])
        out["labels_identical_vs_cpu_crf"] = same / max(total, 1)
        return out

    def summarize(self, nc, n_tp):
        base = self.res["pytorch_baseline_images_per_s"]
        for name, rec in self.res["clipmask"].items():
            p = rec.get("precision")
            if rec.get("images_per_s") and base.get(p):
                rec["vs_pytorch_pipeline"] = rec["images_per_s"] / base[p]
        self.res["ratio_maps"] = {p: self.res["clipmask"][f"{p}-b8"]["images_per_s"] / base[p]
                                  for p in base if self.res["clipmask"].get(f"{p}-b8", {}).get("images_per_s")}
        self.res["checks"] = self.checks(nc, n_tp)

    def checks(self, nc, n_tp):
        r = self.res
        c = r.get("cuda_vs_cpu_fp32") or {}
        p = r.get("label_probabilities") or {}
        tp = [k for k in r["clipmask"]]

        def le(v, bound):
            return v is not None and v <= bound
        out = {
            "correctness_runs_did_exactly_their_ids": nc > 0 and all(
                (r["runs"].get(k) or {}).get("done") == nc and not (r["runs"].get(k) or {}).get("failed")
                and not (r["runs"].get(k) or {}).get("error") for k in ("cpu-fp32", "dev-fp32", "dev-fp16")),
            # The dry run's point: a correctness run that took the whole set's ids would fail.
            "throughput_set_larger_than_correctness_set": n_tp > nc,
            "throughput_runs_did_every_image": bool(tp) and all(
                r["clipmask"][k].get("done") == n_tp and not r["clipmask"][k].get("failed")
                and not r["clipmask"][k].get("error") for k in tp),
            "fixture_well_conditioned": bool(p.get("well_conditioned")),
            # --max-gpu-mem 1K: every input ran alone (the split of issue 26).
            "max_gpu_mem_split_every_input": (r["clipmask"].get("fp16-b8-memsplit") or {}).get("model_batches") == n_tp,
            f"cuda_vs_cpu_raw_le_{RAW_MAX:g}": le(c.get("raw_max_diff"), RAW_MAX),
            f"cuda_vs_cpu_refined_max_le_{REFINED_MAX:g}": le(c.get("refined_max_diff"), REFINED_MAX),
            f"cuda_vs_cpu_refined_mean_le_{REFINED_MEAN:g}": le(c.get("refined_mean_diff"), REFINED_MEAN),
            f"cuda_vs_cpu_labels_ge_{100 * LABELS_MIN:g}": c.get("labels_identical") is not None
            and c["labels_identical"] >= LABELS_MIN,
            f"gpu_crf_vs_cpu_crf_labels_ge_{100 * LABELS_MIN:g}":
                (r["gpu_crf"].get("labels_identical_vs_cpu_crf") or 0) >= LABELS_MIN,
            "no_step_errors": not r["errors"],
        }
        out["all_passed"] = all(out.values())
        return out

    # ---- markdown --------------------------------------------------------------------------

    def markdown(self):
        r = self.res
        e = r.get("env") or {}
        smi = e.get("nvidia_smi") or {}

        def f(v, fmt="{:.2f}"):
            return "n/a" if v is None else fmt.format(v)
        title = "Dry run (CPU)" if self.dry else f"GPU: {smi.get('name') or 'unknown'}"
        state = "finished" if r.get("finished") else (
            f"INCOMPLETE (in step: {r['current_step']})" if r.get("current_step") else "INCOMPLETE")
        md = [f"## {title}, `scripts/gpu-check.sh{' --dry-run' if self.dry else ''}`", "",
              f"Report {state}; {len(r['errors'])} error(s); {f(r.get('seconds'), '{:.0f}')} s; "
              f"started {r['started']}.", "",
              f"- Machine: GPU {smi.get('name', 'n/a')}, driver {smi.get('driver_version', 'n/a')}, "
              f"{smi.get('memory_total_mib', 'n/a')} MiB (nvidia-smi); torch {e.get('torch', 'n/a')} "
              f"(CUDA {e.get('torch_cuda')}); {e.get('cpu_cores', 'n/a')} CPU cores.",
              f"- clipmask --version: {'; '.join((e.get('clipmask_version') or 'n/a').splitlines())}.",
              f"- Model: {r['model']} (tests/python/make_fixture.py); synthetic photos at "
              f"{'160x120 / 120x160' if self.size == 'tiny' else 'VOC sizes 500x375 / 375x500'}; correctness on "
              f"{r['correctness_images']} images (own labels file), throughput on {r['throughput_images']}, "
              f"PyTorch pipeline on {r.get('baseline_images') or 'n/a'}."]
        p = r.get("label_probabilities")
        if p:
            md.append(f"- Label probabilities covered by the correctness images: {p['min']:.4f}..{p['max']:.4f} "
                      f"(median {p['median']:.4f}, {p['labels']} labels); well-conditioned (min > "
                      f"{WELL_CONDITIONED_MIN_P:g}): {'yes' if p['well_conditioned'] else 'NO'}.")
        else:
            md.append("- Label probabilities: n/a (step failed or not run).")
        c = r.get("cuda_vs_cpu_fp32")
        if c:
            md.append(f"- {self.device} vs cpu, fp32 (TF32 off), {c['images']} images: raw maps max |diff| "
                      f"{c['raw_max_diff']:.1e} (mean {c['raw_mean_diff']:.1e}); refined max {c['refined_max_diff']:.1e}"
                      f" (mean {c['refined_mean_diff']:.1e}); labels {100 * c['labels_identical']:.3f} % identical. "
                      f"Targets: raw <= {RAW_MAX:g}, refined <= {REFINED_MAX:g} (mean <= {REFINED_MEAN:g}), "
                      f"labels >= {100 * LABELS_MIN:g} %.")
        else:
            md.append(f"- {self.device} vs cpu, fp32: n/a (step failed or not run).")
        h = r.get("fp16_vs_fp32")
        if h:
            md.append(f"- fp16 vs fp32 on {self.device}: raw max |diff| {h['raw_max_diff']:.1e}, refined "
                      f"{h['refined_max_diff']:.1e}; labels {100 * h['labels_identical']:.2f} % identical.")
        else:
            md.append(f"- fp16 vs fp32 on {self.device}: n/a (step failed or not run).")
        base = r["pytorch_baseline_images_per_s"]
        md += ["", "Throughput of `generate` (images/s over the run, model load excluded). Stage images/s from "
               "`--summary-json` (each stage alone; model = forward + backward + CAA; write includes the CRF "
               "when it runs).", "",
               "| run | what | CRF device | precision | batch | images/s | vs PyTorch pipeline | decode | model "
               "(fwd / bwd / caa) | write | slowest stage | peak GPU MiB | GPU busy | CPU cores busy |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, t in r["clipmask"].items():
            what = t.get("what") or ""
            if t.get("error"):
                what = f"FAILED ({t['error'][:120]}): {what}"
            if t.get("images_per_s") is None:
                md.append(f"| generate {name} | {what} | {t.get('crf_device') or '-'} | {t.get('precision')} | "
                          f"{t.get('requested_batch')} | n/a | | | | | | | | |")
                continue
            st = t.get("stage_images_per_s") or {}
            b = base.get(t["precision"])
            md.append(f"| generate {name} | {what} | {t['crf_device'] or '-'} | {t['precision']} | "
                      f"{t.get('batch_size')} | {t['images_per_s']:.2f} | {f(t['images_per_s'] / b, '{:.1f}x') if b else 'n/a'}"
                      f" | {f(st.get('decode'), '{:.0f}')} | {f(st.get('model'), '{:.1f}')} ({f(st.get('forward'), '{:.0f}')}"
                      f" / {f(st.get('backward'), '{:.0f}')} / {f(st.get('caa'), '{:.0f}')}) | {f(st.get('write'), '{:.1f}')}"
                      f" | {t.get('slowest_stage') or 'n/a'} | {f(t.get('peak_gpu_mem_mib'), '{:.0f}')} | "
                      f"{f(t.get('gpu_busy_fraction'))} | {t['cpu_cores_busy']:.1f} |")
        for prec in ["fp16", "fp32"]:
            v = base.get(prec)
            md.append(f"| PyTorch pipeline {prec} | per-label backward | - | {prec} | 1 | {f(v)} | 1.0x | | | | | | | |")
        g = r["gpu_crf"]
        rows = "; ".join(f"{k}: {v['cpu_crf_images_per_s']:.2f} vs {v['gpu_crf_images_per_s']:.2f} images/s "
                         f"({v['vs_cpu_crf']:.2f}x)" for k, v in (g.get("by_setting") or {}).items())
        same = g.get("labels_identical_vs_cpu_crf")
        md += ["", f"CPU CRF vs GPU CRF (`--crf-device cpu` vs `{g['device']}`, same run): {rows or 'n/a'}; "
               f"masks {f(None if same is None else 100 * same, '{:.4f}')} % identical (target >= "
               f"{100 * LABELS_MIN:g} %)."]
        md += ["", "Checks: " + ", ".join(f"{k} **{'yes' if v else 'NO'}**" for k, v in r["checks"].items())
               if r["checks"] else "Checks: not computed (run incomplete)."]
        if r["errors"]:
            md += ["", "### Errors", ""]
            for err in r["errors"]:
                md.append(f"- **{err['step']}**: {err['error'][:600]}")
                d = err.get("details") or {}
                if d.get("failures_head"):
                    md.append(f"  - failures.jsonl ({d.get('failures_count')} lines): {d['failures_head'][0][:300]}")
                if d.get("stderr_tail"):
                    md.append("  - stderr tail: `" + d["stderr_tail"][-300:].replace("`", "'").replace("\n", " | ") + "`")
        md += ["", "Steps: " + "; ".join(f"{s['step']} {s['status'] or 'running'}"
                                         + (f" {s['seconds']:.1f} s" if s.get("seconds") is not None else "")
                                         for s in r["steps"]) + "."]
        return "\n".join(md) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="gpu-check.json and gpu-check.md go here")
    p.add_argument("--dry-run", action="store_true", help="CPU only, tiny model (proves the script in CI)")
    p.add_argument("--images", type=int, default=0, help="throughput images (default 200; 24 dry)")
    p.add_argument("--correct", type=int, default=8, help="correctness images, the first of the set (default 8)")
    p.add_argument("--baseline-images", type=int, default=0, help="PyTorch pipeline images (default 40; 4 dry)")
    p.add_argument("--size", choices=["tiny", "b16"], default=None,
                   help="model size (default b16; tiny dry); b16 uses VOC-sized photos, tiny 160x120")
    p.add_argument("--bin", default=os.path.join(ROOT, "target/release/clipmask"))
    p.add_argument("--work", default=None, help="scratch directory (default: a new temporary one)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch directory")
    p.add_argument("--budget-s", type=float, default=0,
                   help="no step starts after this many seconds (default 300; 210 dry)")
    args = p.parse_args()
    chk = Check(args)
    try:
        ok = chk.run()
    except BaseException as e:
        chk.res["errors"].append({"step": "gpu_check.py", "error": f"{type(e).__name__}: {e}",
                                  "traceback": traceback.format_exc()[-3000:]})
        chk.write_report()
        raise
    print(open(os.path.join(chk.out, "gpu-check.md")).read())
    print(json.dumps(chk.res["checks"]))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
