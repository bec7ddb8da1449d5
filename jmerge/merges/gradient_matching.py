"""Uncertainty-based gradient matching (Daheim et al., ICLR 2024).

Daheim, Möllenhoff, Ponti, Gurevych & Khan (2024), "Model Merging by Uncertainty-Based
Gradient Matching", ICLR 2024 (arXiv:2310.12808). Merging is read as matching the gradients
of the model one would get by training on all tasks at once: with second-order (Laplace)
approximations of each task's loss around its fine-tuned model, the merged model is (their
§3, the merging equation generalising task arithmetic)

    θ = θ0 + H̄⁻¹ Σ_t α_t (H0 + H_t)(θ_t − θ0),      H̄ = H0 + Σ_t α_t H_t,

with H0 the curvature of the pretraining objective / prior at θ0 and H_t the curvature of
task t's loss at θ_t. It is DESIGN.md eq. (1) in task-vector coordinates Δ_t = θ_t − θ0, and
is solved on the path shared with MaTS (:mod:`jmerge.merges._solve`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jmerge.curvature.operators import CurvatureOperator, Identity, Scaled, Sum, as_operator
from jmerge.merges._common import MergeResult, prepare, weighted_sum
from jmerge.merges._scale import Absolute, is_static_zero, resolve
from jmerge.merges._solve import (
    Curvatures,
    check_nonnegative,
    check_preconditioner,
    curvature_scale,
    finish,
    make_info,
    masked,
    per_model,
    quadratic,
    read_curvatures,
    solve,
    stacked_index,
    unflatten_mask,
    upcast_op,
    weighted_sum_op,
)
from jmerge.tree import LeafFilter, axpy, cast_like, place, placed_shardings, upcast

__all__ = ["gradient_matching"]

PyTree = Any


def _read_prior(reference: PyTree, prior: Any) -> tuple[str, Any]:
    """``(kind, value)`` of the prior H0, read by the one curvature rule (``as_operator``).

    ``("none", None)`` for a concrete 0; ``("relative", δ)`` for a scalar δ (H0 = δ·s·I);
    ``("absolute", δ)`` for ``absolute(δ)`` (H0 = δ I); ``("operator", op)`` for a curvature
    operator or a diagonal pytree (a curvature: it scales with the task curvatures).
    """
    if is_static_zero(prior):
        return "none", None
    if isinstance(prior, Absolute):
        check_nonnegative(prior.value, "prior")
        return "absolute", prior.value
    explicit = isinstance(prior, CurvatureOperator)
    op = as_operator(prior, like=reference, name="prior")
    if isinstance(op, Identity) and not explicit:
        return "relative", op.scale
    return "operator", op


def gradient_matching(
    pretrained: PyTree,
    finetuned: Sequence[PyTree] | PyTree,
    curvatures: Curvatures,
    *,
    alpha: float | Sequence[float] | jax.Array = 1.0,
    prior: float | jax.Array | Absolute | PyTree | CurvatureOperator = 0.0,
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
      regulariser: a scalar δ for an isotropic Gaussian prior (weight decay), *relative* by
      default: H0 = δ · s · I with s = mean diag(Σ_t |α_t| H_t) over the merged entries
      (so the merge does not change when every curvature is multiplied by one c > 0);
      ``jmerge.absolute(δ)`` for H0 = δ I in the curvature's units; a pytree (a diagonal,
      e.g. N_0 · the pretrained model's mean Fisher) or a curvature operator, used as given
      (it is a curvature, and scales with the others). ``prior=0`` (default): H0 = 0.
    * ``alpha`` is α_t, the weight of task t's loss in the target multitask objective
      ℓ_0 + Σ_t α_t ℓ_t (task arithmetic's scale), a scalar or one per model. α_t < 0
      (task negation) may make H̄ indefinite; CG then reports ``status`` INDEFINITE.

    Excluded leaves (``include``/``exclude``) are per task, as in :func:`jmerge.mats`: with
    P the projection on the merged leaves, task t's curvature enters as P (H0 + H_t) P (its
    excluded block held at θ_t's values), so the merged block is

        θ_S = θ0_S + H̄_SS⁻¹ Σ_t α_t (H0 + H_t)_SS (θ_t − θ0)_S,

    and a one-model merge (α = 1) returns that model's shared parameters. The returned
    excluded leaves are ``pretrained``'s.

    Special cases: H_t = 0 (all t) with H0 = δ I, δ > 0, is task arithmetic θ0 + Σ_t α_t Δ_t;
    H0 = 0 and H_t = I is θ0 + Σ_t α_t Δ_t / Σ_t α_t (task arithmetic only when Σ_t α_t = 1);
    H0 = 0 and α_t = 1 is the minimiser of Σ_t ½ (θ−θ_t)ᵀ H_t (θ−θ_t), which for exact
    Hessians of quadratic task losses is the joint multitask optimum.

    Computation. Write Δ_t = θ_t − θ0, τ = P Σ_t α_t Δ_t (task arithmetic), H'_t = N_t F_t.
    Since H̄ τ = H0 τ + Σ_t α_t H'_t τ, the merge is θ = θ0 + τ + y with

        P H̄ P y = P Σ_t α_t H'_t P (Δ_t − τ)                                    (*)

    (the prior only pulls towards task arithmetic). (*) is solved elementwise when every
    curvature and the prior are diagonal (``info.solver == SOLVER_CLOSED_FORM``; where h̄ = 0 no
    prior and no task curvature acts on the entry and it keeps task arithmetic), otherwise by
    ``jmerge.cg`` from y = 0 (Jacobi-preconditioned where every diagonal is known);
    directions in the null space of H̄ keep task arithmetic.

    ``info.objective`` is the gradient-matching surrogate whose stationary point is θ,

        J(θ) = ½ Σ_t α_t (θ − θ_t)ᵀ P (H0 + H'_t) P (θ − θ_t)
               − ½ (Σ_t α_t − 1) (θ − θ0)ᵀ P H0 P (θ − θ0)

    (∇J = 0 is exactly H̄ (θ − θ0) = Σ_t α_t (H0 + H'_t) Δ_t), at θ and, in
    ``objective_init``, at task arithmetic.

    Args:
      pretrained: θ0 (bf16/fp16 computed in float32 and cast back).
      finetuned: θ_1..θ_T, a list of pytrees or a stacked pytree (leading model axis).
      curvatures: F_1..F_T as in :func:`jmerge.mats`: a list of curvature arguments (read by
        ``jmerge.curvature.as_operator``) or a stacked pytree of diagonals.
      alpha: α_t, scalar or one per model; may be traced.
      prior: H0, see above; may be traced. Measured on the digits suite (benchmarks/RESULTS.md,
        MLP, 3 seeds, matrix-free Fisher): a relative prior around 1 did best (best-α
        accuracy for prior 0.01 / 0.1 / 1 / 3 on seed 0: 0.566 / 0.618 / 0.687 / 0.703); the
        default 0 is kept for the diagonal path, where it was not measured against.
      dataset_sizes: N_t ≥ 0, scalar or one per model; None means 1.
      maxiter, rtol, preconditioner: solve settings; ``maxiter`` static (0 returns task
        arithmetic); ``rtol`` is relative to ‖P Σ_t α_t H'_t P (Δ_t − τ)‖, and
        ``info.converged`` is True exactly when the true residual of (*) at the returned θ
        meets it.
      include, exclude: leaf filters; see above.

    Returns:
      ``MergeResult(params, info)``, params shaped and typed like ``pretrained``, info a
      :class:`jmerge.MergeInfo`.

    Raises:
      TreeMismatchError, NonFiniteError, ValueError: as :func:`jmerge.mats` (shapes, non-finite
      values, negative curvature diagonals, dataset sizes or prior, an unknown
      preconditioner), naming the argument and the leaf path.

    Sharded parameters: as :func:`jmerge.mats` (the merged params come back with
    ``pretrained``'s shardings, eagerly or inside the user's own ``jax.jit`` under Auto or
    Explicit axes, with no ``out_shardings``; the CG loop gathers no parameter blocks).
    """
    prep = prepare(pretrained, finetuned, include=include, exclude=exclude)
    num_models = prep.num_models
    ops = read_curvatures(pretrained, curvatures, num_models)
    prior_kind, prior_value = _read_prior(pretrained, prior)
    a = per_model(alpha, num_models, "alpha")
    n = per_model(1.0 if dataset_sizes is None else dataset_sizes, num_models, "dataset_sizes")
    check_nonnegative(n, "dataset_sizes")
    check_preconditioner(preconditioner)
    result = _gm_kernel(
        pretrained,
        prep.stacked,
        ops,
        prior_value,
        a,
        n,
        rtol,
        prior_kind=prior_kind,
        maxiter=int(maxiter),
        preconditioner=preconditioner,
        mask_leaves=tuple(jax.tree_util.tree_leaves(prep.mask)),
    )
    return result._replace(params=place(result.params, placed_shardings(pretrained)))


