"""The solve path shared by the curvature merges (:func:`mats`, :func:`gradient_matching`).

Both merges minimise a sum of quadratics over the *merged* (shared) parameters S, each
quadratic anchored at its own model and blind to the leaves the user excluded from the merge
(``exclude=``, e.g. per-task classifier heads):

    J(θ) = ½ Σ_k (θ − a_k)ᵀ P K_k P (θ − a_k),                                  (Q)

with P the projection on the merged leaves, K_k symmetric PSD operators and a_k their anchors
(the fine-tuned models, θ0, a damping anchor). With P on both sides, task t's quadratic holds
its excluded block at *task t's own* values: the curvature's coupling between shared and
excluded parameters (a full GGN or Fisher, a K-FAC block across a head) does not pull the
shared parameters towards θ0's head, and merging one model with itself returns that model.
Written from an initialisation θ_init, x = θ − θ_init solves

    (P A P) x = P b,     A = Σ_k K_k,     b = Σ_k K_k P (a_k − θ_init)            (S)

(a merge may build A and b more cheaply than term by term; gradient matching does).

This module holds, once, for both merges:

* reading the per-model curvature arguments (one rule: ``jmerge.curvature.as_operator``),
  the per-model scalars and their checks (eager when concrete, staged when traced);
* the scale s = mean diag(Σ_t |w_t| C_t) over the merged entries that relative
  hyperparameters (damping, prior) multiply (:mod:`jmerge.merges._scale`);
* solving (S): elementwise when A is diagonal (``SOLVER_CLOSED_FORM``), by ``jmerge.cg`` otherwise
  (``SOLVER_CG``), Jacobi-preconditioned where A's diagonal is known;
* the result: :class:`MergeInfo`, with the same fields on every path;
* layout on a mesh (:func:`laid_out_like`): the merged params come back sharded like the
  pretrained ones, and the Hutchinson probes of a matrix-free curvature meet their products
  in one layout, under an outer ``jax.jit`` as well (see below).

Sharding. Under a user's ``jax.jit`` on an Auto mesh the params are tracers whose layout is
known only to XLA's partitioner, so it cannot be read here and pinned with
``with_sharding_constraint``; instead the kernels put values that must share a layout in one
*sharding group* (``jax.experimental.shard_alike``), and the partitioner gives the group one
sharding: the pretrained leaf's, since that input's is fixed. Two groups only: (1) each
merged output leaf with its pretrained leaf; (2) for a matrix-free curvature without a
diagonal, each Hutchinson probe z with its product C z (in ``curvature_scale``). A model's
backward pass returns C z laid out like the model's *gradients*, which need not be the
params' layout, while the probe z follows the forward pass; without (2) the product z ⊙ C z
all-to-alled kernel blocks over the model axis for every probe (f32[64,1,24] and
f32[24,1,2] on the 8-device problem of tests/curvature/test_sharded_curvature.py). The CG
iterates are *not* grouped: left free, the partitioner lays them out like the model's
gradients and a CG step runs the model's own collectives only (measured there); tying them
to the params' layout (grouping A p with p) made every step all-gather the product of each
replicated leaf instead of once at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
from jax.experimental.shard_alike import shard_alike

from jmerge.curvature.operators import (
    CurvatureOperator,
    Damped,
    Diagonal,
    Identity,
    Scaled,
    Sum,
    as_operator,
    jacobi_preconditioner,
    mean_diagonal,
)
from jmerge.merges import _common
from jmerge.merges._common import select
from jmerge.sharding import explicit_sharding
from jmerge.solvers.cg import CONVERGED, MAXITER, NONFINITE, STAGNATED, _tree_vdot, cg
from jmerge.tree import (
    TreeMismatchError,
    cast_like,
    check_finite,
    check_same_shapes,
    check_same_structure,
    compute_dtype,
    is_traced,
    require,
    upcast,
)

PyTree = Any
Curvatures = Sequence[Any] | PyTree

SOLVER_CLOSED_FORM = 0
"""``MergeInfo.solver``: the system was diagonal and solved elementwise."""
SOLVER_CG = 1
"""``MergeInfo.solver``: the system was solved by conjugate gradients (``jmerge.cg``)."""
SOLVER_NAMES = {SOLVER_CLOSED_FORM: "closed_form", SOLVER_CG: "cg"}


class MergeInfo(NamedTuple):
    """How a solver merge went; the same fields on every path (closed form and CG).

    Attributes:
      solver: int32, ``SOLVER_CLOSED_FORM`` (0) or ``SOLVER_CG`` (1); ``SOLVER_NAMES`` maps
        them to names.
      status: int32 status of ``jmerge.cg`` (``jmerge.solvers.CONVERGED`` = 0, ``MAXITER``,
        ``INDEFINITE``, ``NONFINITE``, ``STAGNATED``); the closed form reports
        ``CONVERGED``, ``STAGNATED`` (precision) or ``NONFINITE`` by the same rule.
      converged: bool, ``status == CONVERGED``: the true residual of the merged system at the
        returned parameters meets ``rtol`` (see ``residual_norm``).
      num_steps: int32, CG steps taken (0 for the closed form).
      residual_norm: ‖P (b − A x)‖₂ of the solved system (S) at the returned parameters, in
        the units of b (curvature × parameter), computed from x, not from a recurrence.
      objective: the merge's quadratic objective at the returned parameters (see the merge's
        docstring), in the curvature's units.
      objective_init: the same objective at the initialisation.

    ``info["converged"]`` works as well as ``info.converged``.
    """

    solver: jax.Array
    status: jax.Array
    converged: jax.Array
    num_steps: jax.Array
    residual_norm: jax.Array
    objective: jax.Array
    objective_init: jax.Array

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return getattr(self, key)
        return tuple.__getitem__(self, key)


# ---------------------------------------------------------------------------------------------
# Arguments


def per_model(value: Any, num_models: int, name: str) -> jax.Array:
    """:func:`jmerge.merges._common.per_model`, strongly typed: a Python scalar and an array
    of its dtype then hit the same compiled kernel."""
    arr = _common.per_model(value, num_models, name)
    return jnp.asarray(arr, arr.dtype)


def check_nonnegative(value: Any, name: str, *, not_all_zero: bool = False) -> None:
    """Finite and ≥ 0 (a scalar or per-model array): an error now if concrete, staged
    (``jmerge.tree.require``) if traced."""
    if not is_traced(value):
        v = np.asarray(jax.device_get(value), np.float64)
        if not np.all(np.isfinite(v) & (v >= 0)):
            raise ValueError(f"{name} must be finite and non-negative, got {v.tolist()}.")
        if not_all_zero and not np.any(v > 0):
            raise ValueError(f"{name} are all zero; at least one model needs a positive weight.")
        return
    require(jnp.all(jnp.isfinite(value) & (value >= 0)), f"{name} must be finite and non-negative.")
    if not_all_zero:
        require(
            jnp.any(value > 0), f"{name} are all zero; at least one model needs a positive weight."
        )


def check_preconditioner(preconditioner: Any) -> None:
    if preconditioner not in ("jacobi", None):
        raise ValueError(f"preconditioner must be 'jacobi' or None, got {preconditioner!r}.")


def read_curvatures(
    reference: PyTree, curvatures: Curvatures, num_models: int, name: str = "curvatures"
) -> list[CurvatureOperator]:
    """One operator per model, each read by ``jmerge.curvature.as_operator`` (one rule).

    Accepts a list/tuple of T curvature arguments (operators, diagonal pytrees, scalars s for
    s·I, mixed freely), or one stacked pytree of diagonals with leaves ``(T, *leaf.shape)``.
    Errors name ``curvatures[i]`` and the leaf path.
    """
    if isinstance(curvatures, CurvatureOperator) or hasattr(curvatures, "mv"):
        raise TypeError(
            f"{name} must be a list with one curvature per model ({num_models}) or a stacked "
            f"pytree of diagonals; got a single {type(curvatures).__name__}. Wrap it in a list."
        )
    ref_def = jax.tree_util.tree_structure(reference)
    if (
        isinstance(curvatures, (list, tuple))
        and jax.tree_util.tree_structure(curvatures) != ref_def
    ):
        if len(curvatures) != num_models:
            raise ValueError(
                f"Got {len(curvatures)} {name} for {num_models} fine-tuned models; pass one "
                "curvature per model."
            )
        return [
            as_operator(c, like=reference, name=f"{name}[{i}]") for i, c in enumerate(curvatures)
        ]
    # A stacked pytree of diagonals with a leading model axis.
    check_same_structure(reference, curvatures, ref_name="pretrained", name=name)
    lead = {
        int(np.shape(x)[0]) if np.ndim(x) else None for x in jax.tree_util.tree_leaves(curvatures)
    }
    if lead != {num_models}:
        raise TreeMismatchError(
            f"{name} is a stacked pytree whose leading (model) axis is {sorted(lead, key=str)}, "
            f"expected {num_models} (one diagonal per fine-tuned model)."
        )
    check_same_shapes(
        reference,
        curvatures,
        ref_name="pretrained",
        name=name,
        check_dtypes=False,
        leading_axis=num_models,
    )
    return [
        as_operator(
            Diagonal(jax.tree_util.tree_map(lambda x, i=i: x[i], curvatures)),
            like=reference,
            name=f"{name}[{i}]",
        )
        for i in range(num_models)
    ]


def read_anchor(reference: PyTree, anchor: Any, choices: Sequence[str], name: str) -> tuple:
    """``(kind, tree)``: a named choice (tree None) or ``("tree", validated pytree)``."""
    if isinstance(anchor, str):
        if anchor not in choices:
            raise ValueError(
                f"Unknown {name} {anchor!r}; expected one of {list(choices)} or a pytree shaped "
                "like pretrained."
            )
        return anchor, None
    check_same_shapes(reference, anchor, ref_name="pretrained", name=name, check_dtypes=False)
    check_finite(anchor, name=name)
    return "tree", anchor


# ---------------------------------------------------------------------------------------------
# Inside the kernels


def unflatten_mask(like: PyTree, mask_leaves: tuple[bool, ...]) -> PyTree:
    """The static leaf mask (a tuple of Python bools, a jit static argument) as a pytree."""
    return jax.tree_util.tree_structure(like).unflatten(mask_leaves)


def masked(mask: PyTree, tree: PyTree) -> PyTree:
    """P v: the leaves that do not take part in the merge set to zero."""
    return select(mask, tree, otu.tree_zeros_like(tree))


def stacked_index(stacked: PyTree, t: int) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x[t], stacked)


def upcast_op(op: CurvatureOperator) -> CurvatureOperator:
    """A Diagonal with its tree in the compute dtype (other operators promote in ``mv``)."""
    return Diagonal(upcast(op.tree)) if isinstance(op, Diagonal) else op


def apply(op: CurvatureOperator, v: PyTree) -> PyTree:
    """C v, cast back to v's dtypes."""
    return cast_like(op.mv(v), v)


