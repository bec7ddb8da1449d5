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
``finetuned[0]`` when ``pretrained`` is None.

Both merges are invariant to the curvatures' overall scale (every F_t or G_t multiplied by one
c > 0): their cut-off ``eps`` and ridge are relative to the mean curvature unless given as
:func:`jmerge.absolute`, and the curvatures are rescaled by a power of two of that mean
before any product is formed, so that float32 neither underflows nor overflows for c from
1e-20 to 1e20. Both run inside ``jax.jit``, ``jax.vmap`` and ``jax.grad`` (``include`` /
``exclude`` static), with arrays passed as arguments or closed over. Concrete inputs (also
arrays closed over by an outer ``jit``) are checked when the merge is called (finite,
non-negative Fishers and weights, a non-zero total weight); traced ones at run time, as a
``RuntimeWarning`` and a ``jax.experimental.checkify`` error under
``checkify.checkify(f, errors=checkify.user_checks)``, and a NaN or Inf in the result of a
traced merge is reported the same way with its leaf path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jmerge.merges._common import (
    check_result,
    model_sum,
    normalise,
    prepare,
    select,
    weighted_sum,
)
from jmerge.merges._scale import Absolute, resolve
from jmerge.merges.basic import Models, _keep, _reference, _weights
from jmerge.tree import LeafFilter, TreeMismatchError, as_stacked, compute_dtype, is_traced, require

__all__ = ["fisher_merge", "regmean"]

PyTree = Any


@functools.partial(jax.jit, static_argnames="stacked")
def _mins(leaves: list[jax.Array], stacked: bool) -> list[jax.Array]:
    """The minimum of every leaf (0 if larger or empty); per model (T,) for stacked leaves."""
    if stacked:
        return [jnp.min(x.reshape(x.shape[0], -1), axis=1, initial=0) for x in leaves]
    return [jnp.min(x, initial=0) for x in leaves]


def _check_nonnegative(curvatures: Any, ref: PyTree, name: str) -> None:
    """Every entry of ``curvatures`` (a list of T pytrees or one stacked pytree) must be ≥ 0.

    Concrete leaves (also ones closed over by an outer ``jit``) are checked now, with an error
    naming ``name[i]<path>``; traced leaves at run time (:func:`jmerge.tree.require`).
    """
    listed = isinstance(curvatures, (list, tuple)) and jax.tree_util.tree_structure(
        curvatures
    ) != jax.tree_util.tree_structure(ref)
    traced = []
    for j, model in enumerate(curvatures if listed else [curvatures]):
        items = jax.tree_util.tree_leaves_with_path(model)
        traced += [x for _, x in items if is_traced(x)]
        concrete = [(p, x) for p, x in items if not is_traced(x)]
        if not concrete:
            continue
        with jax.ensure_compile_time_eval():
            mins = jax.device_get(_mins([x for _, x in concrete], stacked=not listed))
        for (path, _), m in zip(concrete, mins, strict=True):
            m = np.atleast_1d(np.asarray(m))
            bad = np.flatnonzero(m < 0)
            if bad.size:
                i = j if listed else int(bad[0])
                raise ValueError(
                    f"{name}[{i}]{jax.tree_util.keystr(path)} has negative entries "
                    f"(min {m[bad[0]]:.3g}); a Fisher is non-negative."
                )
    if traced:
        require(
            jnp.stack([jnp.min(x, initial=0) >= 0 for x in traced]),
            f"{name} has negative entries (found at run time, inside jax.jit/vmap/grad); "
            "a Fisher is non-negative.",
        )


def _check_nonnegative_weights(w: jax.Array) -> None:
    """Weights of a curvature-weighted merge must be ≥ 0: eager if concrete, else at run time."""
    if not is_traced(w):
        if bool(np.any(np.asarray(jax.device_get(w)) < 0)):
            raise ValueError(
                f"weights must be non-negative for a curvature-weighted merge; got {w}."
            )
        return
    require(
        jnp.all(w >= 0),
        "weights must be non-negative for a curvature-weighted merge (found at run time, "
        "inside jax.jit/vmap/grad).",
    )


def _check_nonnegative_scalar(value: Any, name: str) -> None:
    """A hyperparameter (relative, or :class:`Absolute`) must be ≥ 0."""
    v = value.value if isinstance(value, Absolute) else value
    if not is_traced(v):
        if bool(np.any(np.asarray(jax.device_get(v)) < 0)):
            raise ValueError(f"{name} must be non-negative; got {v}.")
        return
    require(jnp.all(v >= 0), f"{name} must be non-negative (found at run time, inside jax.jit).")


