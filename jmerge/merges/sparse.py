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

import functools
import math
import zlib
from functools import partial
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jmerge.merges._common import check_result, model_sum, per_model, prepare, select
from jmerge.merges._select import (
    kth_largest_abs_diff,
    kth_largest_abs_diff_over,
    kth_largest_over,
)
from jmerge.merges.basic import Models, _keep, _task_vectors
from jmerge.sharding import explicit_sharding
from jmerge.tree import LeafFilter, compute_dtype, is_traced, require

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

    κ_t is found exactly and without sorting by radix select on the magnitudes' bit patterns
    (:func:`jmerge.merges._select.kth_largest_over`: two histogram passes over the task vectors
    for float32): O(n) work; the global scope sums per-leaf histograms (no concatenation of the
    leaves), and sharded task vectors are counted locally and all-reduced (no gather).

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


def _keep_at_least(x: jax.Array, thr: jax.Array) -> jax.Array:
    """The trim: x where |x| ≥ thr (broadcast, cast to x's dtype), else 0."""
    return jnp.where(jnp.abs(x) >= thr.astype(x.dtype), x, jnp.zeros_like(x))


@partial(jax.jit, static_argnames=("density", "scope"))
def _trim_topk(tvs: PyTree, *, density: float, scope: str) -> PyTree:
    if not jax.tree_util.tree_leaves(tvs):
        return tvs

    def keep_above(x, thr):
        return _keep_at_least(x, thr.reshape((-1,) + (1,) * (x.ndim - 1)))

    def threshold(leaves):
        n = sum(math.prod(x.shape[1:]) for x in leaves)
        mags = [jnp.abs(x) for x in leaves if x.size]
        return kth_largest_over(mags, _num_kept(density, n), batch_ndim=1) if mags else None

    if scope == "tensor":

        def leaf(x):
            thr = threshold([x])
            return x if thr is None else keep_above(x, thr)

        return jax.tree_util.tree_map(leaf, tvs)

    thr = threshold(jax.tree_util.tree_leaves(tvs))
    if thr is None:
        return tvs
    return jax.tree_util.tree_map(lambda x: keep_above(x, thr), tvs)