@functools.partial(
    jax.jit, static_argnames=("prior_kind", "maxiter", "preconditioner", "mask_leaves")
)
def _gm_kernel(
    pretrained: PyTree,
    stacked: PyTree,
    ops: list[CurvatureOperator],
    prior_value: Any,
    a: jax.Array,
    n: jax.Array,
    rtol: Any,
    *,
    prior_kind: str,
    maxiter: int,
    preconditioner: str | None,
    mask_leaves: tuple[bool, ...],
) -> MergeResult:
    mask = unflatten_mask(pretrained, mask_leaves)
    ops = [upcast_op(op) for op in ops]
    theta0 = upcast(pretrained)
    stacked = upcast(stacked)
    ct = jnp.result_type(*jax.tree_util.tree_leaves(theta0))
    a, n = a.astype(ct), n.astype(ct)
    h = [Scaled(op, n[t]) for t, op in enumerate(ops)]  # H'_t = N_t F_t

    h0: CurvatureOperator | None = None
    if prior_kind == "relative":
        s = curvature_scale(ops, a * n, theta0, mask)
        h0 = Identity(resolve(prior_value, s, ct))
    elif prior_kind == "absolute":
        h0 = Identity(resolve(Absolute(prior_value), None, ct))
    elif prior_kind == "operator":
        h0 = upcast_op(prior_value)

    tau = masked(
        mask, jax.tree_util.tree_map(lambda s, p: weighted_sum(s - p[None], a), stacked, theta0)
    )
    theta_ta = jax.tree_util.tree_map(jnp.add, theta0, tau)
    h_bar = weighted_sum_op(ops, a * n)
    if h0 is not None:
        h_bar = Sum([h0, h_bar])
    # rhs = Σ_t α_t H'_t P (Δ_t − τ) = Σ_t α_t H'_t P (θ_t − θ_TA)
    rhs = jax.tree_util.tree_map(jnp.zeros_like, theta0)
    for t in range(len(ops)):
        d = masked(mask, jax.tree_util.tree_map(jnp.subtract, stacked_index(stacked, t), theta_ta))
        rhs = axpy(a[t], cast_like(h[t].mv(d), d), rhs)

    theta, stats = solve(
        h_bar,
        rhs,
        mask,
        theta_ta,
        pretrained,
        maxiter=maxiter,
        rtol=rtol,
        preconditioner=preconditioner,
    )

    def term(t):
        k = h[t] if h0 is None else Sum([h0, h[t]])
        return (Scaled(k, a[t]), stacked_index(stacked, t))

    terms = [term(t) for t in range(len(ops))]
    if h0 is not None:
        terms.append((Scaled(h0, 1 - jnp.sum(a)), theta0))
    objective_init = quadratic(terms, theta_ta, mask)
    objective = objective_init if maxiter == 0 else quadratic(terms, theta, mask)
    return MergeResult(finish(mask, theta, pretrained), make_info(stats, objective, objective_init))