def _pow2(k: jax.Array, dtype: Any) -> jax.Array:
    """2**k as a ``dtype`` (float32/float64) scalar, exactly: built from the exponent bits."""
    info = jnp.finfo(dtype)
    itype = jnp.int32 if info.bits == 32 else jnp.int64
    bits = (jnp.asarray(k, itype) + (info.maxexp - 1)) << info.nmant
    return jax.lax.bitcast_convert_type(bits.astype(itype), dtype)


def _exponent(scale: jax.Array) -> jax.Array:
    """e with scale = m · 2**e, m in [0.5, 1), clipped to ±126 (0 for 0, Inf and NaN).

    Multiplying a curvature by 2**-e is exact and brings its mean to [0.5, 1): products with
    parameters then stay far from float32's overflow (3e38) and underflow (1e-38).
    """
    return jnp.clip(jnp.frexp(scale)[1], -126, 126)


@jax.jit
def _fisher_kernel(stacked: PyTree, fishers: PyTree, w: jax.Array, eps: Any) -> PyTree:
    wn = normalise(w)
    xs, treedef = jax.tree_util.tree_flatten(stacked)
    fs = treedef.flatten_up_to(fishers)
    if not xs:
        return stacked
    cts = [
        jnp.promote_types(compute_dtype(x.dtype), compute_dtype(f.dtype))
        for x, f in zip(xs, fs, strict=True)
    ]
    # s: the mean of Σ_t w_t F_t over every merged entry (a weighted sum of per-leaf means,
    # which cannot overflow where a sum of entries could).
    st = jnp.result_type(*cts)
    sizes = [math.prod(f.shape[1:]) for f in fs]
    n = max(sum(sizes), 1)
    s = jnp.zeros((), st)
    for f, ct, size in zip(fs, cts, sizes, strict=True):
        if size:
            den = model_sum(f.astype(ct), wn)
            s = s + (jnp.mean(den) * (size / n)).astype(st)
    e = _exponent(s)

    def leaf(x, f, ct):
        xc, wc, scale = x.astype(ct), wn.astype(ct), _pow2(-e, ct)
        fc = f.astype(ct) * scale  # exact: a power of two
        den = model_sum(fc, wc)  # adds, fused with the scaling (merges._common.model_sum)
        num = model_sum(fc * xc, wc)
        if isinstance(eps, Absolute):
            thr = jnp.asarray(eps.value, ct) * scale
        else:
            thr = resolve(eps, s.astype(ct) * scale, ct)
        # A NaN or Inf total (traced NaN/Inf Fishers) must not read as "no information".
        thr = jnp.where(jnp.isfinite(s), thr, jnp.nan)
        fallback = den <= thr
        merged = jnp.where(fallback, weighted_sum(xc, wc), num / jnp.where(fallback, 1, den))
        return merged.astype(x.dtype)

    return treedef.unflatten([leaf(x, f, ct) for x, f, ct in zip(xs, fs, cts, strict=True)])


