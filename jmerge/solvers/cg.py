"""Preconditioned conjugate gradients over pytrees, jitted, sharding-preserving, differentiable.

Solves A x = b for a symmetric positive definite linear map A given only as a mat-vec
``v ↦ A v`` on pytrees. The iteration is the textbook PCG (Hestenes & Stiefel 1952; Saad,
*Iterative Methods for Sparse Linear Systems*, 2nd ed., Algorithm 9.1) with M ≈ A⁻¹::

    r_0 = b − A x_0,  z_0 = M r_0,  p_0 = z_0
    α_k = (r_kᵀ z_k) / (p_kᵀ A p_k)
    x_{k+1} = x_k + α_k p_k,        r_{k+1} = r_k − α_k A p_k
    z_{k+1} = M r_{k+1},            β_k = (r_{k+1}ᵀ z_{k+1}) / (r_kᵀ z_k)
    p_{k+1} = z_{k+1} + β_k p_k

and stops when ‖r_k‖ ≤ max(rtol·‖b‖, atol).

Design points:

* One ``lax.while_loop``; every vector operation is a per-leaf ``tree_map``, and the inner
  product :func:`_tree_vdot` is Σ_leaves sum(x ⊙ y) per leaf, so leaf shardings are kept and
  the only communication is one scalar all-reduce per inner product (``jnp.vdot``, used by
  ``jax.scipy.sparse.linalg.cg`` and optax's ``tree_vdot``, ravels the leaves instead, which
  reshards or fails under explicit sharding).
* State (x, r, p) and inner products are accumulated in float32 for bf16/fp16 leaves (float64
  leaves stay float64); the mat-vec is always called with vectors of ``b``'s dtypes, and x is
  cast back to those dtypes at the end.
* The solve is wrapped in ``jax.lax.custom_linear_solve``, so derivatives of x with respect to
  b and to the arrays the mat-vec closes over (e.g. the scale of a curvature operator) come by
  implicit differentiation: one more CG solve with Aᵀ = A, not backpropagation through the
  iterations.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu

from jmerge.tree import check_same_shapes

__all__ = ["cg", "CGResult", "CONVERGED", "MAXITER", "INDEFINITE", "NONFINITE"]

PyTree = Any

CONVERGED = 0
"""Status: ‖b − A x‖ ≤ max(rtol·‖b‖, atol) by the CG recurrence."""
MAXITER = 1
"""Status: ``maxiter`` steps taken without reaching the tolerance."""
INDEFINITE = 2
"""Status: breakdown, pᵀ A p ≤ 0 (A not positive definite along p) or rᵀ M r ≤ 0 (M not PD)."""
NONFINITE = 3
"""Status: breakdown, a NaN or Inf appeared in pᵀ A p, α or ‖r‖."""
_RUNNING = -1


class CGResult(NamedTuple):
    """What :func:`cg` returns.

    Attributes:
      x: the solution, a pytree shaped and typed like ``b``. On breakdown it is the last
        iterate before the failing step (never NaN unless the inputs were).
      num_steps: int32, the number of CG updates applied to x (0 for an exact warm start).
      residual_norm: the *true* residual ‖b − A x‖₂ of the returned x, recomputed with one
        extra mat-vec after the loop (the CG recurrence residual drifts from it in low
        precision). A float32/float64 scalar.
      converged: bool, ``status == CONVERGED``.
      status: int32, one of ``CONVERGED`` (0), ``MAXITER`` (1), ``INDEFINITE`` (2: pᵀAp ≤ 0
        or an indefinite preconditioner), ``NONFINITE`` (3: NaN/Inf met; x is the last finite
        iterate).
    """

    x: PyTree
    num_steps: jax.Array
    residual_norm: jax.Array
    converged: jax.Array
    status: jax.Array


def _acc_dtype(dtype) -> np.dtype:
    """Accumulation dtype of a leaf: float32 for bf16/fp16/f32, float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _to_acc(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: x.astype(_acc_dtype(x.dtype)), tree)


def _cast_like(tree: PyTree, like: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: x.astype(jnp.result_type(y)), tree, like)


