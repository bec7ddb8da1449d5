"""Fixtures shared by the tests: small problems and independent NumPy references.

Tests import jmerge's public names only; what they compare against is written here, in
float64 NumPy, without jmerge.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {"a": (3,), "c": (2, 3)}


def problem(seed=0, num_models=2, dtype=np.float64, shapes=SHAPES, fisher_range=(0.2, 2.0)):
    """(pretrained, [finetuned], [diagonal Fisher]) on a two-leaf dict of ``shapes``."""
    rng = np.random.default_rng(seed)
    pre = {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in shapes.items()}
    ft = [
        {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in shapes.items()}
        for _ in range(num_models)
    ]
    fish = [
        {k: jnp.asarray(rng.uniform(*fisher_range, size=s)) for k, s in shapes.items()}
        for _ in range(num_models)
    ]
    return pre, ft, fish


def stack(trees):
    """Models as one pytree with a leading model axis."""
    return jax.tree_util.tree_map(lambda *x: jnp.stack(x), *trees)


def scale_tree(tree, c):
    return jax.tree_util.tree_map(lambda x: x * jnp.asarray(c, x.dtype), tree)


def ravel(tree) -> np.ndarray:
    """The leaves of a dict pytree, float64, concatenated in sorted-key order."""
    return np.concatenate([np.asarray(tree[k], np.float64).ravel() for k in sorted(tree)])


def unravel(vec: np.ndarray, like) -> dict:
    out, i = {}, 0
    for k in sorted(like):
        n = int(np.size(like[k]))
        out[k] = vec[i : i + n].reshape(np.shape(like[k]))
        i += n
    return out


def leaf_selector(like, keys) -> np.ndarray:
    """Boolean vector over ``ravel(like)``: True on the entries of the leaves in ``keys``."""
    return np.concatenate([np.full(int(np.size(like[k])), k in keys) for k in sorted(like)])


def diag_merge(pre, ft, fish, w, damping=0.0, anchor=None):
    """(Σ_t w_t d_t θ_t + δ a) / (Σ_t w_t d_t + δ), leafwise in NumPy (a = θ0 by default)."""
    anchor = pre if anchor is None else anchor
    out = {}
    for k in pre:
        num = sum(
            wt * np.asarray(f[k], np.float64) * np.asarray(t[k], np.float64)
            for wt, f, t in zip(w, fish, ft, strict=True)
        )
        den = sum(wt * np.asarray(f[k], np.float64) for wt, f in zip(w, fish, strict=True))
        out[k] = (num + damping * np.asarray(anchor[k])) / (den + damping)
    return out


def diag_objective(theta, pre, ft, fish, w, damping=0.0):
    total = 0.0
    for k in pre:
        for wt, f, t in zip(w, fish, ft, strict=True):
            total += wt * np.sum(np.asarray(f[k]) * (np.asarray(theta[k]) - np.asarray(t[k])) ** 2)
        total += damping * np.sum((np.asarray(theta[k]) - np.asarray(pre[k])) ** 2)
    return 0.5 * total


def spd(n, kappa, seed):
    """A dense SPD matrix with eigenvalues log-spaced in [1, κ], and a right-hand side."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * np.logspace(0, np.log10(kappa), n)) @ q.T, rng.normal(size=n)


def dense_mv(v, m):
    """(M v) for a dense (n, n) M over the raveled dict pytree v (the ``ravel`` order)."""
    keys = sorted(v)
    flat = jnp.concatenate([v[k].reshape(-1) for k in keys])
    out = m.astype(flat.dtype) @ flat
    res, i = {}, 0
    for k in keys:
        n = v[k].size
        res[k] = out[i : i + n].reshape(v[k].shape)
        i += n
    return res
