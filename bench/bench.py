"""`make bench`: clipmask vs the PyTorch CLIP-ES pipeline (bench/baseline_clipes.py), whole
process, same random-weight model with ViT-B/16's dimensions, same VOC photos, same machine.
Writes a section of BENCHMARKS.md between markers and prints it.

Optional parts run when present: the dense CRF benchmark (scripts/bench_crf.py) and the
evaluation benchmark (target/release/examples/eval_bench).
"""
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import b16_model, write_section  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PY = sys.executable
N_IMAGES = int(os.environ.get("BENCH_IMAGES", "8"))


def measured(cmd, env=None):
    """Runs cmd in a child that reports its own peak RSS; returns (wall seconds, peak MiB, stdout)."""
    wrapper = ("import resource, subprocess, sys, time; t = time.time(); "
               "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "sys.stderr.write(r.stderr); print(r.stdout); "
               "print('@@', time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, r.returncode)")
    r = subprocess.run([PY, "-c", wrapper] + cmd, capture_output=True, text=True, env=env)
    lines = r.stdout.strip().splitlines()
    tail = [l for l in lines if l.startswith("@@")][-1].split()
    wall, rss, rc = float(tail[1]), float(tail[2]), int(tail[3])
    if rc != 0:
        sys.stderr.write(r.stderr)
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}")
    return wall, rss, "\n".join(l for l in lines if not l.startswith("@@"))


