"""Sparsifying transforms of task vectors (TIES, DARE) and the merges built from them.

The transforms are small pure functions over *stacked* task vectors τ (a pytree whose leaves
have shape ``(T, *s)``, τ_t = θ_t − θ0, see :func:`jmerge.merges.basic.task_vectors`), each
returning a pytree of the same layout, so that they compose:

* :func:`trim_topk` — keep the top-``density`` magnitudes of each τ_t (per tensor or over the
  whole model), zero the rest (TIES step 1).
* :func:`drop_and_rescale` — keep each entry with probability ``density`` and rescale by
  1/``density`` (DARE), so that E[drop(τ)] = τ.
* :func:`elect_sign` — γ = sgn(Σ_t τ_t) per entry (TIES step 2).
* :func:`disjoint_mean` — the mean over the models whose entry is non-zero and agrees with γ
  (TIES step 3).

The merges compose them: ``ties`` = trim → elect → disjoint mean, ``dare`` = drop → sum,
``dare_ties`` = drop → elect → disjoint mean, each added to θ0 with a scale α.

Excluded leaves (``include``/``exclude``, see :mod:`jmerge.merges.basic`) take no part in any
transform — in particular not in the global top-k threshold — and are returned unchanged from
``pretrained``. Computation is in at least float32; merged leaves are cast back to the
pretrained dtype.

Every function runs inside ``jax.jit``, ``jax.vmap`` and ``jax.grad``, with its arrays passed as
arguments or closed over; ``density`` and ``scope`` of the top-k trimming are static (they fix
the number k of kept entries), DARE's ``density`` and every ``alpha`` may be traced. Concrete
inputs are checked when the function is called; traced ones at run time (a ``density``
outside (0, 1], a NaN or Inf in a merge's result: a ``RuntimeWarning`` and a
``jax.experimental.checkify`` error under ``checkify.checkify(f, errors=checkify.user_checks)``).
"""

from __future__ import annotations

import math
import zlib
from functools import partial
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jmerge.merges._common import check_result, per_model, prepare, select, weighted_sum
from jmerge.merges.basic import Models, _keep, _task_vectors
from jmerge.tree import LeafFilter, is_traced, require

__all__ = [
    "trim_topk",
    "drop_and_rescale",
    "elect_sign",
    "disjoint_mean",
    "ties",
    "dare",
    "dare_ties",
]

PyTree = Any
_SCOPES = ("tensor", "global")


def _check_density(density: Any, *, allow_traced: bool = False) -> Any:
    """``density`` as a float in (0, 1]; a clear error otherwise.

    A traced density, where allowed, is checked at run time (:func:`jmerge.tree.require`).
    """
    if is_traced(density):
        if allow_traced:
            require(
                (density > 0) & (density <= 1),
                "density must be in (0, 1] (the fraction kept); found outside at run time, "
                "inside jax.jit/vmap/grad.",
            )
            return density
        raise TypeError(
            "density must be a concrete number here (it fixes the number of kept entries); "
            "mark it static under jax.jit (static_argnames=('density',))."
        )
    d = float(density)
    if not 0.0 < d <= 1.0:
        raise ValueError(f"density must be in (0, 1] (the fraction kept); got {density}.")
    return d


def _check_scalar(value: Any, name: str) -> jax.Array:
    a = jnp.asarray(value)
    if a.ndim != 0:
        raise ValueError(f"{name} must be a scalar here; got shape {tuple(a.shape)}.")
    return a


def _num_kept(density: float, n: int) -> int:
    """k = round(density · n), at least 1 and at most n (round half up)."""
    return min(n, max(1, math.floor(density * n + 0.5)))


def _kth_largest(mags: jax.Array, k: int) -> jax.Array:
    """The k-th largest entry of each row of ``mags`` (T, n) -> (T,), via ``lax.top_k``."""
    return jax.lax.top_k(mags, k)[0][:, k - 1]