def is_diagonal(op: CurvatureOperator | None) -> bool:
    """Whether ``op`` is diagonal in the parameter coordinates (a closed form exists)."""
    if op is None or isinstance(op, (Diagonal, Identity)):
        return True
    if isinstance(op, (Scaled, Damped)):
        return is_diagonal(op.op)
    if isinstance(op, Sum):
        return all(is_diagonal(o) for o in op.ops)
    return False


def weighted_sum_op(ops: Sequence[CurvatureOperator], w: jax.Array) -> CurvatureOperator:
    """Σ_t w_t C_t: one Diagonal when every C_t is a Diagonal (one pass per mat-vec)."""
    if all(isinstance(op, Diagonal) for op in ops):
        return Diagonal(
            jax.tree_util.tree_map(
                lambda *ds: sum(w[t].astype(d.dtype) * d for t, d in enumerate(ds)),
                *[op.tree for op in ops],
            )
        )
    return Sum([Scaled(op, w[t]) for t, op in enumerate(ops)])


def laid_out_like(tree: PyTree, like: PyTree) -> PyTree:
    """``tree`` with each leaf put in one sharding group with the same-shaped leaf of ``like``
    (``jax.experimental.shard_alike``): the partitioner gives both one layout, ``like``'s when
    that one is fixed (a jit argument). Values unchanged; works traced and eagerly, under
    ``vmap`` and ``grad``; on one device it does nothing. Under an Explicit mesh (the leaf's
    type carries its sharding, ``jmerge.sharding.explicit_sharding``) the types already decide
    and the leaf is returned as it is."""

    def one(x, y):
        return x if explicit_sharding(x) is not None else shard_alike(x, y)[0]

    return jax.tree_util.tree_map(one, tree, like)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class _ProductLikeVector(CurvatureOperator):
    """C with ``mv(v)`` laid out like v (:func:`laid_out_like`); no diagonal. For the
    Hutchinson probes of :func:`curvature_scale` (see the module docstring)."""

    op: CurvatureOperator

    def mv(self, v: PyTree) -> PyTree:
        return laid_out_like(self.op.mv(v), v)


