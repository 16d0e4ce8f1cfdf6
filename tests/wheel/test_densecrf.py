"""clipmask.densecrf against pydensecrf, called the way WSSS code calls it (CLIP-ES's
eval_cam_with_crf.py, IRN's / AFA's / ToCo's crf_inference): Q within 1e-5."""
import numpy as np
import pydensecrf.densecrf as pd
import pydensecrf.utils as pu
import pytest
from PIL import Image

import clipmask.densecrf as dcrf
import clipmask.densecrf.utils as cu

TOL = 1e-5


def photo(voc, ids, size=None):
    img = Image.open(voc / "JPEGImages" / f"{ids[0]}.jpg").convert("RGB")
    if size:
        img = img.resize(size)
    return np.asarray(img)


def softmax(rng, c, h, w, block=4):
    z = rng.normal(size=(c, h // block + 1, w // block + 1)) * 2
    z = np.repeat(np.repeat(z, block, 1), block, 2)[:, :h, :w]
    e = np.exp(z - z.max(0))
    return (e / e.sum(0)).astype(np.float32)


def both(fn):
    """Runs `fn(module)` with pydensecrf and with clipmask.densecrf; returns both Q arrays."""
    return np.array(fn(pd)), np.array(fn(dcrf))


def check(a, b, what):
    d = float(np.abs(a - b).max())
    print(f"{what}: max |Q - Q_pydensecrf| = {d:.2e}")
    assert a.shape == b.shape and d <= TOL, what


def test_utils_equal_pydensecrf(voc, ids):
    rng = np.random.default_rng(1)
    sm = softmax(rng, 4, 20, 30)
    assert np.array_equal(cu.unary_from_softmax(sm), pu.unary_from_softmax(sm))
    assert np.array_equal(cu.unary_from_softmax(sm, scale=0.8), pu.unary_from_softmax(sm, scale=0.8))
    assert np.array_equal(cu.unary_from_softmax(sm, clip=None), pu.unary_from_softmax(sm, clip=None))
    lab = rng.integers(0, 5, size=(20, 30))
    for zu in (True, False):
        assert np.array_equal(cu.unary_from_labels(lab, 5, 0.7, zero_unsure=zu), pu.unary_from_labels(lab, 5, 0.7, zero_unsure=zu))
    img = photo(voc, ids, (30, 20))
    assert np.array_equal(cu.create_pairwise_bilateral((5, 5), (3, 3, 3), img, chdim=2),
                          pu.create_pairwise_bilateral((5, 5), (3, 3, 3), img, chdim=2))
    assert np.array_equal(cu.create_pairwise_bilateral((5, 5), 3, img[..., 0]), pu.create_pairwise_bilateral((5, 5), 3, img[..., 0]))
    assert np.array_equal(cu.create_pairwise_gaussian((3, 2), (20, 30)), pu.create_pairwise_gaussian((3, 2), (20, 30)))


def test_clip_es_call_on_a_photo(voc, ids):
    """CLIP-ES's eval_cam_with_crf.py: DenseCRF2D, unary_from_softmax, gaussian sxy 1 compat 3,
    bilateral sxy 67 srgb 3 compat 4, 10 iterations."""
    img = photo(voc, ids)
    h, w = img.shape[:2]
    probs = softmax(np.random.default_rng(2), 3, h, w, block=16)

    def run(m):
        d = m.DenseCRF2D(w, h, 3)
        d.setUnaryEnergy(np.ascontiguousarray(pu.unary_from_softmax(probs)))
        d.addPairwiseGaussian(sxy=1, compat=3)
        d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(np.copy(img)), compat=4)
        return d.inference(10)

    a, b = both(run)
    check(b, a, "CLIP-ES call on a photo")
    assert (a.argmax(0) == b.argmax(0)).mean() >= 0.999


def test_irn_call_with_label_unaries(voc, ids):
    """IRN's / AFA's crf_inference_label: unary_from_labels(gt_prob=0.7), gaussian sxy 3
    compat 3, bilateral sxy 50 srgb 5 compat 10."""
    img = photo(voc, ids, (96, 64))
    h, w = img.shape[:2]
    lab = np.random.default_rng(3).integers(0, 4, size=(h, w))

    def run(m):
        d = m.DenseCRF2D(w, h, 4)
        d.setUnaryEnergy(pu.unary_from_labels(lab, 4, gt_prob=0.7, zero_unsure=False))
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(np.copy(img)), compat=10)
        return d.inference(10)

    a, b = both(run)
    check(b, a, "IRN call")