def trim_topk(tvs: chex.ArrayTree, density: float, *, scope: str = "tensor") -> chex.ArrayTree:
    """Keep the top-``density`` fraction of entries of each task vector by magnitude.

    TIES-Merging step 1 ("trim", Yadav et al. 2023, §3.1 and Alg. 1): τ̂_t = τ_t ⊙ m_t with
    m_t = [|τ_t| ≥ κ_t], κ_t the k-th largest magnitude and k = round(density · n) (at least 1),
    where n and κ_t are taken

    * ``scope="tensor"``: per leaf of each model (n = leaf size), as in mergekit;
    * ``scope="global"``: over all leaves of one model at once (n = number of parameters in
      the tree), as in the TIES and MaTS reference code.

    Ties at the threshold: every entry with |τ| = κ_t is kept, so more than k entries survive
    when magnitudes repeat (e.g. a task vector with fewer than k non-zero entries keeps all of
    them and its zeros, which changes nothing).

    Cost: ``lax.top_k`` over n entries per model, a sort-like O(n log n) on CPU/GPU. The global
    scope also concatenates the magnitudes of all leaves into one (T, n_total) array, i.e.
    one extra copy of the task vectors in memory.

    Args:
      tvs: stacked task vectors, leaves ``(T, *s)`` (``None`` leaves are skipped).
      density: fraction of entries kept, in (0, 1]; static (a Python float).
      scope: ``"tensor"`` or ``"global"``; static.

    Returns:
      The trimmed task vectors, same layout and dtype.
    """
    density = _check_density(density)
    if scope not in _SCOPES:
        raise ValueError(f"scope must be one of {_SCOPES}; got {scope!r}.")
    return _trim_topk(tvs, density=density, scope=scope)


@partial(jax.jit, static_argnames=("density", "scope"))
def _trim_topk(tvs: PyTree, *, density: float, scope: str) -> PyTree:
    if not jax.tree_util.tree_leaves(tvs):
        return tvs

    def keep_above(x, thr):
        thr = thr.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
        return jnp.where(jnp.abs(x) >= thr, x, jnp.zeros_like(x))

    if scope == "tensor":

        def leaf(x):
            flat = jnp.abs(x.reshape(x.shape[0], -1))
            if flat.shape[1] == 0:
                return x
            return keep_above(x, _kth_largest(flat, _num_kept(density, flat.shape[1])))

        return jax.tree_util.tree_map(leaf, tvs)

    mags = jnp.abs(jax.vmap(lambda model: ravel_pytree(model)[0])(tvs))
    if mags.shape[1] == 0:
        return tvs
    thr = _kth_largest(mags, _num_kept(density, mags.shape[1]))
    return jax.tree_util.tree_map(lambda x: keep_above(x, thr), tvs)


_BLOCK = 4096  # random numbers are drawn in blocks of this many entries


