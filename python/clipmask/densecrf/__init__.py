"""A drop-in for pydensecrf: ``import clipmask.densecrf as dcrf``.

The subset weakly supervised segmentation code uses (CLIP-ES, AFA, ToCo, IRN): ``DenseCRF2D``
and ``DenseCRF``, ``setUnaryEnergy``, ``addPairwiseGaussian``, ``addPairwiseBilateral``,
``addPairwiseEnergy`` (``compat`` a number, a vector or a matrix; ``kernel`` and
``normalization`` as pydensecrf accepts them), ``inference``, ``startInference`` /
``stepInference`` and ``klDivergence``; and ``clipmask.densecrf.utils`` (``unary_from_softmax``,
``unary_from_labels``, ``create_pairwise_bilateral``, ``create_pairwise_gaussian``).

The engine is clipmask's dense CRF, which reproduces pydensecrf's arithmetic (Q within 1e-5 of
pydensecrf's). Matrices are numpy float32 arrays of pydensecrf's shapes (labels x pixels), so
``np.array(Q)`` and ``np.argmax(Q, axis=0)`` work as with pydensecrf's ``MatrixXf``.
"""
from __future__ import annotations

from numbers import Number

import numpy as np

from .. import _load_native
from . import utils  # noqa: F401

_native = _load_native()

# pydensecrf's enum values.
CONST_KERNEL = 0
DIAG_KERNEL = 1
FULL_KERNEL = 2
NO_NORMALIZATION = 0
NORMALIZE_BEFORE = 1
NORMALIZE_AFTER = 2
NORMALIZE_SYMMETRIC = 3

__all__ = [
    "DenseCRF",
    "DenseCRF2D",
    "CONST_KERNEL",
    "DIAG_KERNEL",
    "FULL_KERNEL",
    "NO_NORMALIZATION",
    "NORMALIZE_BEFORE",
    "NORMALIZE_AFTER",
    "NORMALIZE_SYMMETRIC",
    "utils",
]


def _compat(compat):
    """pydensecrf's label compatibility: a number (Potts), a vector (diagonal) or a matrix."""
    if isinstance(compat, Number):
        return ("potts", [float(compat)], 0)
    a = np.asarray(compat, dtype=np.float32)
    if a.ndim == 1:
        return ("diagonal", a.tolist(), 0)
    if a.ndim == 2:
        if a.shape[0] != a.shape[1]:
            raise ValueError(f"a compatibility matrix must be square, got shape {a.shape}")
        return ("matrix", a.flatten().tolist(), int(a.shape[0]))
    raise ValueError("LabelCompatibility of dimension >2 not meaningful.")


def _f32(a, shape, what):
    a = np.asarray(a)
    if a.shape != shape:
        raise ValueError(f"Bad shape for {what} (Need {shape}, got {a.shape})")
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


class DenseCRF:
    """A fully connected CRF over ``nvar`` variables with ``nlabels`` labels (pydensecrf's
    ``DenseCRF``)."""

    def __init__(self, nvar, nlabels, *_):
        self._nvar = int(nvar)
        self._nlabel = int(nlabels)
        self._c = _native.DenseCrf(self._nvar, self._nlabel)

    def setUnaryEnergy(self, u, f=None):
        """The unary energy, (nlabels, nvar) float32 (e.g. ``utils.unary_from_softmax``)."""
        if f is not None:
            raise NotImplementedError("setUnaryEnergy with features (the logistic unary) is not supported")
        self._c.set_unary_energy(_f32(u, (self._nlabel, self._nvar), "unary energy"))

    def addPairwiseEnergy(self, features, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC):
        """A Gaussian pairwise term on ``features`` (D, nvar) float32."""
        f = np.asarray(features)
        if f.ndim != 2 or f.shape[1] != self._nvar:
            raise ValueError(f"Bad shape for pairwise energy (Need (?, {self._nvar}), got {f.shape})")
        self._c.add_pairwise_energy(_f32(f, f.shape, "pairwise energy"), int(f.shape[0]), *_compat(compat), int(kernel), int(normalization))

    def _matrix(self, data):
        return np.frombuffer(data, dtype="<f4").reshape(self._nlabel, self._nvar).copy()

    def inference(self, niter):
        """Q after ``niter`` mean-field iterations, (nlabels, nvar) float32."""
        return self._matrix(self._c.inference(int(niter)))

    def startInference(self):
        """(Q, tmp1, tmp2) before the first iteration, for ``stepInference``."""
        return tuple(self._matrix(m) for m in self._c.start_inference())

    def stepInference(self, Q, tmp1, tmp2):
        """One mean-field iteration, updating Q (and tmp1, tmp2) in place."""
        shape = (self._nlabel, self._nvar)
        outs = self._c.step_inference(_f32(Q, shape, "Q"), _f32(tmp1, shape, "tmp1"), _f32(tmp2, shape, "tmp2"))
        for dst, data in zip((Q, tmp1, tmp2), outs):
            dst[...] = self._matrix(data)

    def klDivergence(self, Q):
        """The KL divergence of Q to the CRF's distribution (up to a constant), as pydensecrf."""
        return self._c.kl_divergence(_f32(Q, (self._nlabel, self._nvar), "Q"))


class DenseCRF2D(DenseCRF):
    """A dense CRF on a ``w`` x ``h`` image (pydensecrf's ``DenseCRF2D``)."""

    def __init__(self, w, h, nlabels, *_):
        super().__init__(int(w) * int(h), nlabels)
        self._w = int(w)
        self._h = int(h)

    def addPairwiseGaussian(self, sxy, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC):
        """Smoothness: a Gaussian on positions with standard deviation ``sxy`` (a number or
        (sx, sy))."""
        if isinstance(sxy, Number):
            sxy = (sxy, sxy)
        self._c.add_pairwise_gaussian_2d(self._w, self._h, float(sxy[0]), float(sxy[1]), *_compat(compat), int(kernel), int(normalization))

    def addPairwiseBilateral(self, sxy, srgb, rgbim, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC):
        """Appearance: a Gaussian on positions (``sxy``) and colours (``srgb``) of ``rgbim``,
        an (h, w, 3) uint8 image."""
        if isinstance(sxy, Number):
            sxy = (sxy, sxy)
        if isinstance(srgb, Number):
            srgb = (srgb, srgb, srgb)
        im = np.asarray(rgbim)
        if im.dtype != np.uint8 or im.shape != (self._h, self._w, 3):
            raise ValueError(f"Bad shape for pairwise bilateral (Need ({self._h}, {self._w}, 3) uint8, got {im.shape} {im.dtype})")
        self._c.add_pairwise_bilateral_2d(
            self._w, self._h, float(sxy[0]), float(sxy[1]), float(srgb[0]), float(srgb[1]), float(srgb[2]),
            np.ascontiguousarray(im).tobytes(), *_compat(compat), int(kernel), int(normalization),
        )
