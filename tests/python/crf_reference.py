"""pydensecrf reference for clipmask's dense CRF (tests/it/crf_parity.rs, scripts/bench_crf.py).

Runs the CRF exactly as CLIP-ES does (method.md §6):

    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(unary_from_softmax(probs))
    d.addPairwiseGaussian(sxy=..., compat=...)
    d.addPairwiseBilateral(sxy=..., srgb=..., rgbim=img, compat=...)
    q = d.inference(10)

Usage:
    crf_reference.py crf DIR [options]      DIR/image.npy (H x W x 3 uint8, already converted
                                            for the CRF), DIR/probs.npy (C x H x W float32)
                                            -> DIR/q.npy (C x H x W float32)
    crf_reference.py faithful IN.npy OUT.npy
                                            RGB H x W x 3 uint8 -> the reference's CRF image:
                                            BGR (as cv2.imread gives it) minus the mean
                                            (104.008, 116.669, 122.675), .astype(np.uint8)
A kernel whose weight is 0 is not added.
"""
import argparse
import sys

import numpy as np


def reference_crf(img, probs, iterations=10, gaussian_sxy=1.0, gaussian_weight=3.0,
                  bilateral_sxy=67.0, bilateral_srgb=3.0, bilateral_weight=4.0):
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    c, h, w = probs.shape
    assert img.shape == (h, w, 3) and img.dtype == np.uint8
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    if gaussian_weight != 0:
        d.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_weight)
    if bilateral_weight != 0:
        d.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb,
                               rgbim=np.ascontiguousarray(img), compat=bilateral_weight)
    q = d.inference(iterations)
    return np.array(q, dtype=np.float32).reshape(c, h, w)


def faithful(rgb):
    bgr = np.ascontiguousarray(rgb[..., ::-1])  # what cv2.imread returns
    return (bgr - np.array([104.008, 116.669, 122.675])).astype(np.uint8)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("crf")
    a.add_argument("dir")
    a.add_argument("--iterations", type=int, default=10)
    a.add_argument("--gaussian-sxy", type=float, default=1.0)
    a.add_argument("--gaussian-weight", type=float, default=3.0)
    a.add_argument("--bilateral-sxy", type=float, default=67.0)
    a.add_argument("--bilateral-srgb", type=float, default=3.0)
    a.add_argument("--bilateral-weight", type=float, default=4.0)
    f = sub.add_parser("faithful")
    f.add_argument("input")
    f.add_argument("output")
    args = ap.parse_args(argv)
    if args.cmd == "crf":
        img = np.load(f"{args.dir}/image.npy")
        probs = np.load(f"{args.dir}/probs.npy").astype(np.float32)
        q = reference_crf(img, probs, args.iterations, args.gaussian_sxy, args.gaussian_weight,
                          args.bilateral_sxy, args.bilateral_srgb, args.bilateral_weight)
        np.save(f"{args.dir}/q.npy", q)
    else:
        np.save(args.output, faithful(np.load(args.input)))


if __name__ == "__main__":
    main(sys.argv[1:])
