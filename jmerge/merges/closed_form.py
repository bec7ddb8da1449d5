"""Closed-form curvature-weighted merges: Fisher merging and RegMean.

Both solve system (1) of DESIGN.md with C0 = 0 where the curvature C_t makes the solve cheap:

* :func:`fisher_merge` — C_t = diag(F_t), a diagonal Fisher: an elementwise weighted average
  (Matena & Raffel 2022).
* :func:`regmean` — C_t = G_t ⊗ I per Dense kernel, G_t = X_tᵀX_t the Gram of the layer inputs:
  one small (d_in × d_in) dense solve per kernel (Jin et al. 2023).

Inputs are validated once (a missing, extra or differently shaped leaf names the leaf path and
``finetuned[i]`` / ``fishers[i]`` / ``grams[i]``); computation is in at least float32; merged
leaves are cast back to the reference dtype. ``include``/``exclude`` keep leaves out of the
merge (see :mod:`jmerge.merges.basic`): they are returned from ``pretrained``, or from
``finetuned[0]`` when ``pretrained`` is None. Both merges are ``jax.jit``-compatible
(``include``/``exclude`` static); the non-negativity and finiteness checks of the curvatures
run only on concrete (non-traced) inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jmerge.merges._common import compute_dtype, prepare, select, weighted_sum
from jmerge.merges.basic import Models, _keep, _reference, _weights
from jmerge.tree import LeafFilter, TreeMismatchError, as_stacked

__all__ = ["fisher_merge", "regmean"]

PyTree = Any


def _check_nonnegative(stacked: PyTree, name: str) -> None:
    """Raise naming ``name[i]<path>`` if a concrete stacked leaf has a negative entry."""
    leaves = jax.tree_util.tree_leaves(stacked)
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        return
    mins = jax.device_get(
        jax.tree_util.tree_map(
            lambda f: jnp.min(f.reshape(f.shape[0], -1), axis=1, initial=0), stacked
        )
    )

    def check(path, m):
        bad = np.flatnonzero(np.asarray(m) < 0)
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{name}[{i}]{jax.tree_util.keystr(path)} has negative entries (min {m[i]:.3g}); "
                "a Fisher is non-negative."
            )

    jax.tree_util.tree_map_with_path(check, mins)


def _check_nonnegative_weights(w: jax.Array) -> None:
    if not isinstance(w, jax.core.Tracer) and bool(np.any(np.asarray(w) < 0)):
        raise ValueError(f"weights must be non-negative for a curvature-weighted merge; got {w}.")


@jax.jit
def _fisher_kernel(stacked: PyTree, fishers: PyTree, w: jax.Array, eps: jax.Array) -> PyTree:
    wn = w / jnp.sum(w)

    def leaf(x, f):
        ct = jnp.promote_types(compute_dtype(x.dtype), compute_dtype(f.dtype))
        xc, fc, wc = x.astype(ct), f.astype(ct), wn.astype(ct)
        den = jnp.tensordot(wc, fc, axes=1)
        num = jnp.tensordot(wc, fc * xc, axes=1)
        ok = den > jnp.asarray(eps, ct)
        merged = jnp.where(ok, num / jnp.where(ok, den, 1), weighted_sum(xc, wc))
        return merged.astype(x.dtype)

    return jax.tree_util.tree_map(leaf, stacked, fishers)


def fisher_merge(
    finetuned: Models,
    fishers: Sequence[chex.ArrayTree] | chex.ArrayTree,
    *,
    weights: Any = None,
    eps: float = 1e-8,
    pretrained: chex.ArrayTree | None = None,
    include: LeafFilter = None,
    exclude: LeafFilter = None,
) -> chex.ArrayTree:
    """Fisher merging (Matena & Raffel 2022, NeurIPS, eq. 3), elementwise.

    θ = Σ_t w_t F_t ⊙ θ_t / Σ_t w_t F_t,  with F_t the diagonal Fisher of model t.

    Where the total weighted Fisher Σ_t w_t F_t (with w normalised to sum to 1) is ≤ ``eps``
    — no model carries information about that entry — the entry falls back to the weighted
    average Σ_t w_t θ_t / Σ_t w_t.

    Args:
      finetuned: θ_1..θ_T: a list of pytrees or one stacked pytree with leaves ``(T, *s)``.
      fishers: F_1..F_T in the same layout (a list, or stacked), shaped like the models; any
        float dtype (need not match the models'); entries must be finite and non-negative.
      weights: ``None`` (uniform), a scalar or a length-T array of non-negative weights (the
        paper's λ_t).
      eps: threshold on Σ_t w_t F_t below which an entry is averaged instead; may be traced.
      pretrained: optional reference model (shapes, dtypes and excluded leaves); else
        ``finetuned[0]``.
      include, exclude: leaf filter; leaves left out are returned from the reference model.

    Returns:
      A pytree shaped and typed like the reference model.
    """
    ref, ref_name = _reference(finetuned, pretrained)
    prep = prepare(ref, finetuned, include=include, exclude=exclude, ref_name=ref_name)
    fstack, t_f = as_stacked(ref, fishers, ref_name=ref_name, name="fishers", check_dtypes=False)
    if t_f != prep.num_models:
        raise ValueError(
            f"fishers has {t_f} models but finetuned has {prep.num_models}; one Fisher per model."
        )
    _check_nonnegative(fstack, "fishers")
    w = _weights(weights, prep.num_models)
    _check_nonnegative_weights(w)
    merged = _fisher_kernel(_keep(prep.mask, prep.stacked), _keep(prep.mask, fstack), w, eps)
    return select(prep.mask, merged, ref)


def _input_sizes(shape: tuple[int, ...]) -> list[int]:
    """Products of the leading dims of ``shape``: the admissible d_in of a Gram."""
    return [math.prod(shape[:i]) for i in range(len(shape) + 1)]


def _stack_grams(
    grams: Sequence[Any], ref: PyTree, ref_name: str, num_models: int
) -> dict[str, jax.Array]:
    """Validate one Gram set per model and stack them: ``{path: (T, d_in, d_in)}``."""
    if isinstance(grams, Mapping) or not isinstance(grams, (list, tuple)):
        raise TypeError(
            "grams must be a list with one BlockGram or {path: G} dict per fine-tuned model; "
            f"got {type(grams).__name__}."
        )
    if len(grams) != num_models:
        raise ValueError(
            f"grams has {len(grams)} entries but finetuned has {num_models} models; "
            "one Gram set per model."
        )
    sets = [dict(getattr(g, "grams", g)) for g in grams]
    leaves = {
        jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(ref)
    }
    keys = list(sets[0])
    for i, gs in enumerate(sets):
        missing = [k for k in keys if k not in gs]
        extra = [k for k in gs if k not in set(keys)]
        if missing or extra:
            raise TreeMismatchError(
                f"grams[{i}] has Grams for other leaves than grams[0]: missing {missing}, "
                f"extra {extra}; every model needs a Gram for the same kernels."
            )
        for k, g in gs.items():
            if k not in leaves:
                shown = ", ".join(list(leaves)[:8]) + (" ..." if len(leaves) > 8 else "")
                raise TreeMismatchError(
                    f"grams[{i}] has a Gram for {k}, which names no leaf of {ref_name} "
                    f"(its leaves: {shown})."
                )
            gshape = tuple(np.shape(g))
            if len(gshape) != 2 or gshape[0] != gshape[1]:
                raise ValueError(f"grams[{i}]{k} must be square (d_in, d_in), got {gshape}.")
            if gshape[0] not in _input_sizes(leaves[k]):
                raise ValueError(
                    f"grams[{i}]{k} has d_in = {gshape[0]}, which does not fit the leaf of shape "
                    f"{leaves[k]}: d_in must be the product of the leaf's leading (input) dims, "
                    f"one of {_input_sizes(leaves[k])}."
                )
            if not isinstance(g, jax.core.Tracer) and not bool(np.all(np.isfinite(g))):
                raise ValueError(f"grams[{i}]{k} is not finite (NaN or Inf entries).")
    return {k: jnp.stack([jnp.asarray(gs[k]) for gs in sets]) for k in keys}


def _regmean_leaf(
    x: jax.Array, g: jax.Array, w: jax.Array, alpha: jax.Array, ridge: jax.Array
) -> jax.Array:
    """RegMean solve for one kernel: x (T, *s), g (T, d, d) -> (*s) in x's dtype."""
    num_models, d = x.shape[0], g.shape[-1]
    ct = jnp.promote_types(compute_dtype(x.dtype), compute_dtype(g.dtype))
    wk = x.astype(ct).reshape(num_models, d, -1)
    wc, ac = (w / jnp.sum(w)).astype(ct), jnp.asarray(alpha, ct)
    gc = g.astype(ct)
    eye = jnp.eye(d, dtype=ct)
    g_shrunk = ac * gc + (1 - ac) * jnp.diagonal(gc, axis1=1, axis2=2)[:, :, None] * eye
    a = jnp.tensordot(wc, g_shrunk, axes=1)
    b = jnp.einsum("t,tij,tjk->ik", wc, g_shrunk, wk)
    w_bar = jnp.tensordot(wc, wk, axes=1)
    scale = jnp.abs(jnp.trace(a)) / d
    lam = jnp.asarray(ridge, ct) * jnp.where(scale > 0, scale, 1)
    merged = jnp.linalg.solve(a + lam * eye, b + lam * w_bar)
    return merged.reshape(x.shape[1:]).astype(x.dtype)


@jax.jit
def _regmean_kernel(stacked, grams, w, alpha, ridge):
    wn = w / jnp.sum(w)

    def leaf(path, x):
        g = grams.get(jax.tree_util.keystr(path))
        if g is None:
            return weighted_sum(x, wn).astype(x.dtype)
        return _regmean_leaf(x, g, w, alpha, ridge)

    return jax.tree_util.tree_map_with_path(leaf, stacked)


def regmean(
    finetuned: Models,
    grams: Sequence[Any],
    *,
    alpha: Any = 1.0,
    weights: Any = None,
    ridge: Any = 1e-6,
    pretrained: chex.ArrayTree | None = None,
    include: LeafFilter = None,
    exclude: LeafFilter = None,
) -> chex.ArrayTree:
    """RegMean (Jin et al. 2023, ICLR, "Dataless knowledge fusion by merging weights", eq. 2, §3.3).

    For every kernel W with a Gram (shape ``(*in_dims, *out_dims)``, read as a
    (d_in, d_out) matrix with d_in = G.shape[0] = prod(in_dims)):

        W = (Σ_t w_t G̃_t + λ I)⁻¹ (Σ_t w_t G̃_t W_t + λ W̄),
        G̃_t = α G_t + (1 − α) diag(G_t),  W̄ = Σ_t w_t W_t / Σ_t w_t,

    with α the paper's off-diagonal shrinkage (α = 1: plain RegMean; α = 0: a per-input-row
    weighted average). Every leaf without a Gram (biases, norms, embeddings) is the weighted
    average W̄, as in the paper.

    Singular Σ_t w_t G̃_t (inputs that are zero on every example, fewer examples than d_in):
    a relative ridge λ = ``ridge`` · tr(Σ_t w_t G̃_t)/d_in pulls the solution towards the
    average W̄, so a dead input's row of W is exactly its row of W̄ and the solve is always
    well-posed; with the default 1e-6 the effect on a well-conditioned system is at round-off
    level. ``ridge=0`` gives the exact formula (and inf/NaN on singular systems). The solve is
    ``jnp.linalg.solve`` in float32, or float64 when the inputs are float64.

    Args:
      finetuned: θ_1..θ_T: a list of pytrees or one stacked pytree with leaves ``(T, *s)``.
      grams: a list of T Gram sets, each a :class:`jmerge.curvature.operators.BlockGram` or a
        dict ``{keystr path of a kernel: G (d_in, d_in)}`` (the same paths for every model; any
        float dtype, finite). A path that names no leaf, or a d_in that is not a product of the
        leaf's leading dims, is an error naming ``grams[i]`` and the path. A Gram of an excluded
        leaf is ignored. ``BlockGram.rest`` is ignored (Gram-less leaves are averaged).
      alpha: off-diagonal scale α in [0, 1] (may be traced).
      weights: ``None`` (uniform), a scalar or a length-T array of non-negative model weights.
      ridge: relative ridge (may be traced), see above.
      pretrained: optional reference model (shapes, dtypes and excluded leaves); else
        ``finetuned[0]``.
      include, exclude: leaf filter; leaves left out are returned from the reference model.

    Returns:
      A pytree shaped and typed like the reference model.
    """
    ref, ref_name = _reference(finetuned, pretrained)
    prep = prepare(ref, finetuned, include=include, exclude=exclude, ref_name=ref_name)
    gstack = _stack_grams(grams, ref, ref_name, prep.num_models)
    w = _weights(weights, prep.num_models)
    _check_nonnegative_weights(w)
    merged = _regmean_kernel(_keep(prep.mask, prep.stacked), gstack, w, alpha, ridge)
    return select(prep.mask, merged, ref)