def _block_ids(path: Any, x: jax.Array) -> np.ndarray:
    """(T·b, 2) rows ``(crc32(keystr(path)), t·b + i)`` for block i of model t of a leaf."""
    num_models, n = x.shape[0], math.prod(x.shape[1:])
    blocks = -(-n // _BLOCK)
    tag = zlib.crc32(jax.tree_util.keystr(path).encode()) & 0x7FFFFFFF
    rows = np.arange(num_models * blocks)
    return np.stack([np.full_like(rows, tag), rows], axis=1).astype(np.uint32)


def _uniforms(key: jax.Array, tvs: PyTree) -> PyTree:
    """U[0, 1) (float32, multiples of 2⁻²⁴) per entry of every leaf, from one batched draw.

    Block i of model t of the leaf at ``path`` (b blocks per model) draws from the key
    ``fold_in(fold_in(key, crc32(keystr(path))), t·b + i)``: independent across leaves,
    models and blocks, and a leaf's numbers depend on its path only (leaving other leaves out
    of a merge does not change them). All blocks go through one vmapped threefry call, so the
    compile time does not grow with the number of leaves (one ``jax.random`` call per leaf
    costs seconds of XLA compile each on CPU). Memory: one uint32 per entry (rounded up to
    whole blocks of 4096 per leaf and model).
    """
    ids = jax.tree_util.tree_map_with_path(_block_ids, tvs)
    counts = list(map(len, jax.tree_util.tree_leaves(ids)))
    starts = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(ids), np.cumsum([0, *counts[:-1]]).tolist()
    )
    fold = lambda r: jax.random.fold_in(jax.random.fold_in(key, r[0]), r[1])
    keys = jax.vmap(fold)(jnp.asarray(np.concatenate(jax.tree_util.tree_leaves(ids))))
    bits = jax.vmap(lambda k: jax.random.bits(k, (_BLOCK,), jnp.uint32))(keys)
    u = (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)

    def leaf(x, start, rows):
        n = math.prod(x.shape[1:])
        block = u[start : start + rows.shape[0]].reshape(x.shape[0], -1)
        return block[:, :n].reshape(x.shape)

    return jax.tree_util.tree_map(leaf, tvs, starts, ids)


def drop_and_rescale(tvs: chex.ArrayTree, density: Any, key: jax.Array) -> chex.ArrayTree:
    """DARE: drop each entry with probability 1 − ``density``, rescale the rest by 1/``density``.

    Yu et al. 2024 ("Language Models are Super Mario", eq. 2–3): τ̃_t = m_t ⊙ τ_t / p with
    m_t ~ Bernoulli(p) entrywise, p = ``density``, hence E[τ̃_t] = τ_t.

    Independent randomness per leaf, model and entry: m = [u < p] with u uniform on the
    multiples of 2⁻²⁴ in [0, 1) (so P(keep) = ⌈p·2²⁴⌉/2²⁴, within 6e-8 of p). Leaf ``path`` of
    model t draws from keys ``fold_in(fold_in(key, crc32(keystr(path))), t·b + i)`` for its
    blocks i < b of 4096 entries (a key tree over leaves, models and blocks; see
    :func:`_uniforms`), so a leaf's mask does not depend on the other leaves.

    Args:
      tvs: stacked task vectors, leaves ``(T, *s)`` (``None`` leaves are skipped).
      density: the keep probability p in (0, 1]; may be traced (then checked at run time).
      key: a PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``).

    Returns:
      The dropped and rescaled task vectors, same layout and dtype.
    """
    return _drop_and_rescale(tvs, _check_density(density, allow_traced=True), key)


@jax.jit
def _drop_and_rescale(tvs: PyTree, density: Any, key: jax.Array) -> PyTree:
    if not jax.tree_util.tree_leaves(tvs):
        return tvs

    def leaf(u, x):
        keep = u < jnp.asarray(density, u.dtype)
        return jnp.where(keep, x / jnp.asarray(density, x.dtype), jnp.zeros_like(x))

    return jax.tree_util.tree_map(leaf, _uniforms(key, tvs), tvs)


def elect_sign(tvs: chex.ArrayTree) -> chex.ArrayTree:
    """TIES step 2 (Yadav et al. 2023, §3.1, eq. for γ_m): γ = sgn(Σ_t τ_t), shape ``s`` per leaf.

    The sign of the total mass per entry; 0 where the sum is exactly 0 (no model then agrees
    in :func:`disjoint_mean`, so such entries merge to 0).
    """
    return _elect_sign(tvs)


@jax.jit
def _elect_sign(tvs: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x: jnp.sign(jnp.sum(x, axis=0)), tvs)