@pytest.mark.parametrize("compat", ["number", "vector", "matrix"])
@pytest.mark.parametrize("norm", [0, 1, 2, 3])
@pytest.mark.parametrize("kernel", [0, 1, 2])
def test_compat_kernel_normalization(voc, ids, compat, norm, kernel):
    rng = np.random.default_rng(4)
    img = photo(voc, ids, (40, 30))
    h, w, n = 30, 40, 4
    probs = softmax(rng, n, h, w)
    c = {"number": 3.0, "vector": rng.uniform(1, 4, n).astype(np.float32),
         "matrix": rng.uniform(-1, 3, (n, n)).astype(np.float32)}[compat]

    def run(m):
        d = m.DenseCRF2D(w, h, n)
        d.setUnaryEnergy(pu.unary_from_softmax(probs))
        d.addPairwiseGaussian(sxy=(2, 3), compat=c, kernel=kernel, normalization=norm)
        d.addPairwiseBilateral(sxy=(20, 15), srgb=(10, 12, 14), rgbim=np.ascontiguousarray(np.copy(img)), compat=c,
                               kernel=kernel, normalization=norm)
        return d.inference(5)

    a, b = both(run)
    check(b, a, f"compat {compat}, kernel {kernel}, normalization {norm}")


@pytest.mark.parametrize("dim", [1, 3, 7])
def test_pairwise_energy_with_features(dim):
    rng = np.random.default_rng(5 + dim)
    npix, n = 500, 3
    feats = (rng.normal(size=(dim, npix)) * 3).astype(np.float32)
    u = pu.unary_from_softmax(softmax(rng, n, 20, 25).reshape(n, -1))

    def run(m):
        d = m.DenseCRF(npix, n)
        d.setUnaryEnergy(u)
        d.addPairwiseEnergy(feats, compat=5)
        return d.inference(5)

    a, b = both(run)
    check(b, a, f"addPairwiseEnergy, {dim}-d features")


def test_step_inference(voc, ids):
    img = photo(voc, ids, (40, 30))
    probs = softmax(np.random.default_rng(6), 3, 30, 40)
    res = {}
    for name, m in (("pd", pd), ("cm", dcrf)):
        d = m.DenseCRF2D(40, 30, 3)
        d.setUnaryEnergy(pu.unary_from_softmax(probs))
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=20, srgb=5, rgbim=np.ascontiguousarray(np.copy(img)), compat=5)
        Q, t1, t2 = d.startInference()
        for _ in range(3):
            d.stepInference(Q, t1, t2)
        res[name] = (np.array(Q), np.array(d.inference(3)))
    check(res["cm"][0], res["pd"][0], "3 x stepInference")
    check(res["cm"][0], res["cm"][1], "stepInference vs inference(3)")


def test_errors_like_pydensecrf():
    d = dcrf.DenseCRF2D(10, 8, 3)
    with pytest.raises(ValueError, match="Bad shape for unary energy"):
        d.setUnaryEnergy(np.zeros((3, 79), np.float32))
    with pytest.raises(ValueError, match="Bad shape for pairwise energy"):
        d.addPairwiseEnergy(np.zeros((2, 79), np.float32), compat=3)
    with pytest.raises(ValueError):
        d.addPairwiseGaussian(sxy=3, compat=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError):
        d.addPairwiseBilateral(sxy=3, srgb=3, rgbim=np.zeros((8, 9, 3), np.uint8), compat=3)
