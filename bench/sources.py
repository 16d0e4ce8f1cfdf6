"""Per-source speed on this machine (issue 17) and the CPU batch size (issue 16), in one run:
`generate` (maps only, no CRF) with --cam gradcam|maskclip|sclip|clearclip|naclip, TTA
(--scales 1,0.75 --flip) and --batch-size 1 vs 4, on the same photos and model, each timed
as a whole process and by its summary's stage times. Rewrites the section between the
`bench:sources` markers of BENCHMARKS.md.

  bench/sources.py   (BENCH_IMAGES=8 photos by default; the b16 fixture of bench.py)
"""
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import b16_model, write_section  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_IMAGES = int(os.environ.get("BENCH_IMAGES", "8"))


def main():
    model = b16_model()
    voc = os.path.join(ROOT, "..", "shared", "data", "voc-sample")
    images, labels_path = os.path.join(voc, "JPEGImages"), os.path.join(voc, "labels.json")
    labels = json.load(open(labels_path))
    ids = sorted(labels)[:N_IMAGES]
    out = os.path.join(ROOT, "bench-out", "sources")
    os.makedirs(out, exist_ok=True)
    split = os.path.join(out, "ids.txt")
    open(split, "w").write("\n".join(ids) + "\n")
    binary = os.path.join(ROOT, "target/release/clipmask")

    def run(name, extra):
        summary = os.path.join(out, name + ".json")
        cmd = [binary, "generate", "--model", model, "--device", "cpu", "--images", images, "--labels",
               labels_path, "--split", split, "--out", os.path.join(out, name), "--overwrite",
               "--summary-json", summary] + extra
        t = time.time()
        subprocess.run(cmd, check=True, capture_output=True)
        wall = time.time() - t
        s = json.load(open(summary))
        return {"wall": wall, "run_s": s["seconds"], "images_per_s": s["done"] / s["seconds"], "stages": s["stages"]}

    rows = {}
    # A warm-up run (text features cached, pages in the model file) that is not reported.
    run("warmup", ["--cam", "gradcam"])
    for src in ["gradcam", "maskclip", "sclip", "clearclip", "naclip"]:
        rows[src] = run(src, ["--cam", src])
    rows["gradcam + TTA (1, 0.75, flip)"] = run("tta", ["--scales", "1,0.75", "--flip"])
    rows["naclip + TTA (1, 0.75, flip)"] = run("tta-naclip", ["--cam", "naclip", "--scales", "1,0.75", "--flip"])
    rows["gradcam, --batch-size 4"] = run("batch4", ["--batch-size", "4"])
    base = rows["gradcam"]["images_per_s"]
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; CPU, fp32; random-weight "
        f"CLIP with ViT-B/16's dimensions; {len(ids)} VOC photos; maps and labels, no CRF; measured "
        f"{time.strftime('%Y-%m-%d')}. images/s over the run (model load and text features excluded); "
        "stage seconds summed over images.",
        "",
        "| --cam / options | images/s | vs gradcam | forward s | map source s (backward for gradcam) | CAA s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        st = r["stages"]
        lines.append(f"| {name} | {r['images_per_s']:.3f} | {r['images_per_s'] / base:.2f}x | {st['forward']:.2f} | "
                     f"{st['backward']:.2f} | {st['caa']:.2f} |")
    g = rows["gradcam"]["stages"]
    dense = [rows[s]["stages"]["backward"] for s in ["maskclip", "sclip", "clearclip", "naclip"]]
    lines += ["", f"No backward pass: GradCAM's block-L forward on K copies plus its backward takes "
              f"{g['backward']:.2f} s here; the dense sources' modified last block takes "
              f"{min(dense):.2f}-{max(dense):.2f} s (one forward, no copies per label)."]
    section = "\n".join(lines)
    print(section)
    write_section("sources", "CPU, map sources, test-time augmentation, batch size", section)


if __name__ == "__main__":
    main()
