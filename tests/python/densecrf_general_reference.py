"""pydensecrf reference for clipmask's general dense CRF (tests/it/crf_general.rs).

Usage: densecrf_general_reference.py CASE_DIR...

Each CASE_DIR holds spec.json and the arrays it names (.npy):

    {"n": N, "m": M, "width": W or null, "height": H or null,
     "unary": "unary.npy" | null, "softmax": "probs.npy" | null,
     "terms": [{"kind": "gaussian", "sxy": [sx, sy], "compat": C, "kernel": K, "norm": Z},
               {"kind": "bilateral", "sxy": [sx, sy], "srgb": [sr, sg, sb], "image": "img.npy", ...},
               {"kind": "energy", "features": "f.npy", ...}],
     "iterations": I, "steps": S, "kl": true | false}

with C one of {"potts": w}, {"diag": "c.npy"}, {"matrix": "c.npy"}. With "softmax", the unary
is pydensecrf.utils.unary_from_softmax(probs), written to unary.npy. Writes q.npy
(inference(I), (M, N) float32), with S > 0 q_step.npy, tmp1.npy and tmp2.npy (startInference
then S stepInference calls, tmp1 and tmp2 passed as (M, N) zeros), and with "kl" kl.json
(klDivergence of inference(I)).
"""
import json
import sys

import numpy as np
import pydensecrf.densecrf as dcrf
import pydensecrf.eigen as eigen
from pydensecrf.utils import unary_from_softmax


def compat(c, d):
    if "potts" in c:
        return float(c["potts"])
    key = "diag" if "diag" in c else "matrix"
    return np.ascontiguousarray(np.load(f"{d}/{c[key]}").astype(np.float32))


def run(d):
    spec = json.load(open(f"{d}/spec.json"))
    n, m = spec["n"], spec["m"]
    if spec["width"] is not None:
        crf = dcrf.DenseCRF2D(spec["width"], spec["height"], m)
    else:
        crf = dcrf.DenseCRF(n, m)
    if spec.get("softmax"):
        unary = unary_from_softmax(np.load(f"{d}/{spec['softmax']}"))
        np.save(f"{d}/unary.npy", unary)
    else:
        unary = np.load(f"{d}/{spec['unary']}")
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    for t in spec["terms"]:
        c = compat(t["compat"], d)
        kernel, norm = t["kernel"], t["norm"]
        if t["kind"] == "gaussian":
            crf.addPairwiseGaussian(sxy=tuple(t["sxy"]), compat=c, kernel=kernel, normalization=norm)
        elif t["kind"] == "bilateral":
            img = np.ascontiguousarray(np.load(f"{d}/{t['image']}"))
            crf.addPairwiseBilateral(sxy=tuple(t["sxy"]), srgb=tuple(t["srgb"]), rgbim=img, compat=c,
                                     kernel=kernel, normalization=norm)
        else:
            f = np.ascontiguousarray(np.load(f"{d}/{t['features']}").astype(np.float32))
            crf.addPairwiseEnergy(f, compat=c, kernel=kernel, normalization=norm)
    q = np.array(crf.inference(spec["iterations"]), dtype=np.float32)
    np.save(f"{d}/q.npy", q)
    if spec["steps"] > 0:
        # tmp1 and tmp2 start as zeros of the final shape (startInference's are empty, and
        # their Python views keep the shape they were wrapped with).
        Q, _, _ = crf.startInference()
        tmp1, tmp2 = (eigen.matrixXf(np.zeros((m, n), np.float32)) for _ in range(2))
        for _ in range(spec["steps"]):
            crf.stepInference(Q, tmp1, tmp2)
        for name, a in [("q_step", Q), ("tmp1", tmp1), ("tmp2", tmp2)]:
            np.save(f"{d}/{name}.npy", np.array(a, dtype=np.float32))
    if spec["kl"]:
        json.dump({"kl": float(crf.klDivergence(crf.inference(spec["iterations"])))}, open(f"{d}/kl.json", "w"))


if __name__ == "__main__":
    for d in sys.argv[1:]:
        run(d)