def _products_like_vectors(op: CurvatureOperator) -> CurvatureOperator:
    """``op`` with every part that has no diagonal (the parts ``mean_diagonal`` probes)
    wrapped in :class:`_ProductLikeVector`; Sum / Scaled / Damped kept, so the parts with a
    diagonal are still read exactly."""
    if isinstance(op, Sum):
        return Sum([_products_like_vectors(o) for o in op.ops])
    if isinstance(op, Scaled):
        return Scaled(_products_like_vectors(op.op), op.scale)
    if isinstance(op, Damped):
        return Damped(_products_like_vectors(op.op), op.delta)
    return op if op.has_diag else _ProductLikeVector(op)


def curvature_scale(
    ops: Sequence[CurvatureOperator], w: jax.Array, like: PyTree, mask: PyTree
) -> jax.Array:
    """s = mean diag(Σ_t |w_t| C_t) over the merged entries: the unit of relative
    hyperparameters. Exact where diagonals are known, Hutchinson probes otherwise
    (``jmerge.curvature.mean_diagonal``); s(c·C) = c·s(C), so a relative hyperparameter
    keeps the merge invariant to the curvatures' overall scale. 1 where s is 0. Each probe's
    product is laid out like the probe (:func:`laid_out_like`, module docstring)."""
    s = mean_diagonal(_products_like_vectors(weighted_sum_op(ops, jnp.abs(w))), like, mask)
    return jnp.where(s > 0, s, jnp.ones_like(s))