def fisher_merge(
    finetuned: Models,
    fishers: Sequence[chex.ArrayTree] | chex.ArrayTree,
    *,
    weights: Any = None,
    eps: float | Absolute = 1e-12,
    pretrained: chex.ArrayTree | None = None,
    include: LeafFilter = None,
    exclude: LeafFilter = None,
) -> chex.ArrayTree:
    """Fisher merging (Matena & Raffel 2022, NeurIPS, eq. 3), elementwise.

    θ = Σ_t w_t F_t ⊙ θ_t / Σ_t w_t F_t,  with F_t the diagonal Fisher of model t and w
    normalised to Σ_t w_t = 1.

    Entries no model informs fall back to the weighted average Σ_t w_t θ_t: those where
    Σ_t w_t F_t ≤ ε, with the cut-off ε in the Fishers' units

    * ``eps`` a number (the default): relative, ε = eps · s, s = the mean of Σ_t w_t F_t over
      every merged entry (all leaves the filter keeps, one global mean). The merge is then
      the same for every overall scale of the Fishers (c · F_t for any c > 0);
    * ``eps=jmerge.absolute(x)``: ε = x, as given.

    The default 1e-12 treats an entry as uninformed when its total Fisher is 12 orders of
    magnitude below the model's mean: it keeps exact zeros (0/0) out of the division and,
    after the rescaling below, every entry that is divided keeps a denominator above 1e-13,
    so that its products with the parameters stay far above float32's underflow (1e-38,
    where CPUs and GPUs flush to zero and a product would silently become 0) even for
    parameters down to 1e-24; at the same time it is far below any entry a Fisher estimated
    in float32 resolves (its sums carry a relative rounding of 1e-7), so informed entries
    are never averaged. ``eps=0`` falls back on exact zeros only.

    Scale: before any product is formed the Fishers are multiplied by 2**-e, s = m · 2**e
    with m in [0.5, 1) (exact, so the merge is unchanged), which brings their mean to about
    1: Fishers from 1e-30 to 1e30 merge in float32 without underflow or overflow.

    Args:
      finetuned: θ_1..θ_T: a list of pytrees or one stacked pytree with leaves ``(T, *s)``.
      fishers: F_1..F_T in the same layout (a list, or stacked), shaped like the models; any
        float dtype (need not match the models'); entries must be finite and non-negative.
      weights: ``None`` (uniform), a scalar or a length-T array of non-negative weights (the
        paper's λ_t), not all zero; may be traced.
      eps: the cut-off, relative (a number ≥ 0) or :func:`jmerge.absolute`; may be traced.
      pretrained: optional reference model (shapes, dtypes and excluded leaves); else
        ``finetuned[0]``.
      include, exclude: leaf filter; leaves left out are returned from the reference model.

    Returns:
      A pytree shaped and typed like the reference model.

    Raises:
      TreeMismatchError: a model's or Fisher's structure or shapes differ from the reference.
      NonFiniteError: a concrete model or Fisher has NaN or Inf entries.
      ValueError: concrete Fishers or weights with negative entries, weights summing to
        zero, a negative ``eps``, or a number of Fishers other than T.

    Traced inputs (inside ``jax.jit``/``vmap``/``grad``) are checked at run time instead: a
    ``RuntimeWarning`` (and a ``checkify`` error under ``checkify.checkify(f,
    errors=checkify.user_checks)``) for negative Fishers or weights, weights summing to zero
    (the merged leaves are then NaN) and NaN or Inf in the result, which is what NaN or Inf
    Fishers or models give.
    """
    ref, ref_name = _reference(finetuned, pretrained)
    prep = prepare(ref, finetuned, include=include, exclude=exclude, ref_name=ref_name)
    fstack, t_f = as_stacked(ref, fishers, ref_name=ref_name, name="fishers", check_dtypes=False)
    if t_f != prep.num_models:
        raise ValueError(
            f"fishers has {t_f} models but finetuned has {prep.num_models}; one Fisher per model."
        )
    _check_nonnegative(fishers, ref, "fishers")
    w = _weights(weights, prep.num_models)
    _check_nonnegative_weights(w)
    _check_nonnegative_scalar(eps, "eps")
    merged = _fisher_kernel(_keep(prep.mask, prep.stacked), _keep(prep.mask, fstack), w, eps)
    merged = select(prep.mask, merged, ref)
    return check_result(merged, "fisher_merge", finetuned, fishers, weights, eps, pretrained)


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
            if not is_traced(g) and not bool(np.all(np.isfinite(np.asarray(g)))):
                raise ValueError(f"grams[{i}]{k} is not finite (NaN or Inf entries).")
    return {k: jnp.stack([jnp.asarray(gs[k]) for gs in sets]) for k in keys}


def _regmean_leaf(
    x: jax.Array, g: jax.Array, wn: jax.Array, alpha: jax.Array, ridge: Any
) -> jax.Array:
    """RegMean solve for one kernel: x (T, *s), g (T, d, d), wn (T,) summing to 1 -> (*s)."""
    num_models, d = x.shape[0], g.shape[-1]
    ct = jnp.promote_types(compute_dtype(x.dtype), compute_dtype(g.dtype))
    wk = x.astype(ct).reshape(num_models, d, -1)
    wc, ac = wn.astype(ct), jnp.asarray(alpha, ct)
    gc = g.astype(ct)
    # tr(Σ_t w_t G̃_t)/d (the shrinkage keeps the diagonal), and the Grams rescaled by a
    # power of two (exact) so that this mean diagonal is about 1.
    scale = jnp.abs(jnp.tensordot(wc, jnp.trace(gc, axis1=1, axis2=2), axes=1)) / d
    scale = jnp.where(scale > 0, scale, 1)
    factor = _pow2(-_exponent(scale), ct)
    gc = gc * factor
    eye = jnp.eye(d, dtype=ct)
    g_shrunk = ac * gc + (1 - ac) * jnp.diagonal(gc, axis1=1, axis2=2)[:, :, None] * eye
    a = jnp.tensordot(wc, g_shrunk, axes=1)
    b = jnp.einsum("t,tij,tjk->ik", wc, g_shrunk, wk)
    w_bar = jnp.tensordot(wc, wk, axes=1)
    if isinstance(ridge, Absolute):
        lam = jnp.asarray(ridge.value, ct) * factor
    else:
        lam = resolve(ridge, scale * factor, ct)
    # x = A⁻¹ rhs as a d×d inverse times rhs, plus one step of iterative refinement (backward
    # error of a direct solve): a matmul keeps rhs's column (output-axis) sharding, whereas
    # XLA's SPMD partitioner all-gathers the right-hand sides of a triangular solve.
    lhs, rhs = a + lam * eye, b + lam * w_bar
    inv = jnp.linalg.solve(lhs, eye)
    merged = inv @ rhs
    merged = merged + inv @ (rhs - lhs @ merged)
    return merged.reshape(x.shape[1:]).astype(x.dtype)


