"""Independent NumPy reference for `clipmask eval` (tests/it/eval_metrics.rs).

Confusion matrices are built the usual NumPy way (np.bincount over n * gt + pred), ground-truth
255 skipped, predicted 255 counted as a miss of the ground-truth class (a separate "ignored"
count, no false positive), mIoU averaged over classes present in the ground truth.

  eval_reference.py labels --pred DIR --gt DIR --ids FILE --n N
  eval_reference.py cams --cams DIR --gt DIR --ids FILE --n N --alphas 1,2 --key cams [--dump DIR]

Prints one JSON object.
"""
import argparse
import json
import os

import numpy as np
from PIL import Image


def read_label(path):
    img = Image.open(path)
    if img.mode not in ("P", "L"):
        raise SystemExit(f"{path}: mode {img.mode}, expected P or L")
    return np.array(img, dtype=np.uint8)


def scores(pairs, n):
    hist = np.zeros((n, n), np.int64)
    ignored = np.zeros(n, np.int64)
    for gt, pred in pairs:
        assert gt.shape == pred.shape, (gt.shape, pred.shape)
        valid = gt != 255
        g = gt[valid].astype(np.int64)
        p = pred[valid].astype(np.int64)
        kept = p != 255
        hist += np.bincount(n * g[kept] + p[kept], minlength=n * n).reshape(n, n)
        ignored += np.bincount(g[~kept], minlength=n)
    tp = np.diag(hist).astype(np.float64)
    gt_tot = hist.sum(1) + ignored
    kept_gt = hist.sum(1)
    pred_tot = hist.sum(0)
    present = gt_tot > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (gt_tot + pred_tot - tp)
        acc = tp / gt_tot
        iou_kept = tp / (kept_gt + pred_tot - tp)
    valid_total = gt_tot.sum()
    return {
        "confusion": hist.tolist(),
        "ignored": ignored.tolist(),
        "miou": float(iou[present].mean()),
        "pixel_accuracy": float(tp.sum() / valid_total),
        "mean_accuracy": float(acc[present].mean()),
        "fw_iou": float((gt_tot[present] / valid_total * iou[present]).sum()),
        "ignored_fraction": float(ignored.sum() / valid_total),
        "miou_kept": float(iou_kept[kept_gt > 0].mean()),
        "per_class_iou": [float(v) if ok else None for v, ok in zip(iou, present)],
    }


def labels_from_cams(cams, keys, alpha):
    # float32 throughout, as the Rust side; first maximum wins ties (np.argmax).
    bg = (1 - cams.max(axis=0)) ** float(alpha)
    stack = np.concatenate([bg[None].astype(np.float32), cams], axis=0)
    lut = np.concatenate([[0], keys.astype(np.int64) + 1]).astype(np.uint8)
    return lut[np.argmax(stack, axis=0)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["labels", "cams"])
    ap.add_argument("--pred")
    ap.add_argument("--cams")
    ap.add_argument("--gt", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--alphas", default="1,2")
    ap.add_argument("--key", default="cams")
    ap.add_argument("--dump")
    a = ap.parse_args()
    ids = [l.strip() for l in open(a.ids) if l.strip()]
    gts = {i: read_label(os.path.join(a.gt, i + ".png")) for i in ids}
    if a.mode == "labels":
        pairs = [(gts[i], read_label(os.path.join(a.pred, i + ".png"))) for i in ids]
        print(json.dumps(scores(pairs, a.n)))
        return
    archives = {i: np.load(os.path.join(a.cams, i + ".npz")) for i in ids}
    out = []
    for alpha in [float(x) for x in a.alphas.split(",")]:
        pairs = []
        for i in ids:
            z = archives[i]
            cams = z[a.key].astype(np.float32)
            labels = labels_from_cams(cams, z["keys"], alpha)
            if a.dump:
                np.save(os.path.join(a.dump, f"{i}_a{alpha:g}.npy"), labels)
            pairs.append((gts[i], labels))
        s = scores(pairs, a.n)
        s["alpha"] = alpha
        out.append(s)
    best = max(range(len(out)), key=lambda k: (out[k]["miou"], -k))
    print(json.dumps({"alphas": out, "best_alpha": out[best]["alpha"]}))


if __name__ == "__main__":
    main()