def disjoint_mean(tvs: chex.ArrayTree, sign: chex.ArrayTree) -> chex.ArrayTree:
    """TIES step 3 (Yadav et al. 2023, §3.1): the mean over the models that agree with γ.

    τ_m = Σ_{t ∈ A} τ_t / |A| per entry, A = {t : τ_t ≠ 0 and sgn(τ_t) = γ}; 0 where A is empty.

    Args:
      tvs: stacked task vectors, leaves ``(T, *s)``.
      sign: elected signs, leaves ``s`` (:func:`elect_sign`).

    Returns:
      A pytree with leaves of shape ``s``.
    """
    return _disjoint_mean(tvs, sign)


@jax.jit
def _disjoint_mean(tvs: PyTree, sign: PyTree) -> PyTree:
    def leaf(x, g):
        agree = (jnp.sign(x) == g[None].astype(x.dtype)) & (x != 0)
        total = jnp.sum(jnp.where(agree, x, jnp.zeros_like(x)), axis=0)
        count = jnp.sum(agree, axis=0)
        return total / jnp.maximum(count, 1).astype(x.dtype)

    return jax.tree_util.tree_map(leaf, tvs, sign)


def _add_to(pretrained: PyTree, update: PyTree) -> PyTree:
    """θ0 + update, computed in the update's dtype and cast back to each θ0 leaf's dtype."""
    return jax.tree_util.tree_map(
        lambda p, u: (p.astype(u.dtype) + u).astype(p.dtype), pretrained, update
    )


@partial(jax.jit, static_argnames=("density", "scope"))
def _ties_kernel(pretrained, stacked, alpha, *, density, scope):
    trimmed = _trim_topk(_task_vectors(pretrained, stacked), density=density, scope=scope)
    merged = _disjoint_mean(trimmed, _elect_sign(trimmed))
    return _add_to(pretrained, jax.tree_util.tree_map(lambda m: alpha.astype(m.dtype) * m, merged))


def ties(
    pretrained: chex.ArrayTree,
    finetuned: Models,
    *,
    density: float,
    alpha: Any = 1.0,
    scope: str = "tensor",
    include: LeafFilter = None,
    exclude: LeafFilter = None,
) -> chex.ArrayTree:
    """TIES-Merging (Yadav et al. 2023, NeurIPS, Alg. 1): trim, elect sign, disjoint merge.

    θ = θ0 + α · disjoint_mean(τ̂, elect_sign(τ̂)),  τ̂ = trim_topk(θ_t − θ0, density, scope).

    Args:
      pretrained: θ0, leaf shape ``s``.
      finetuned: θ_1..θ_T: a list of pytrees or one stacked pytree with leaves ``(T, *s)``.
      density: fraction of each task vector kept by magnitude, in (0, 1] (the paper's k,
        e.g. 0.2); static under jit.
      alpha: scalar scale λ of the merged task vector (may be traced).
      scope: top-k per ``"tensor"`` or over the whole model (``"global"``, as in the paper's
        code); see :func:`trim_topk`. Static.
      include, exclude: leaf filter; leaves left out (e.g. per-task heads) are returned from
        ``pretrained`` and take no part in the global threshold.

    Returns:
      A pytree shaped and typed like ``pretrained``.
    """
    density = _check_density(density)
    if scope not in _SCOPES:
        raise ValueError(f"scope must be one of {_SCOPES}; got {scope!r}.")
    a = _check_scalar(alpha, "alpha (TIES scales the merged task vector)")
    prep = prepare(pretrained, finetuned, include=include, exclude=exclude)
    merged = _ties_kernel(
        _keep(prep.mask, pretrained),
        _keep(prep.mask, prep.stacked),
        a,
        density=density,
        scope=scope,
    )
    merged = select(prep.mask, merged, pretrained)
    return check_result(merged, "ties", pretrained, finetuned, alpha)


@jax.jit
def _dare_kernel(pretrained, stacked, alpha, density, key):
    dropped = _drop_and_rescale(_task_vectors(pretrained, stacked), density, key)
    return _add_to(pretrained, jax.tree_util.tree_map(lambda d: weighted_sum(d, alpha), dropped))