@jax.jit
def _regmean_kernel(stacked, grams, w, alpha, ridge):
    wn = normalise(w)

    def leaf(path, x):
        g = grams.get(jax.tree_util.keystr(path))
        if g is None:
            return weighted_sum(x, wn).astype(x.dtype)
        return _regmean_leaf(x, g, wn, alpha, ridge)

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

    with w normalised to Σ_t w_t = 1.

    Singular Σ_t w_t G̃_t (inputs that are zero on every example, fewer examples than d_in):
    the ridge λ pulls the solution towards the average W̄, so a dead input's row of W is
    exactly its row of W̄ and the solve is always well-posed. λ is in the Grams' units:

    * ``ridge`` a number (the default): relative, λ = ridge · tr(Σ_t w_t G̃_t)/d_in per
      kernel (the mean diagonal; 1 if the trace is 0), so the merge is the same for every
      overall scale of the Grams (c · G_t, c > 0). With the default 1e-6 the effect on a
      well-conditioned system is at round-off level;
    * ``ridge=jmerge.absolute(x)``: λ = x, as given.

    ``ridge=0`` gives the exact formula (and Inf/NaN on singular systems). Before the solve
    each kernel's Grams are multiplied by 2**-e with tr/d_in = m · 2**e, m in [0.5, 1)
    (exact; λ with them), so that float32 neither overflows nor underflows whatever their
    scale. The solve is ``jnp.linalg.solve`` in float32, or float64 when the inputs are
    float64.

    Args:
      finetuned: θ_1..θ_T: a list of pytrees or one stacked pytree with leaves ``(T, *s)``.
      grams: a list of T Gram sets, each a :class:`jmerge.curvature.operators.BlockGram` or a
        dict ``{keystr path of a kernel: G (d_in, d_in)}`` (the same paths for every model; any
        float dtype, finite). A path that names no leaf, or a d_in that is not a product of the
        leaf's leading dims, is an error naming ``grams[i]`` and the path. A Gram of an excluded
        leaf is ignored. ``BlockGram.rest`` is ignored (Gram-less leaves are averaged).
      alpha: off-diagonal scale α in [0, 1] (may be traced).
      weights: ``None`` (uniform), a scalar or a length-T array of non-negative model
        weights, not all zero (may be traced).
      ridge: the ridge λ, relative (a number) or :func:`jmerge.absolute` (may be traced),
        see above.
      pretrained: optional reference model (shapes, dtypes and excluded leaves); else
        ``finetuned[0]``.
      include, exclude: leaf filter; leaves left out are returned from the reference model.

    Returns:
      A pytree shaped and typed like the reference model.

    Raises:
      TreeMismatchError, TypeError, ValueError: a Gram set that does not fit the models (see
        ``grams``), a concrete Gram with NaN or Inf entries, concrete weights that are
        negative or sum to zero.

    Traced inputs (inside ``jax.jit``/``vmap``/``grad``) are checked at run time instead: a
    ``RuntimeWarning`` (and a ``checkify`` error under ``checkify.checkify(f,
    errors=checkify.user_checks)``) for negative weights, weights summing to zero (the merged
    leaves are then NaN) and NaN or Inf in the result.
    """
    ref, ref_name = _reference(finetuned, pretrained)
    prep = prepare(ref, finetuned, include=include, exclude=exclude, ref_name=ref_name)
    gstack = _stack_grams(grams, ref, ref_name, prep.num_models)
    w = _weights(weights, prep.num_models)
    _check_nonnegative_weights(w)
    merged = _regmean_kernel(_keep(prep.mask, prep.stacked), gstack, w, alpha, ridge)
    merged = select(prep.mask, merged, ref)
    return check_result(merged, "regmean", finetuned, grams, weights, alpha, ridge, pretrained)
