"""Preconditioned conjugate gradients over pytrees, jitted, sharding-preserving, differentiable.

Solves A x = b for a symmetric positive definite linear map A given only as a mat-vec
``v ↦ A v`` on pytrees. The iteration is the textbook PCG (Hestenes & Stiefel 1952; Saad,
*Iterative Methods for Sparse Linear Systems*, 2nd ed., Algorithm 9.1) with M ≈ A⁻¹::

    r_0 = b − A x_0,  z_0 = M r_0,  p_0 = z_0
    α_k = (r_kᵀ z_k) / (p_kᵀ A p_k)
    x_{k+1} = x_k + α_k p_k,        r_{k+1} = r_k − α_k A p_k
    z_{k+1} = M r_{k+1},            β_k = (r_{k+1}ᵀ z_{k+1}) / (r_kᵀ z_k)
    p_{k+1} = z_{k+1} + β_k p_k

and stops when the *true* residual ‖b − A x_k‖ ≤ max(rtol·‖b‖, atol): when the recurrence
residual r_k says so, b − A x_k is computed and, if it is still above the tolerance, replaces
r_k (residual replacement) and the iteration goes on; if that no longer shrinks it, the
tolerance is beyond the dtype's precision and the solve stops with status ``STAGNATED``.

Design points:

* One ``lax.while_loop``; every vector operation is a per-leaf ``tree_map``, and the inner
  product :func:`_tree_vdot` is Σ_leaves sum(x ⊙ y) per leaf, so leaf shardings are kept and
  the only communication is one scalar all-reduce per inner product (``jnp.vdot``, used by
  ``jax.scipy.sparse.linalg.cg`` and optax's ``tree_vdot``, ravels the leaves instead, which
  reshards or fails under explicit sharding).
* Scale invariance: the system is solved for s·b with s a power of two that brings max|b|
  into [0.5, 1) (exact, no rounding), so cg(A, c·b) = c·cg(A, b) for every c for which c·b
  is representable: squared norms never leave the dtype's range (in float32 ‖1e-20·1‖²
  underflows to 0 and ‖1e20·1‖² overflows). The backward (transposed) solve is scaled the
  same way, so cotangents of any size are handled too.
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

from jmerge.tree import axpy, cast_like, check_same_shapes, compute_dtype, upcast

__all__ = [
    "cg",
    "CGResult",
    "CONVERGED",
    "MAXITER",
    "INDEFINITE",
    "NONFINITE",
    "STAGNATED",
    "STATUS_NAMES",
]

PyTree = Any

CONVERGED = 0
"""Status: the true residual of the returned x meets ‖b − A x‖ ≤ max(rtol·‖b‖, atol)."""
MAXITER = 1
"""Status: ``maxiter`` steps taken and the true residual is above the tolerance."""
INDEFINITE = 2
"""Status: breakdown, pᵀ A p ≤ 0 (A not positive definite along p) or rᵀ M r ≤ 0 (M not PD)."""
NONFINITE = 3
"""Status: breakdown, a NaN or Inf appeared in pᵀ A p, α, ‖r‖ or the true residual."""
STAGNATED = 4
"""Status: precision limit. The CG recurrence residual met the tolerance but the true residual
did not, and replacing the recurrence residual by the true one no longer reduced it: the
tolerance is below what the dtype can resolve for this system (roughly rtol < ε·κ(A))."""
STATUS_NAMES = {
    CONVERGED: "converged",
    MAXITER: "maxiter",
    INDEFINITE: "indefinite",
    NONFINITE: "nonfinite",
    STAGNATED: "stagnated",
}
"""Status code -> short name, for messages."""

_RUNNING = -1
_CHECK = -2  # internal: the recurrence residual says "done"; the true residual decides
# A residual replacement must shrink the true residual norm by this factor, else STAGNATED.
_PROGRESS = 0.5


class CGResult(NamedTuple):
    """What :func:`cg` returns.

    Attributes:
      x: the solution, a pytree shaped and typed like ``b``. On breakdown it is the last
        iterate before the failing step (never NaN unless the inputs were).
      num_steps: int32, the number of CG updates applied to x (0 for an exact warm start).
      residual_norm: the *true* residual ‖b − A x‖₂ of the returned x (computed from x with
        one mat-vec, not taken from the CG recurrence, which drifts from it in low
        precision). A float32 (float64 for float64 b) scalar.
      converged: bool, ``status == CONVERGED``: exactly when ``residual_norm`` ≤
        max(rtol·‖b‖, atol).
      status: int32, one of ``CONVERGED`` (0), ``MAXITER`` (1), ``INDEFINITE`` (2: pᵀAp ≤ 0
        or an indefinite preconditioner), ``NONFINITE`` (3: NaN/Inf met; x is the last finite
        iterate), ``STAGNATED`` (4: the tolerance is beyond the dtype's precision for this
        system; x is the best the iteration reached). ``STATUS_NAMES`` maps them to names.
    """

    x: PyTree
    num_steps: jax.Array
    residual_norm: jax.Array
    converged: jax.Array
    status: jax.Array


def _to_acc(tree: PyTree) -> PyTree:
    return upcast(tree)


def _tree_vdot(x: PyTree, y: PyTree) -> jax.Array:
    """Σ_leaves Σ_i x_i y_i, accumulated in float32 (float64 for float64 leaves).

    Each leaf is contracted in place with ``jnp.sum(x * y)``: no ravel, no concatenation, so a
    sharded leaf is reduced shard by shard and combined by one scalar all-reduce.
    """

    def leaf(a, b):
        dt = compute_dtype(jnp.result_type(a, b))
        return jnp.sum(a.astype(dt) * b.astype(dt), dtype=dt)

    return jax.tree.reduce(operator.add, jax.tree.map(leaf, x, y))


def _tree_max_abs(tree: PyTree) -> jax.Array:
    """max_i |x_i| over all leaves (a scalar in the accumulation dtype)."""
    return jax.tree.reduce(jnp.maximum, jax.tree.map(lambda x: jnp.max(jnp.abs(x)), tree))


def _pow2_scale(b: PyTree) -> jax.Array:
    """s = 2^−e with max|b| = m·2^e, m ∈ [0.5, 1): s·b has max|·| in [0.5, 1), exactly.

    Multiplying by a power of two is exact (no rounding) and keeps every squared norm of the
    iteration in range: ‖s b‖² ∈ [0.25, n]. s = 1 for b = 0 or a non-finite b.
    """
    m = _tree_max_abs(b)
    _, e = jnp.frexp(m)
    ok = jnp.isfinite(m) & (m > 0)
    return jnp.where(ok, jnp.ldexp(jnp.ones_like(m), -e), jnp.ones_like(m))


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
    the accumulation dtypes, on the system scaled by a power of two (:func:`_pow2_scale`), so
    that it does not depend on the scale of rhs (1e-30 or 1e30 in float32 alike).

    Two nested loops: the inner one is plain PCG until the recurrence residual meets the
    tolerance (or maxiter, or a breakdown); the outer one computes the true residual b − A x
    and stops (CONVERGED, MAXITER, breakdown, or STAGNATED when the last replacement did not
    shrink the true residual) or replaces the recurrence residual by the true one and restarts
    the inner loop (residual replacement; van der Vorst & Ye 2000, Sleijpen & van der Vorst
    1996). Under ``vmap`` no branch is computed twice: the extra mat-vec is in the outer body.
    """

    def A(v):
        return _to_acc(matvec(cast_like(v, rhs)))

    def M(v):
        return v if precond is None else cast_like(precond(v), v)

    b_raw = _to_acc(rhs)
    scale = _pow2_scale(b_raw)
    rdt = scale.dtype
    b = jax.tree.map(lambda x: x * scale.astype(x.dtype), b_raw)
    bb = _tree_vdot(b, b)
    thr = jnp.maximum(rtol * jnp.sqrt(bb), jnp.asarray(atol, rdt) * scale)
    thr2 = thr * thr
    if x0 is None:
        x = otu.tree_zeros_like(b)
        r = b
    else:
        # For b = 0 the solution of an SPD system is 0: do not iterate from x0 to a 0 tolerance.
        x0s = jax.tree.map(lambda x, t: x * scale.astype(t.dtype), cast_like(x0, b), b)
        x = otu.tree_where(bb > 0, x0s, otu.tree_zeros_like(b))
        r = otu.tree_sub(b, A(x))
    z = M(r)
    rr = _tree_vdot(r, r)  # the true residual: r was computed from x
    rz = rr if precond is None else _tree_vdot(r, z)
    status = jnp.select(
        [rr <= thr2, ~jnp.isfinite(rr), maxiter <= 0], [CONVERGED, NONFINITE, MAXITER], _RUNNING
    ).astype(jnp.int32)

    def inner_cond(state):
        return state[-1] == _RUNNING

    def inner_body(state):
        k, x, r, p, rz, _ = state
        ap = A(p)
        pap = _tree_vdot(p, ap)
        alpha = rz / pap
        x1 = axpy(alpha, p, x)
        r1 = axpy(-alpha, ap, r)
        rr1 = _tree_vdot(r1, r1)
        z1 = M(r1)
        rz1 = rr1 if precond is None else _tree_vdot(r1, z1)
        beta = rz1 / rz
        p1 = axpy(beta, p, z1)
        bad_pap = ~jnp.isfinite(pap)
        indefinite = pap <= 0
        bad_step = ~(jnp.isfinite(alpha) & jnp.isfinite(rr1))
        # First matching condition wins: breakdowns before convergence before maxiter.
        outcomes = [
            (bad_pap, NONFINITE),
            (indefinite, INDEFINITE),
            (bad_step, NONFINITE),
            (rr1 <= thr2, _CHECK),
            (~jnp.isfinite(rz1), NONFINITE),
            (rz1 <= 0, INDEFINITE),
            (k + 1 >= maxiter, MAXITER),
        ]
        status = jnp.select([c for c, _ in outcomes], [s for _, s in outcomes], _RUNNING)
        accept = ~(bad_pap | indefinite | bad_step)
        # Only x is kept on a rejected step: the loop stops then, and r, p are replaced by the
        # outer loop (the reported residual is recomputed from x), so they need no select pass.
        x = otu.tree_where(accept, x1, x)
        return (k + accept.astype(jnp.int32), x, r1, p1, rz1, status.astype(jnp.int32))

    def outer_cond(state):
        return state[-1] == _RUNNING

    def outer_body(state):
        k, x, r, p, rz, tt_last, _ = state
        k, x, _, _, _, inner = jax.lax.while_loop(
            inner_cond, inner_body, (k, x, r, p, rz, jnp.asarray(_RUNNING, jnp.int32))
        )
        res = otu.tree_sub(b, A(x))
        tt = _tree_vdot(res, res)
        stalled = tt > (_PROGRESS * _PROGRESS) * tt_last
        status = jnp.select(
            [
                tt <= thr2,
                ~jnp.isfinite(tt),
                (inner == INDEFINITE) | (inner == NONFINITE),
                inner == MAXITER,
                stalled,
                k >= maxiter,
            ],
            [CONVERGED, NONFINITE, inner, MAXITER, STAGNATED, MAXITER],
            _RUNNING,
        ).astype(jnp.int32)
        # Residual replacement: restart the recurrence from the true residual.
        z = M(res)
        rz = tt if precond is None else _tree_vdot(res, z)
        return (k, x, res, z, rz, tt, status)

    init = (jnp.zeros((), jnp.int32), x, r, z, rz, rr, status)
    k, x, _, _, _, tt, status = jax.lax.while_loop(outer_cond, outer_body, init)
    inv = 1 / scale
    x_out = cast_like(jax.tree.map(lambda v: v * inv.astype(v.dtype), x), rhs)
    return x_out, (k, jnp.sqrt(tt) * inv, status)


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

    Returns ``converged`` exactly when the true residual of the returned x meets
    ‖b − A x‖₂ ≤ max(rtol·‖b‖₂, atol). Stops then, after ``maxiter`` steps, on breakdown
    (pᵀAp ≤ 0, or a NaN/Inf; the last good iterate is kept), or when the tolerance is below
    what the dtype resolves (``STAGNATED``: residual replacement stopped shrinking the true
    residual). Scale-invariant: cg(A, c·b) = c·cg(A, b) for every representable c·b. Runs as one
    ``lax.while_loop``; usable under ``jax.jit`` and ``jax.vmap``; keeps the sharding of b's
    leaves. Differentiable in b and in the arrays ``matvec`` closes over (or, for an operator,
    its array children) by implicit differentiation (``jax.lax.custom_linear_solve``):
    ∂x = A⁻¹(∂b − ∂A x). The warm start x0 and the preconditioner get no gradient.

    Mat-vec count: one per iteration, plus one for r_0 = b − A x0 when x0 is given, plus one
    for each true residual (once at the end; once more per residual replacement).

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
        return cast_like(out, v)

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