def _tree_vdot(x: PyTree, y: PyTree) -> jax.Array:
    """Σ_leaves Σ_i x_i y_i, accumulated in float32 (float64 for float64 leaves).

    Each leaf is contracted in place with ``jnp.sum(x * y)``: no ravel, no concatenation, so a
    sharded leaf is reduced shard by shard and combined by one scalar all-reduce.
    """

    def leaf(a, b):
        dt = _acc_dtype(jnp.result_type(a, b))
        return jnp.sum(a.astype(dt) * b.astype(dt), dtype=dt)

    return jax.tree.reduce(operator.add, jax.tree.map(leaf, x, y))


def _axpy(alpha: jax.Array, x: PyTree, y: PyTree) -> PyTree:
    """y + α x per leaf, with α cast to each leaf's dtype (no float64 promotion of f32 leaves)."""
    return jax.tree.map(lambda a, b: b + alpha.astype(b.dtype) * a, x, y)


def _as_matvec(matvec: Any) -> Callable[[PyTree], PyTree]:
    if hasattr(matvec, "mv"):
        return matvec.mv
    if callable(matvec):
        return matvec
    raise TypeError(
        f"matvec must be a callable pytree -> pytree or an operator with .mv, got {type(matvec)}."
    )


def _pcg_solve(
    matvec: Callable[[PyTree], PyTree],
    rhs: PyTree,
    *,
    x0: PyTree | None,
    precond: Callable[[PyTree], PyTree] | None,
    rtol: float,
    atol: float,
    maxiter: int,
) -> tuple[PyTree, tuple[jax.Array, jax.Array, jax.Array]]:
    """PCG for matvec(x) = rhs from x0 (zeros if None); returns (x, (steps, ‖rhs − A x‖, status)).

    ``matvec`` maps ``rhs``-typed pytrees to ``rhs``-typed pytrees; the iteration itself runs on
    the accumulation dtypes.
    """

    def A(v):
        return _to_acc(matvec(_cast_like(v, rhs)))

    def M(v):
        return v if precond is None else _cast_like(precond(v), v)

    b = _to_acc(rhs)
    bb = _tree_vdot(b, b)
    rdt = bb.dtype
    thr = jnp.maximum(rtol * jnp.sqrt(bb), jnp.asarray(atol, rdt))
    thr2 = thr * thr
    if x0 is None:
        x = otu.tree_zeros_like(b)
        r = b
    else:
        # For b = 0 the solution of an SPD system is 0: do not iterate from x0 to a 0 tolerance.
        x = otu.tree_where(bb > 0, _cast_like(x0, b), otu.tree_zeros_like(b))
        r = otu.tree_sub(b, A(x))
    z = M(r)
    rr = _tree_vdot(r, r)
    rz = rr if precond is None else _tree_vdot(r, z)
    status = jnp.select([rr <= thr2, maxiter <= 0], [CONVERGED, MAXITER], _RUNNING)
    status = status.astype(jnp.int32)
    init = (jnp.zeros((), jnp.int32), x, r, z, rz, status)

    def cond(state):
        return state[-1] == _RUNNING

    def body(state):
        k, x, r, p, rz, _ = state
        ap = A(p)
        pap = _tree_vdot(p, ap)
        alpha = rz / pap
        x1 = _axpy(alpha, p, x)
        r1 = _axpy(-alpha, ap, r)
        rr1 = _tree_vdot(r1, r1)
        z1 = M(r1)
        rz1 = rr1 if precond is None else _tree_vdot(r1, z1)
        beta = rz1 / rz
        p1 = _axpy(beta, p, z1)
        bad_pap = ~jnp.isfinite(pap)
        indefinite = pap <= 0
        bad_step = ~(jnp.isfinite(alpha) & jnp.isfinite(rr1))
        # First matching condition wins: breakdowns before convergence before maxiter.
        outcomes = [
            (bad_pap, NONFINITE),
            (indefinite, INDEFINITE),
            (bad_step, NONFINITE),
            (rr1 <= thr2, CONVERGED),
            (~jnp.isfinite(rz1), NONFINITE),
            (rz1 <= 0, INDEFINITE),
            (k + 1 >= maxiter, MAXITER),
        ]
        status = jnp.select([c for c, _ in outcomes], [s for _, s in outcomes], _RUNNING)
        status = status.astype(jnp.int32)
        accept = ~(bad_pap | indefinite | bad_step)
        # Only x is kept on a rejected step: the loop stops then, and r, p are not used again
        # (the reported residual is recomputed from x), so they need no select pass.
        x = otu.tree_where(accept, x1, x)
        return (k + accept.astype(jnp.int32), x, r1, p1, rz1, status)

    k, x, _, _, _, status = jax.lax.while_loop(cond, body, init)
    x_out = _cast_like(x, rhs)
    res = otu.tree_sub(b, A(x_out))
    res_norm = jnp.sqrt(_tree_vdot(res, res))
    return x_out, (k, res_norm, status)


