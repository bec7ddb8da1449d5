"""An independent float64 NumPy transcription of mergekit 0.1.5's merge methods.

Written from mergekit's source (wheel ``mergekit-0.1.5``), not from jmerge's code: each function
names the file/function it transcribes. Top-k selections use ``argsort`` (exactly k entries, as
mergekit), so they agree with jmerge's threshold selection whenever magnitudes are distinct.
Random methods take explicit boolean ``masks`` (True = keep).
"""

from __future__ import annotations

import numpy as np


def rescaled_masked(x, mask, rescale, eps=1e-7):
    """sparsify.rescaled_masked_tensor with norm l1 (or None)."""
    masked = x * mask
    if not rescale:
        return masked
    before, after = np.abs(x).sum(), np.abs(masked).sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def magnitude(x, density, rescale):
    """sparsify.magnitude."""
    if density >= 1:
        return x
    if density <= 0 or x.size == 0:
        return np.zeros_like(x)
    k = max(1, int(density * x.size))
    mask = np.zeros(x.size)
    mask[np.argsort(-np.abs(x).ravel(), kind="stable")[:k]] = 1
    return rescaled_masked(x, mask.reshape(x.shape), rescale)


def magnitude_outliers(x, density, gamma, rescale):
    """sparsify.magnitude_outliers."""
    if density >= 1:
        return x
    n = x.size
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    idx = np.argsort(np.abs(x).ravel(), kind="stable")
    mask = np.zeros(n)
    mask[idx[n_bot:n_bot + target]] = 1
    return rescaled_masked(x, mask.reshape(x.shape), rescale)


def bernoulli(x, density, mask, rescale):
    """sparsify.bernoulli with the Bernoulli draw replaced by ``mask``."""
    if density >= 1:
        return x
    return rescaled_masked(x, mask.astype(np.float64), rescale)


def della_probs(x, density, epsilon):
    """sparsify.della_magprune's keep probabilities (ranks along dim 1 after unsqueezing 1-D)."""
    y = x[None] if x.ndim < 2 else x
    ranks = np.argsort(np.argsort(np.abs(y), axis=1, kind="stable"), axis=1) + 1.0
    lo, hi = ranks.min(axis=1, keepdims=True), ranks.max(axis=1, keepdims=True)
    rank_norm = np.clip((ranks - lo) / (hi - lo), 0, 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(x.shape)


def della_magprune(x, density, epsilon, mask, rescale):
    """sparsify.della_magprune with the Bernoulli draw replaced by ``mask``."""
    if density >= 1:
        return x
    if density <= 0:
        return np.zeros_like(x)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("Epsilon must be chosen such that density +/- epsilon is in (0, 1)")
    return rescaled_masked(x, mask.astype(np.float64), rescale)


def get_mask(delta, method="sum"):
    """generalized_task_arithmetic.get_mask."""
    sign = np.sign(delta)
    if method == "sum":
        majority = (delta.sum(axis=0) >= 0) * 2.0 - 1
    else:
        majority = (sign.sum(axis=0) >= 0) * 2.0 - 1
    return sign == majority


def gta(base, tensors, weights, sparsify, *, consensus, normalize, lam):
    """GeneralizedTaskArithmeticMerge.merge_group; ``sparsify(i, delta_i)`` per model."""
    deltas = np.stack([sparsify(i, t - base) for i, t in enumerate(tensors)])
    w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * base.ndim)
    deltas = deltas * w
    if consensus:
        mask = get_mask(deltas, consensus)
        mixed = (deltas * mask).sum(axis=0)
        divisor = (w * mask).sum(axis=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(axis=0)
        divisor = w.sum(axis=0)
        divisor[np.abs(divisor) < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return base + mixed


def linear(tensors, weights, normalize=True):
    """merge_methods/linear.py linear_merge."""
    w = np.asarray(weights, np.float64)
    out = np.tensordot(w, tensors, axes=1)
    return out / w.sum() if normalize else out


def slerp(t, v0, v1, dot_threshold=0.9995, eps=1e-8):
    """merge_methods/slerp.py slerp for one tensor."""
    a, b = v0.ravel(), v1.ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    dot = np.clip(np.sum((a / na) * (b / nb)), -1, 1)
    if abs(dot) > dot_threshold:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    theta = np.arccos(dot)
    s = np.sin(theta)
    return ((np.sin((1 - t) * theta) / s) * a + (np.sin(t * theta) / s) * b).reshape(v0.shape)


def _nuslerp(t, v0, v1, dim=-1, eps=1e-8, flatten=False):
    """merge_methods/nuslerp.py nuslerp."""
    shape = v0.shape

    def normalize(x, eps=1e-7):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)

    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = np.swapaxes(v0, dim, -1), np.swapaxes(v1, dim, -1)
    cos = np.clip(np.sum(normalize(v0) * normalize(v1), axis=-1, keepdims=True), -1, 1)
    colinear = (1 - cos**2) <= eps**2
    theta = np.arccos(np.where(colinear, 0, cos))
    s = np.sin(theta)
    with np.errstate(divide="ignore", invalid="ignore"):
        res = (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / s
    res = np.where(colinear, (1 - t) * v0 + t * v1, res)
    if dim != -1 and not flatten:
        res = np.swapaxes(res, dim, -1)
    return res.reshape(shape)


def nuslerp(base, tensors, weights, row_wise=False, flatten=True):
    """merge_methods/nuslerp.py nuslerp_merge_method."""
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    dim = 0 if row_wise else -1
    if base is not None:
        return base + _nuslerp(t, tensors[0] - base, tensors[1] - base, dim=dim, flatten=flatten)
    return _nuslerp(t, tensors[0], tensors[1], dim=dim, flatten=flatten)


def model_stock(base, tensors, filter_wise=False):
    """merge_methods/model_stock.py model_stock_merge_method."""
    w0, ws = base, list(tensors)
    if filter_wise:
        if w0.ndim == 1:
            w0, ws = w0[None], [w[None] for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offs = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(offs):
        for b in offs[i + 1:]:
            norm = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
            cos.append(np.clip((a * b).sum(axis=-1) / np.maximum(norm, 1e-6), -1, 1))
    c = np.mean(np.stack(cos), axis=0)[..., None]
    n = len(ws)
    den = 1 + (n - 1) * c
    singular = np.abs(den) < 1e-6
    t = np.where(singular, 0, n * c / np.where(singular, 1, den))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(base.shape)


def sce(base, tensors, select_topk=1.0):
    """merge_methods/sce.py sce_merge, sce_mask, sce_weight."""
    tv = np.stack([t - base for t in tensors])
    if select_topk < 1:
        if select_topk <= 0:
            mask = np.zeros(base.shape)
        else:
            var = np.var(tv, axis=0)
            k = int(np.float32(np.count_nonzero(var)) * np.float32(select_topk))
            mask = np.zeros(var.size)
            if k > 0:
                mask[np.argsort(-np.abs(var).ravel(), kind="stable")[:k]] = 1
            mask = mask.reshape(var.shape)
        tv = tv * mask[None]
    erase = get_mask(tv, "sum")
    v = np.square(tv).reshape(len(tv), -1).mean(axis=1)
    s = v.sum()
    w = np.ones_like(v) / len(v) if abs(s) < 1e-6 else v / s
    w = w.reshape((-1,) + (1,) * base.ndim)
    ew = w * erase
    return base + (tv * ew).sum(axis=0) / np.maximum(ew.sum(axis=0), 1e-6)