def dare(
    pretrained: chex.ArrayTree,
    finetuned: Models,
    *,
    density: Any,
    key: jax.Array,
    alpha: Any = 1.0,
    include: LeafFilter = None,
    exclude: LeafFilter = None,
) -> chex.ArrayTree:
    """DARE + task arithmetic (Yu et al. 2024, ICML, "Language Models are Super Mario", §4.1).

    θ = θ0 + Σ_t α_t drop_and_rescale(θ_t − θ0),  drop_and_rescale keeping each entry with
    probability ``density`` and scaling it by 1/``density``.

    DARE is a pre-processing of the task vectors, which the paper then merges with existing
    methods; here they are **summed** with scale α as in task arithmetic (not averaged), so that
    the expectation over keys is exactly :func:`jmerge.merges.basic.task_arithmetic` with the
    same ``alpha`` (use α = 1/T for an average).

    Args:
      pretrained: θ0, leaf shape ``s``.
      finetuned: θ_1..θ_T: a list of pytrees or one stacked pytree with leaves ``(T, *s)``.
      density: keep probability p = 1 − drop rate, in (0, 1]; may be traced (then checked at
        run time).
      key: a PRNG key; every leaf and model draws independently (:func:`drop_and_rescale`).
      alpha: scalar or one per model (may be traced).
      include, exclude: leaf filter; leaves left out are returned from ``pretrained``.

    Returns:
      A pytree shaped and typed like ``pretrained``.
    """
    density = _check_density(density, allow_traced=True)
    prep = prepare(pretrained, finetuned, include=include, exclude=exclude)
    a = per_model(alpha, prep.num_models, "alpha")
    merged = _dare_kernel(
        _keep(prep.mask, pretrained), _keep(prep.mask, prep.stacked), a, density, key
    )
    merged = select(prep.mask, merged, pretrained)
    return check_result(merged, "dare", pretrained, finetuned, alpha, density)


@jax.jit
def _dare_ties_kernel(pretrained, stacked, alpha, density, key):
    dropped = _drop_and_rescale(_task_vectors(pretrained, stacked), density, key)
    merged = _disjoint_mean(dropped, _elect_sign(dropped))
    return _add_to(pretrained, jax.tree_util.tree_map(lambda m: alpha.astype(m.dtype) * m, merged))


def dare_ties(
    pretrained: chex.ArrayTree,
    finetuned: Models,
    *,
    density: Any,
    key: jax.Array,
    alpha: Any = 1.0,
    include: LeafFilter = None,
    exclude: LeafFilter = None,
) -> chex.ArrayTree:
    """DARE then TIES sign election and disjoint mean (Yu et al. 2024, §4.1, "DARE + TIES").

    θ = θ0 + α · disjoint_mean(τ̃, elect_sign(τ̃)),  τ̃ = drop_and_rescale(θ_t − θ0, density, key).

    Args:
      pretrained: θ0, leaf shape ``s``.
      finetuned: θ_1..θ_T: a list of pytrees or one stacked pytree with leaves ``(T, *s)``.
      density: keep probability in (0, 1]; may be traced (then checked at run time).
      key: a PRNG key.
      alpha: scalar scale of the merged task vector (may be traced).
      include, exclude: leaf filter; leaves left out are returned from ``pretrained``.

    Returns:
      A pytree shaped and typed like ``pretrained``.
    """
    density = _check_density(density, allow_traced=True)
    a = _check_scalar(alpha, "alpha (DARE-TIES scales the merged task vector)")
    prep = prepare(pretrained, finetuned, include=include, exclude=exclude)
    merged = _dare_ties_kernel(
        _keep(prep.mask, pretrained), _keep(prep.mask, prep.stacked), a, density, key
    )
    merged = select(prep.mask, merged, pretrained)
    return check_result(merged, "dare_ties", pretrained, finetuned, alpha, density)