def main():
    model = b16_model()
    voc = os.path.join(ROOT, "..", "shared", "data", "voc-sample")
    if os.path.isdir(voc):
        images, labels_path = os.path.join(voc, "JPEGImages"), os.path.join(voc, "labels.json")
    else:
        images, labels_path = os.path.join(ROOT, "examples/images"), os.path.join(ROOT, "examples/labels.json")
    labels = json.load(open(labels_path))
    ids = sorted(labels)[:N_IMAGES]
    n_labels = sum(len(set(labels[i])) for i in ids)
    config = os.path.join(ROOT, "configs/voc12.json")
    out = os.path.join(ROOT, "bench-out")
    os.makedirs(out, exist_ok=True)
    split = os.path.join(out, "ids.txt")
    open(split, "w").write("\n".join(ids) + "\n")

    base_out = os.path.join(out, "baseline")
    b_wall, b_rss, b_stdout = measured([PY, os.path.join(ROOT, "bench/baseline_clipes.py"), model, config, images,
                                        labels_path, base_out] + ids)
    b = json.loads(b_stdout.strip().splitlines()[-1])

    ours_out = os.path.join(out, "clipmask")
    summary_path = os.path.join(out, "summary.json")
    c_wall, c_rss, _ = measured([os.path.join(ROOT, "target/release/clipmask"), "generate", "--model", model,
                                 "--config", config, "--device", "cpu", "--images", images, "--labels", labels_path,
                                 "--split", split, "--out", ours_out, "--save-cams", "--overwrite",
                                 "--summary-json", summary_path])
    s = json.load(open(summary_path))

    # Same outputs? Refined maps and labels against the baseline's.
    d_max, same, total = 0.0, 0, 0
    from PIL import Image
    for i in ids:
        ref = np.load(os.path.join(base_out, i + ".npy"), allow_pickle=True).item()
        ours = np.load(os.path.join(ours_out, "cams", i + ".npz"))
        d_max = max(d_max, float(np.abs(ref["attn_highres"] - ours["cams"]).max()))
        a = np.array(Image.open(os.path.join(base_out, i + ".png")))
        c = np.array(Image.open(os.path.join(ours_out, "masks", i + ".png")))
        same += int((a == c).sum())
        total += a.size

    # Maps + dense CRF, whole process: PyTorch + pydensecrf against generate --crf.
    bc_wall, bc_rss, _ = measured([PY, os.path.join(ROOT, "bench/baseline_clipes.py"), "--crf", model, config, images,
                                   labels_path, os.path.join(out, "baseline-crf")] + ids)
    cc_wall, cc_rss, _ = measured([os.path.join(ROOT, "target/release/clipmask"), "generate", "--model", model,
                                   "--config", config, "--device", "cpu", "--images", images, "--labels", labels_path,
                                   "--split", split, "--out", os.path.join(out, "clipmask-crf"), "--crf", "--overwrite"])
    same_crf, total_crf = 0, 0
    for i in ids:
        a = np.array(Image.open(os.path.join(out, "baseline-crf", i + ".png")))
        c = np.array(Image.open(os.path.join(out, "clipmask-crf", "masks", i + ".png")))
        same_crf += int((a == c).sum())
        total_crf += a.size

    ratio = b_wall / c_wall
    st = s["stages"]
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; CPU, fp32; "
        f"random-weight CLIP with ViT-B/16's dimensions; {len(ids)} VOC photos ({n_labels} labels); "
        f"measured {time.strftime('%Y-%m-%d')}.",
        "",
        "| pipeline (whole process, maps + labels + files) | wall s | images/s | peak RSS MiB |",
        "|---|---|---|---|",
        f"| PyTorch reference pipeline (per-label backward) | {b_wall:.2f} | {len(ids) / b_wall:.3f} | {b_rss:.0f} |",
        f"| clipmask generate | {c_wall:.2f} | {len(ids) / c_wall:.3f} | {c_rss:.0f} |",
        "",
        f"**Speed-up: {ratio:.2f}x** images/s (target >= 1.3x). Peak RSS {c_rss:.0f} MiB (target < 1536).",
        f"Same outputs: refined maps max |diff| {d_max:.1e}; labels identical on {100.0 * same / total:.3f} % of pixels.",
        "",
        "| pipeline (whole process, maps + dense CRF + confidence) | wall s | images/s | peak RSS MiB |",
        "|---|---|---|---|",
        f"| PyTorch pipeline + pydensecrf | {bc_wall:.2f} | {len(ids) / bc_wall:.3f} | {bc_rss:.0f} |",
        f"| clipmask generate --crf | {cc_wall:.2f} | {len(ids) / cc_wall:.3f} | {cc_rss:.0f} |",
        "",
        f"**Speed-up with CRF: {bc_wall / cc_wall:.2f}x** (target >= 2x). "
        f"Labels identical on {100.0 * same_crf / total_crf:.3f} % of pixels.",
        "",
        f"Baseline breakdown: set-up (load, text) {b['setup_s']:.2f} s, maps {b['maps_s']:.2f} s, "
        f"labels + write {b['write_s']:.2f} s.",
        f"clipmask breakdown (summed per stage; decode and write overlap the model): decode {st['decode']:.2f} s, "
        f"forward {st['forward']:.2f} s, backward {st['backward']:.2f} s, CAA {st['caa']:.2f} s, "
        f"write {st['write']:.2f} s; model set-up and text {c_wall - s['seconds']:.2f} s.",
    ]
    extra = []
    crf = os.path.join(ROOT, "scripts/bench_crf.py")
    if os.path.exists(crf) and os.path.exists(os.path.join(ROOT, "target/release/examples/crf_bench")):
        r = subprocess.run([PY, crf], capture_output=True, text=True)
        extra += ["", "### Dense CRF", "", r.stdout.strip() or r.stderr.strip()[-2000:]]
    ev = os.path.join(ROOT, "scripts/bench_eval.sh")
    if os.path.exists(ev) and os.path.exists(os.path.join(ROOT, "target/release/examples/eval_bench")):
        r = subprocess.run(["bash", ev], capture_output=True, text=True)
        extra += ["", "### Evaluation", "", "```", (r.stdout.strip() or r.stderr.strip()[-2000:]), "```"]
    section = "\n".join(lines + extra)
    print(section)
    write_section("cpu", "CPU, generate (maps)", section)


if __name__ == "__main__":
    main()
