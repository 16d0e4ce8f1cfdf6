#!/usr/bin/env python3
"""Dense CRF speed: clipmask (examples/crf_bench.rs) against pydensecrf, the implementation
CLIP-ES uses (targets.md: one 500x375 image, CLIP-ES parameters, one thread, >= 2x faster;
all cores used across images).

Both run in the same invocation on the same inputs: crf_bench writes the photo (faithful CRF
image) and the CLIP-ES-like probabilities it times as .npy, and pydensecrf is timed on those.
The machines this runs on are shared and noisy, so the two are timed in paired rounds
(clipmask, then pydensecrf, per label count; each side the median of --per-round runs) and the
speed-up is the median of the per-round ratios; the ratio of the best times is printed too. Prints a markdown table.

    python scripts/bench_crf.py [--bin target/release/crf_bench] [--labels 21,3,2] [--rounds 7]
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
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "examples" / "crf_bench"))
    ap.add_argument("--photos", default=str(ROOT.parent / "shared" / "data" / "voc-sample" / "JPEGImages"))
    ap.add_argument("--labels", default="21,3,2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=3, help="timed runs per side and round (median)")
    ap.add_argument("--throughput-repeats", type=int, default=3)
    args = ap.parse_args()
    if not Path(args.bin).exists():
        sys.exit(f"{args.bin} not found: build it with `cargo build --release --examples`")
    labels = [int(x) for x in args.labels.split(",")]
    one = {"RAYON_NUM_THREADS": "1"}

    ours = {l: [] for l in labels}
    ref = {l: [] for l in labels}
    with tempfile.TemporaryDirectory() as tmp:
        first = run_bench(args.bin, ["single", "--photos", args.photos, "--labels", args.labels,
                                     "--repeats", "1", "--dump", tmp], one)
        inputs = {l: (np.load(f"{tmp}/image_{l}.npy"), np.load(f"{tmp}/probs_{l}.npy")) for l in labels}
        for l in labels:
            reference_crf(*inputs[l])  # warm-up
        # Paired rounds: each round times clipmask then pydensecrf on the same input, so that
        # the load of this shared machine changes both sides of a ratio alike.
        for _ in range(args.rounds):
            for l in labels:
                res = run_bench(args.bin, ["single", "--photos", args.photos, "--labels", str(l),
                                           "--repeats", str(args.per_round)], one)
                ours[l].append(res["results"][0]["median_s"])
                times = []
                for _ in range(args.per_round):
                    t = time.perf_counter()
                    reference_crf(*inputs[l])
                    times.append(time.perf_counter() - t)
                ref[l].append(float(np.median(times)))
    through = run_bench(
        args.bin,
        ["throughput", "--photos", args.photos, "--labels", args.labels, "--repeats", str(args.throughput_repeats)],
        {},
    )
    tput = {r["labels"]: r for r in through["results"]}
    med = lambda xs: float(np.median(xs))  # noqa: E731
    print(f"Dense CRF, {first['photo']} ({first['width']}x{first['height']}), CLIP-ES parameters "
          f"(10 iterations, Gaussian sxy 1 w 3, bilateral sxy 67 srgb 3 w 4), faithful image; "
          f"{args.rounds} paired rounds (clipmask, then pydensecrf, same input; each side the median of "
          f"{args.per_round} runs after a warm-up), one thread each; "
          f"{os.cpu_count()} CPUs.\n")
    print("| labels | pydensecrf s/image, median (min) | clipmask s/image, median (min) | speed-up, median of paired ratios | speed-up, min / min | "
          f"clipmask images/s ({through['threads']} threads, {tput[labels[0]]['images']} photos) |")
    print("|---|---|---|---|---|---|")
    for l in labels:
        ratio = med([r / o for r, o in zip(ref[l], ours[l])])
        print(f"| {l} | {med(ref[l]):.3f} ({min(ref[l]):.3f}) | {med(ours[l]):.3f} ({min(ours[l]):.3f}) | "
              f"{ratio:.2f}x | {min(ref[l]) / min(ours[l]):.2f}x | {tput[l]['images_per_s']:.2f} |")
    print()
    print("raw: " + json.dumps({"pydensecrf_s": ref, "clipmask_s": ours, "clipmask_throughput": through}))


if __name__ == "__main__":
    main()