def cg(
    matvec: Callable[[PyTree], PyTree] | Any,
    b: PyTree,
    x0: PyTree | None = None,
    *,
    preconditioner: Callable[[PyTree], PyTree] | Any | None = None,
    rtol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
) -> CGResult:
    """Solve A x = b by preconditioned conjugate gradients, A symmetric positive definite.

    Stops when ‖r_k‖₂ ≤ max(rtol·‖b‖₂, atol) (r_k from the CG recurrence), after ``maxiter``
    steps, or on breakdown (pᵀAp ≤ 0, or a NaN/Inf), keeping the last good iterate. Runs as one
    ``lax.while_loop``; usable under ``jax.jit`` and ``jax.vmap``; keeps the sharding of b's
    leaves. Differentiable in b and in the arrays ``matvec`` closes over (or, for an operator,
    its array children) by implicit differentiation (``jax.lax.custom_linear_solve``):
    ∂x = A⁻¹(∂b − ∂A x). The warm start x0 and the preconditioner get no gradient.

    Mat-vec count: one per iteration, plus one for r_0 = b − A x0 when x0 is given, plus one
    after the loop for the true ``residual_norm``.

    Args:
      matvec: v ↦ A v on pytrees shaped like b, or a curvature operator (anything with
        ``.mv``, e.g. ``jmerge.curvature.Diagonal``). It is called with vectors of b's dtypes;
        its output is cast to them.
      b: right-hand side, a pytree of floating arrays.
      x0: initial guess shaped like b (default zeros). Warm start from the exact solution takes
        0 steps.
      preconditioner: M ≈ A⁻¹, a callable (or operator with ``.mv``) applied to the residual in
        the accumulation dtype (float32, or float64 for float64 leaves); symmetric positive
        definite. E.g. ``jmerge.curvature.jacobi_preconditioner(op)``.
      rtol, atol: relative and absolute tolerance on ‖b − A x‖₂.
      maxiter: maximum number of iterations; default 10·n, n the number of scalars in b.

    Returns:
      :class:`CGResult` ``(x, num_steps, residual_norm, converged, status)``; x has b's
      structure, shapes and dtypes (bf16/fp16 leaves are iterated in float32 and cast back).
    """
    mv = _as_matvec(matvec)
    precond = None if preconditioner is None else _as_matvec(preconditioner)
    b = jax.tree.map(jnp.asarray, b)
    for path, leaf in jax.tree_util.tree_leaves_with_path(b):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(
                f"b{jax.tree_util.keystr(path)} has dtype {leaf.dtype}; cg needs real floating "
                "leaves."
            )
    if not jax.tree.leaves(b):
        raise ValueError("b has no leaves.")
    if x0 is not None:
        # x0 only seeds the iteration: the solution does not depend on it (no gradient).
        x0 = jax.tree.map(lambda t: jax.lax.stop_gradient(jnp.asarray(t)), x0)
        check_same_shapes(b, x0, ref_name="b", name="x0", check_dtypes=False)
    if maxiter is None:
        maxiter = 10 * sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(b))

    def matvec_b(v):
        out = mv(v)
        check_same_shapes(v, out, ref_name="v", name="matvec(v)", check_dtypes=False)
        return _cast_like(out, v)

    opts = dict(precond=precond, rtol=rtol, atol=atol, maxiter=int(maxiter))
    solve = lambda f, rhs: _pcg_solve(f, rhs, x0=x0, **opts)
    # The transposed (adjoint) solves of the backward pass start from zero: x0 guesses x, not
    # the cotangent system's solution.
    transpose_solve = lambda f, rhs: _pcg_solve(f, rhs, x0=None, **opts)
    x, (steps, res_norm, status) = jax.lax.custom_linear_solve(
        matvec_b, b, solve, transpose_solve, symmetric=True, has_aux=True
    )
    return CGResult(
        x=x,
        num_steps=steps,
        residual_norm=res_norm,
        converged=status == CONVERGED,
        status=status,
    )
