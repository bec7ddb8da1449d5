"""Uncertainty-based gradient matching (Daheim et al., ICLR 2024).

Daheim, Möllenhoff, Ponti, Gurevych & Khan (2024), "Model Merging by Uncertainty-Based
Gradient Matching", ICLR 2024 (arXiv:2310.12808). Merging is read as matching the gradients
of the model one would get by training on all tasks at once: with second-order (Laplace)
approximations of each task's loss around its fine-tuned model, the merged model is (their
§3, the merging equation generalising task arithmetic)

    θ = θ0 + H̄⁻¹ Σ_t α_t (H0 + H_t)(θ_t − θ0),      H̄ = H0 + Σ_t α_t H_t,

with H0 the curvature of the pretraining objective / prior at θ0 and H_t the curvature of
task t's loss at θ_t. It is DESIGN.md eq. (1) in task-vector coordinates Δ_t = θ_t − θ0.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from jmerge.curvature.operators import (
    CurvatureOperator,
    Diagonal,
    Identity,
    MatrixFree,
    Scaled,
    Sum,
)
from jmerge.merges._common import MergeResult, cast_like, prepare, select, upcast
from jmerge.merges.mats import (
    Curvatures,
    _cast_out,
    _cg_info,
    _check_diagonal,
    _check_per_model_nonnegative,
    _check_preconditioner,
    _check_scalar_nonnegative,
    _is_scalar,
    _masked,
    _per_model,
    _read_curvatures,
    _solve_from,
    _stacked_index,
    _Tag,
    _tree_axpy,
    _unflatten_mask,
    _upcast_op,
)
from jmerge.tree import LeafFilter

__all__ = ["gradient_matching"]

PyTree = Any


def _read_prior(reference: PyTree, prior: Any) -> CurvatureOperator | None:
    """H0 as an operator, or None for H0 = 0.

    A scalar δ (Python number or 0-d array, possibly traced) is δ·I; a curvature object is
    used as is; another pytree is a diagonal shaped like the params.
    """
    if prior is None:
        return None
    if isinstance(prior, CurvatureOperator):
        if isinstance(prior, Diagonal):
            _check_diagonal(reference, prior.tree, "prior")
            return prior
        return prior
    if hasattr(prior, "mv"):
        return MatrixFree(prior.mv)
    if _is_scalar(prior):
        _check_scalar_nonnegative(prior, "prior")
        if isinstance(prior, (int, float)) and prior == 0:
            return None
        return Identity(prior)
    _check_diagonal(reference, prior, "prior")
    return Diagonal(prior)


def _is_diagonal(op: CurvatureOperator | None) -> bool:
    return op is None or isinstance(op, (Diagonal, Identity))


def gradient_matching(
    pretrained: PyTree,
    finetuned: Sequence[PyTree] | PyTree,
    curvatures: Curvatures,
    *,
    alpha: float | Sequence[float] | jax.Array = 1.0,
    prior: float | jax.Array | PyTree | CurvatureOperator = 0.0,
    dataset_sizes: float | Sequence[float] | jax.Array | None = None,
    maxiter: int = 100,
    rtol: float = 1e-6,
    preconditioner: str | None = "jacobi",
    include: LeafFilter = None,
    exclude: LeafFilter = None,
) -> MergeResult:
    """Gradient-matching merge: θ = θ0 + H̄⁻¹ Σ_t α_t (H0 + H_t)(θ_t − θ0), H̄ = H0 + Σ_t α_t H_t.

    Daheim et al. (ICLR 2024), §3 (the merging equation and its Hessian-weighted form), with
    H_t = N_t · ``curvatures[t]``. How the paper's setting maps onto the arguments (our
    reading, from the paper's equations; its notation is θ_LLM for θ0 and H_{0+t} = H0 + H_t):

    * ``curvatures[t]`` is the per-example-*mean* curvature F_t of task t at θ_t (what
      ``jmerge.fisher_diag`` returns: the mean of squared per-example gradients, the paper's
      diagonal "squared-gradient" Fisher), and ``dataset_sizes[t]`` = N_t, the number of
      examples task t was fine-tuned on, so that H_t = N_t · F_t is the Hessian of the *summed*
      task loss, as in the paper. With ``dataset_sizes=None``, H_t = curvatures[t] as given.
    * ``prior`` is H0, the curvature of the objective that produced θ0 / of the fine-tuning
      regulariser: a float δ for an isotropic Gaussian prior (weight decay), H0 = δ I (what we
      assume when the pretraining data's curvature is unavailable), or a pytree (diagonal;
      e.g. N_0 · the pretrained model's mean Fisher, scaled by the caller), or a curvature
      operator. ``prior=0`` (default) gives H0 = 0.
    * ``alpha`` is α_t, the weight of task t's loss in the target multitask objective
      ℓ_0 + Σ_t α_t ℓ_t (task arithmetic's scale), a scalar or one per model. α_t < 0
      (task negation) may make H̄ indefinite; CG then reports ``status`` INDEFINITE.

    Special cases: H_t = 0 (all t) with H0 = δ I, δ > 0, is task arithmetic θ0 + Σ_t α_t Δ_t;
    H0 = 0 and H_t = I is θ0 + Σ_t α_t Δ_t / Σ_t α_t (task arithmetic only when Σ_t α_t = 1);
    H0 = 0 and α_t = 1 is the minimiser of Σ_t ½ (θ−θ_t)ᵀ H_t (θ−θ_t), which for exact
    Hessians of quadratic task losses is the joint multitask optimum.

    Computation. Write Δ_t = θ_t − θ0, τ = Σ_t α_t Δ_t (task arithmetic), H'_t = N_t F_t.
    Since H̄ τ = H0 τ + Σ_t α_t H'_t τ, the merge is θ = θ0 + τ + y with

        H̄ y = Σ_t α_t H'_t (Δ_t − τ)                                            (*)

    (the prior only pulls towards task arithmetic).

    * When every curvature and the prior are diagonal (pytrees, ``Diagonal``, scalars): y is
      elementwise, no solve; ``info = {"solver": "closed_form", "num_fallback": n}``. Where
      h̄ = h0 + Σ_t α_t h'_t = 0 (no prior and no task curvature on that entry) the merge
      falls back to task arithmetic (y = 0 there); n counts those entries.
    * Otherwise (*) is solved by CG on the matrix-free H̄ = H0 + Σ_t (α_t N_t) C_t from y = 0,
      i.e. starting from task arithmetic (Jacobi-preconditioned where every diagonal is known);
      directions in the null space of H̄ keep task arithmetic, consistent with the diagonal
      fallback. ``info = {"solver": "cg", "num_steps", "residual_norm", "converged",
      "status"}``.

    ``info["solver"]`` is a static string (it survives ``jax.jit``).

    Args:
      pretrained: θ0 (bf16/fp16 computed in float32 and cast back).
      finetuned: θ_1..θ_T, a list of pytrees or a stacked pytree (leading model axis).
      curvatures: F_1..F_T as in :func:`jmerge.merges.mats.mats`: a list of curvature objects
        / diagonal pytrees / scalars, or a stacked pytree of diagonals.
      alpha: α_t, scalar or one per model.
      prior: H0: a float δ (δ I), a diagonal pytree, or a curvature operator.
      dataset_sizes: N_t > 0, scalar or one per model; None means 1.
      maxiter, rtol, preconditioner: CG settings (operator path only); ``maxiter`` static;
        ``rtol`` is relative to the initial residual ‖P Σ_t α_t H'_t (Δ_t − τ)‖.
      include, exclude: leaf filters; excluded leaves come back from ``pretrained`` and the
        merged leaves solve the merged block of the system with the excluded ones at θ0.

    Returns:
      ``MergeResult(params, info)``, params shaped and typed like ``pretrained``.
    """
    prep = prepare(pretrained, finetuned, include=include, exclude=exclude)
    num_models = prep.num_models
    ops = _read_curvatures(pretrained, curvatures, num_models)
    h0 = _read_prior(pretrained, prior)
    a = _per_model(alpha, num_models, "alpha")
    n = _per_model(1.0 if dataset_sizes is None else dataset_sizes, num_models, "dataset_sizes")
    _check_per_model_nonnegative(n, "dataset_sizes")
    _check_preconditioner(preconditioner)
    return _gm_kernel(
        pretrained,
        prep.stacked,
        ops,
        h0,
        a,
        n,
        rtol,
        maxiter=int(maxiter),
        preconditioner=preconditioner,
        mask_leaves=tuple(jax.tree_util.tree_leaves(prep.mask)),
    )


@functools.partial(jax.jit, static_argnames=("maxiter", "preconditioner", "mask_leaves"))
def _gm_kernel(
    pretrained: PyTree,
    stacked: PyTree,
    ops: list[CurvatureOperator],
    h0: CurvatureOperator | None,
    a: jax.Array,
    n: jax.Array,
    rtol: Any,
    *,
    maxiter: int,
    preconditioner: str | None,
    mask_leaves: tuple[bool, ...],
) -> MergeResult:
    num_models = len(ops)
    mask = _unflatten_mask(pretrained, mask_leaves)
    ops = [_upcast_op(op) for op in ops]
    h0 = None if h0 is None else _upcast_op(h0)
    scale = a * n  # the weight of C_t in H̄
    theta0 = upcast(pretrained)
    deltas = jax.tree_util.tree_map(lambda s, p: s - p[None], upcast(stacked), theta0)
    tau = jax.tree_util.tree_map(lambda d: jnp.tensordot(a.astype(d.dtype), d, axes=1), deltas)
    # Excluded leaves stay at θ0 (x_E = 0): start from the masked task arithmetic P τ and solve
    # the merged block H̄_II y_I = [Σ_t α_t (H0 + H'_t) Δ_t − H̄ P τ]_I, whose right-hand side is
    # P [Σ_t α_t H'_t (Δ_t − P τ) + H0 (I − P) τ] (the last term vanishes without exclusions).
    tau_m = _masked(mask, tau)
    resid = [otu.tree_sub(_stacked_index(deltas, t), tau_m) for t in range(num_models)]

    if all(_is_diagonal(op) for op in ops) and _is_diagonal(h0):
        diags = [upcast(op.diag(like=theta0)) for op in ops]
        d0 = None if h0 is None else upcast(h0.diag(like=theta0))

        def leaf(p, tau_l, *args):
            ds, gs = args[:num_models], args[num_models : 2 * num_models]
            h_bar = jnp.zeros_like(p) if d0 is None else args[-1].astype(p.dtype)
            num = jnp.zeros_like(p)
            for t in range(num_models):
                s = scale[t].astype(p.dtype)
                h_bar = h_bar + s * ds[t].astype(p.dtype)
                num = num + s * ds[t].astype(p.dtype) * gs[t]
            ok = h_bar != 0
            y = jnp.where(ok, num / jnp.where(ok, h_bar, 1), 0)
            return p + tau_l + y, jnp.sum(~ok, dtype=jnp.int32)

        extra = [] if d0 is None else [d0]
        out = jax.tree_util.tree_map(leaf, theta0, tau_m, *diags, *resid, *extra)
        theta = jax.tree_util.tree_map(lambda _, o: o[0], theta0, out)
        fallbacks = jax.tree_util.tree_map(lambda _, o: o[1], theta0, out)
        counted = select(mask, fallbacks, jax.tree_util.tree_map(jnp.zeros_like, fallbacks))
        info = {
            "solver": _Tag("closed_form"),
            "num_fallback": sum(jax.tree_util.tree_leaves(counted), jnp.zeros((), jnp.int32)),
        }
    else:
        parts = [] if h0 is None else [h0]
        parts += [Scaled(op, scale[t]) for t, op in enumerate(ops)]
        h_bar_op = Sum(parts)
        rhs = otu.tree_zeros_like(theta0)
        for t, op in enumerate(ops):
            rhs = _tree_axpy(scale[t], _cast_out(op.mv(resid[t]), resid[t]), rhs)
        if h0 is not None and not all(jax.tree_util.tree_leaves(mask)):
            tau_e = otu.tree_sub(tau, tau_m)
            rhs = otu.tree_add(rhs, _cast_out(h0.mv(tau_e), tau_e))
        res = _solve_from(
            h_bar_op, rhs, mask, theta0, maxiter=maxiter, rtol=rtol, preconditioner=preconditioner
        )
        theta = otu.tree_add(otu.tree_add(theta0, tau_m), _masked(mask, res.x))
        info = {"solver": _Tag("cg"), **_cg_info(res)}

    params = select(mask, cast_like(theta, pretrained), pretrained)
    return MergeResult(params, info)