def quadratic(terms: Sequence[tuple[Any, PyTree]], theta: PyTree, mask: PyTree) -> jax.Array:
    """J(θ) = ½ Σ_k (θ − a_k)ᵀ P K_k P (θ − a_k) for ``terms`` = [(K_k, a_k)] (eq. Q).

    K_k may be None (the term is skipped). One mat-vec per term.
    """
    total = jnp.zeros((), jnp.result_type(*jax.tree_util.tree_leaves(theta)))
    for op, anchor in terms:
        if op is None:
            continue
        d = masked(mask, otu.tree_sub(theta, anchor))
        total = total + _tree_vdot(d, apply(op, d)).astype(total.dtype)  # no ravel: sharding-safe
    return 0.5 * total


def _status_from_residual(res_norm: jax.Array, thr: jax.Array) -> jax.Array:
    return jnp.select(
        [res_norm <= thr, ~jnp.isfinite(res_norm)], [CONVERGED, NONFINITE], STAGNATED
    ).astype(jnp.int32)


def solve(
    op: CurvatureOperator,
    rhs: PyTree,
    mask: PyTree,
    theta_init: PyTree,
    out_like: PyTree,
    *,
    maxiter: int,
    rtol: float,
    preconditioner: str | None,
) -> tuple[PyTree, tuple[jax.Array, ...]]:
    """Solve (P A P) x = P rhs from x = 0 (eq. S); returns θ = θ_init + P x and
    (solver, status, steps, ‖P (rhs − A x)‖).

    * ``maxiter == 0``: x = 0 (the initialisation is returned), with the true residual of it.
    * A diagonal (:func:`is_diagonal`): x = rhs / diag(A) elementwise, 0 where diag(A) = 0
      (no curvature on that entry: it keeps its initial value, as CG would). A negative
      diagonal entry (gradient matching with α_t < 0) is divided by like any other: the
      elementwise solution of the indefinite system.
    * Otherwise ``jmerge.cg`` (Jacobi-preconditioned where A's diagonal is known). The
      iterates stay in the Krylov space of P·rhs: excluded leaves stay 0, and so do
      coordinates where no curvature acts.

    ``rtol`` is relative to ‖P rhs‖, the residual at the initialisation. The reported
    residual and status are those of the params *returned*: where ``out_like`` (the pretrained
    model) has narrower leaves than the compute dtype (bf16, fp16), θ is rounded to them and
    the residual recomputed (one more mat-vec); a solve that converged in float32 but whose
    rounded params miss the tolerance is reported ``STAGNATED`` (a precision limit).
    """
    b = masked(mask, rhs)
    thr = rtol * otu.tree_norm(b)
    if maxiter == 0 or is_diagonal(op):
        if maxiter == 0:
            x = otu.tree_zeros_like(b)
        else:
            d = cast_like(op.diag(like=theta_init), b)
            x = jax.tree_util.tree_map(
                lambda r, di: jnp.where(di != 0, r / jnp.where(di != 0, di, 1), 0).astype(r.dtype),
                b,
                d,
            )
            x = masked(mask, x)
        res_norm = otu.tree_norm(masked(mask, otu.tree_sub(b, apply(op, x))))
        status = _status_from_residual(res_norm, thr)
        if maxiter == 0:
            status = jnp.where(status == STAGNATED, MAXITER, status).astype(jnp.int32)
        solver, steps = jnp.asarray(SOLVER_CLOSED_FORM, jnp.int32), jnp.zeros((), jnp.int32)
    else:

        def matvec(v):
            return masked(mask, apply(op, masked(mask, v)))

        precond = None
        if preconditioner == "jacobi":
            jac = jacobi_preconditioner(op, like=theta_init)
            if jac is not None:
                precond = lambda v: masked(mask, cast_like(jac(v), v))
        res = cg(matvec, b, preconditioner=precond, rtol=rtol, maxiter=int(maxiter))
        x, status, steps, res_norm = res.x, res.status, res.num_steps, res.residual_norm
        solver = jnp.asarray(SOLVER_CG, jnp.int32)
    theta = jax.tree_util.tree_map(jnp.add, theta_init, masked(mask, x))
    narrow = any(
        m and jnp.result_type(p) != compute_dtype(jnp.result_type(p))
        for m, p in zip(
            jax.tree_util.tree_leaves(mask), jax.tree_util.tree_leaves(out_like), strict=True
        )
    )
    if narrow and maxiter > 0:
        theta = upcast(cast_like(theta, out_like))
        x_r = masked(mask, otu.tree_sub(theta, theta_init))
        res_norm = otu.tree_norm(masked(mask, otu.tree_sub(b, apply(op, x_r))))
        ok = res_norm <= thr
        status = jnp.where(ok, CONVERGED, jnp.where(status == CONVERGED, STAGNATED, status)).astype(
            jnp.int32
        )
    return theta, (solver, status, steps, res_norm)


def make_info(solve_stats: tuple[jax.Array, ...], objective: Any, objective_init: Any) -> MergeInfo:
    solver, status, steps, res_norm = solve_stats
    return MergeInfo(
        solver=solver,
        status=status,
        converged=status == CONVERGED,
        num_steps=steps,
        residual_norm=res_norm,
        objective=jnp.asarray(objective),
        objective_init=jnp.asarray(objective_init),
    )


def finish(mask: PyTree, theta: PyTree, pretrained: PyTree) -> PyTree:
    """The merged params: θ on the merged leaves (cast to the pretrained dtypes), the
    pretrained leaves elsewhere; each leaf laid out like its pretrained leaf
    (:func:`laid_out_like`), also inside a user's ``jit`` on an Auto mesh."""
    return laid_out_like(select(mask, cast_like(theta, pretrained), pretrained), pretrained)
