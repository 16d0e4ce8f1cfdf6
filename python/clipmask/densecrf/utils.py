"""``pydensecrf.utils``'s helpers (numpy only), for ``from clipmask.densecrf.utils import ...``.
Same arguments and results as pydensecrf's (tests/python compares them)."""
from __future__ import annotations

from numbers import Number

import numpy as np

__all__ = ["unary_from_labels", "unary_from_softmax", "create_pairwise_gaussian", "create_pairwise_bilateral"]


def unary_from_labels(labels, n_labels, gt_prob, zero_unsure=True):
    """Unary energy (n_labels, N) float32 from a label map: ``-log(gt_prob)`` for the given
    label, ``-log((1 - gt_prob) / (n_labels - 1))`` for the others; with ``zero_unsure`` label 0
    means "unknown" (uniform) and label l is channel l - 1."""
    if not 0 < gt_prob < 1:
        raise ValueError("gt_prob must be in (0, 1)")
    flat = np.asarray(labels).flatten()
    wrong = -np.log((1.0 - gt_prob) / (n_labels - 1))
    right = -np.log(gt_prob)
    u = np.full((n_labels, len(flat)), wrong, dtype="float32")
    # The given label first, then (zero_unsure) the unknown pixels overwrite whole columns.
    u[flat - 1 if zero_unsure else flat, np.arange(u.shape[1])] = right
    if zero_unsure:
        u[:, flat == 0] = -np.log(1.0 / n_labels)
    return u


def unary_from_softmax(sm, scale=None, clip=1e-5):
    """Unary energy (C, N) float32 = -log(p) of softmax probabilities ``sm`` (C, ...): with
    ``scale`` mixed towards uniform first, clipped to [clip, 1]."""
    sm = np.asarray(sm)
    n = sm.shape[0]
    if scale is not None:
        if not 0 < scale <= 1:
            raise ValueError("scale must be in (0, 1]")
        sm = scale * sm + (1 - scale) * (np.ones(sm.shape) / n)
    if clip is not None:
        sm = np.clip(sm, clip, 1.0)
    return -np.log(sm).reshape([n, -1]).astype(np.float32)


def _scaled_mesh(sdims, shape):
    mesh = np.array(np.meshgrid(*[range(s) for s in shape], indexing="ij"), dtype=np.float32)
    for i, s in enumerate(sdims):
        mesh[i] /= s
    return mesh


def create_pairwise_gaussian(sdims, shape):
    """Position features (len(sdims), N) float32: each coordinate divided by its ``sdims``."""
    return _scaled_mesh(sdims, shape).reshape([len(sdims), -1])


def create_pairwise_bilateral(sdims, schan, img, chdim=-1):
    """Position and channel features (len(sdims) + C, N) float32: coordinates / ``sdims`` and
    image channels / ``schan``; ``chdim`` is the image's channel axis (-1: no channel axis)."""
    img = np.asarray(img)
    chans = img[np.newaxis].astype(np.float32) if chdim == -1 else np.rollaxis(img, chdim).astype(np.float32)
    if isinstance(schan, Number):
        chans /= schan
    else:
        for i, s in enumerate(schan):
            chans[i] /= s
    feats = np.concatenate([_scaled_mesh(sdims, chans.shape[1:]), chans])
    return feats.reshape([feats.shape[0], -1])