def _mix32(x: jax.Array) -> jax.Array:
    """lowbias32 (C. Wellons, "Prospecting for hash functions", 2018): a bijection of uint32
    whose output bits each flip with probability ≈ 1/2 when any input bit flips."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def _entry_index(shape: tuple[int, ...], out_sharding=None) -> jax.Array:
    """The row-major index of every entry of an array of ``shape``, as uint32 (elementwise, so
    it is computed where each shard lives; ``out_sharding`` places it under an Explicit
    mesh)."""
    idx = jnp.zeros(shape, jnp.uint32, out_sharding=out_sharding)
    stride = 1
    for d in reversed(range(len(shape))):
        iota = jax.lax.broadcasted_iota(jnp.uint32, shape, d, out_sharding=out_sharding)
        idx = idx + iota * np.uint32(stride)
        stride *= shape[d]
    return idx


def _uniforms(key: jax.Array, tvs: PyTree) -> PyTree:
    """U[0, 1) (float32, multiples of 2⁻²⁴) per entry of every leaf.

    A counter-based generator: model t of the leaf at ``path`` gets two seed words
    (s0, s1) = ``bits(fold_in(fold_in(key, crc32(keystr(path))), t), (2,))`` (threefry, one
    batched call for all leaves and models), and its entry i (row-major index in the leaf) the
    top 24 bits of h(i) = mix(mix(i + s0) ⊕ s1), mix = :func:`_mix32`. Independent across
    leaves, models and entries for all practical purposes (distinct seeds give unrelated
    streams; within a stream h is a bijection of i, so no two entries share a word), and a
    leaf's numbers depend on its path only. Elementwise integer arithmetic: XLA fuses it with
    the masking into one pass, at memory speed on CPU/GPU/TPU and on sharded leaves without
    communication (threefry or ``rbg`` bits for every entry ran at 5-6 copies' time on CPU).
    Not a cryptographic generator; entries per model and leaf must be < 2³².
    """
    leaves = jax.tree_util.tree_leaves_with_path(tvs)
    rows = []
    for path, x in leaves:
        if math.prod(x.shape[1:]) >= 2**32:
            raise ValueError(
                f"leaf {jax.tree_util.keystr(path)}: DARE masks need fewer than 2^32 entries "
                f"per model; got shape {x.shape}."
            )
        tag = zlib.crc32(jax.tree_util.keystr(path).encode()) & 0x7FFFFFFF
        rows += [(tag, t) for t in range(x.shape[0])]
    fold = lambda r: jax.random.fold_in(jax.random.fold_in(key, r[0]), r[1])
    seed_bits = lambda r: jax.random.bits(fold(r), (2,), jnp.uint32)
    seeds = jax.vmap(seed_bits)(jnp.asarray(np.array(rows, np.uint32).reshape(-1, 2)))

    out, start = [], 0
    for _, x in leaves:
        num = x.shape[0]
        s = seeds[start : start + num].reshape((num,) + (1,) * (x.ndim - 1) + (2,))
        start += num
        index = _entry_index(x.shape, explicit_sharding(x))
        h = _mix32(_mix32(index + s[..., 0]) ^ s[..., 1])
        out.append((h >> np.uint32(8)).astype(jnp.float32) * jnp.float32(2.0**-24))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tvs), out)


def drop_and_rescale(tvs: chex.ArrayTree, density: Any, key: jax.Array) -> chex.ArrayTree:
    """DARE: drop each entry with probability 1 − ``density``, rescale the rest by 1/``density``.

    Yu et al. 2024 ("Language Models are Super Mario", eq. 2–3): τ̃_t = m_t ⊙ τ_t / p with
    m_t ~ Bernoulli(p) entrywise, p = ``density``, hence E[τ̃_t] = τ_t.

    Independent randomness per leaf, model and entry: m = [u < p] with u uniform on the
    multiples of 2⁻²⁴ in [0, 1) (so P(keep) = ⌈p·2²⁴⌉/2²⁴, within 6e-8 of p). Model t of the
    leaf at ``path`` is seeded from ``fold_in(fold_in(key, crc32(keystr(path))), t)`` and its
    entries hashed from their index (a counter-based generator, see :func:`_uniforms`), so a
    leaf's mask does not depend on the other leaves, and the mask costs no more than a read
    of the task vectors.

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

    return jax.tree_util.tree_map(partial(_drop, density=density), _uniforms(key, tvs), tvs)


def _drop(u: jax.Array, x: jax.Array, density: Any) -> jax.Array:
    """DARE on entries with uniforms u: x / p where u < p, else 0 (p = ``density``)."""
    keep = u < jnp.asarray(density, u.dtype)
    return jnp.where(keep, x / jnp.asarray(density, x.dtype), jnp.zeros_like(x))


def elect_sign(tvs: chex.ArrayTree) -> chex.ArrayTree:
    """TIES step 2 (Yadav et al. 2023, §3.1, eq. for γ_m): γ = sgn(Σ_t τ_t), shape ``s`` per leaf.

    The sign of the total mass per entry; 0 where the sum is exactly 0 (no model then agrees
    in :func:`disjoint_mean`, so such entries merge to 0).
    """
    return _elect_sign(tvs)


def _slices(x: jax.Array) -> list[jax.Array]:
    return [x[t] for t in range(x.shape[0])]


def _elect(tvs: list[jax.Array]) -> jax.Array:
    """γ = sgn(Σ_t τ_t) of one leaf's per-model slices, summed as a chain of adds
    (:func:`jmerge.merges._common.model_sum`'s order)."""
    return jnp.sign(functools.reduce(jnp.add, tvs))


def _agreeing_mean(tvs: list[jax.Array], sign: jax.Array) -> jax.Array:
    """Σ_{t ∈ A} τ_t / |A| of one leaf's per-model slices, A = {t : τ_t ≠ 0, sgn(τ_t) = γ}."""
    agree = [(jnp.sign(x) == sign.astype(x.dtype)) & (x != 0) for x in tvs]
    total = functools.reduce(
        jnp.add, [jnp.where(a, x, jnp.zeros_like(x)) for a, x in zip(agree, tvs, strict=True)]
    )
    count = functools.reduce(jnp.add, [a.astype(jnp.int32) for a in agree])
    return total / jnp.maximum(count, 1).astype(total.dtype)


@jax.jit
def _elect_sign(tvs: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x: _elect(_slices(x)), tvs)


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
    return jax.tree_util.tree_map(lambda x, g: _agreeing_mean(_slices(x), g), tvs, sign)


def _add_to(pretrained: PyTree, update: PyTree) -> PyTree:
    """θ0 + update, computed in the update's dtype and cast back to each θ0 leaf's dtype."""
    return jax.tree_util.tree_map(
        lambda p, u: (p.astype(u.dtype) + u).astype(p.dtype), pretrained, update
    )


def _ties_thresholds(pretrained: PyTree, stacked: PyTree, density: float, scope: str) -> PyTree:
    """κ_t per leaf, (T,) each (:func:`trim_topk`), from θ0 and the models: per tensor by
    :func:`kth_largest_abs_diff`, over the whole model by :func:`kth_largest_abs_diff_over`
    of all leaves (on CPU one pass over the models, no task vector materialised)."""
    if scope == "tensor":

        def leaf(p, s):
            return kth_largest_abs_diff(s, p, _num_kept(density, p.size)) if p.size else None

        return jax.tree_util.tree_map(leaf, pretrained, stacked)
    pairs = [(s, p) for p, s in zip(jax.tree_util.tree_leaves(pretrained),
                                    jax.tree_util.tree_leaves(stacked), strict=True) if p.size]
    n = sum(p.size for _, p in pairs)
    thr = kth_largest_abs_diff_over(pairs, _num_kept(density, n)) if pairs else None
    return jax.tree_util.tree_map(lambda p: thr if p.size else None, pretrained)


def _elect_merge_leaf(p: jax.Array, s: jax.Array, sparsify, alpha: jax.Array) -> jax.Array:
    """θ0 + α · disjoint_mean(τ̂, elect_sign(τ̂)) for one leaf, τ̂_t = ``sparsify(t, τ_t)``,
    written over the models' slices so that XLA fuses it into one pass that writes only the
    merged leaf (the same operations in the same order as :func:`elect_sign`,
    :func:`disjoint_mean` and the trim; a stacked τ̂ would be materialised, since both steps
    read it)."""
    wd = compute_dtype(jnp.result_type(p, s))
    base = p.astype(wd)
    trimmed = [sparsify(t, x.astype(wd) - base) for t, x in enumerate(_slices(s))]
    merged = _agreeing_mean(trimmed, _elect(trimmed))
    return (base + alpha.astype(wd) * merged).astype(p.dtype)


def _ties_leaf(p: jax.Array, s: jax.Array, thr: jax.Array | None, alpha: jax.Array) -> jax.Array:
    """TIES on one leaf given its thresholds κ (T,): τ̂_t = τ_t ⊙ [|τ_t| ≥ κ_t]."""
    if thr is None:
        return p

    return _elect_merge_leaf(p, s, lambda t, x: _keep_at_least(x, thr[t]), alpha)


@partial(jax.jit, static_argnames=("density", "scope"))
def _ties_kernel(pretrained, stacked, alpha, *, density, scope):
    thresholds = _ties_thresholds(pretrained, stacked, density, scope)
    return jax.tree_util.tree_map(
        lambda p, s, thr: _ties_leaf(p, s, thr, alpha), pretrained, stacked, thresholds,
        is_leaf=lambda x: x is None,
    )


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
    return _add_to(pretrained, jax.tree_util.tree_map(lambda d: model_sum(d, alpha), dropped))


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
    if not jax.tree_util.tree_leaves(stacked):
        return pretrained
    # The uniforms depend on the leaves' shapes and paths only (stacked has the task vectors').
    uniforms = _uniforms(key, stacked)

    def leaf(p, s, u):
        return _elect_merge_leaf(p, s, lambda t, x: _drop(u[t], x, density), alpha)

    return jax.tree_util.tree_map(leaf, pretrained, stacked, uniforms)


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
