"""MaTS: merging by matching models in task parameter subspaces, solved by conjugate gradients.

Tam, Bansal & Raffel (2023), "Merging by Matching Models in Task Parameter Subspaces" (TMLR
2024; arXiv:2312.04339). Each fine-tuned model θ_t comes with a curvature C_t (symmetric
positive semidefinite: a diagonal Fisher, RegMean's per-layer input Grams, K-FAC blocks, or a
matrix-free Hessian / GGN / Fisher) that says which directions of parameter space matter to
task t. The merge minimises the sum of the tasks' quadratic penalties (their §3)

    θ* = argmin_θ  ½ Σ_t w_t (θ − θ_t)ᵀ C_t (θ − θ_t)  +  ½ δ ‖θ − θ0‖²

i.e. it solves the linear system (DESIGN.md eq. 1 with C0 = δ I)

    (Σ_t w_t C_t + δ I) θ = Σ_t w_t C_t θ_t + δ θ0,

which has a closed form only for special C (Fisher merging for diagonal C_t, RegMean for
block Grams), and is solved here for every kind of C_t by preconditioned CG (``jmerge.cg``),
started from an initialisation θ_init (task arithmetic, an average, the closed-form diagonal
merge, ...), as the paper does.

The curvature helpers of this module (``_read_curvatures``, ``_solve_from``) are shared with
:mod:`jmerge.merges.gradient_matching`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu

from jmerge.curvature.operators import (
    CurvatureOperator,
    Damped,
    Diagonal,
    Identity,
    MatrixFree,
    Scaled,
    Sum,
    jacobi_preconditioner,
)
from jmerge.merges._common import (
    MergeResult,
    cast_like,
    per_model,
    prepare,
    select,
    upcast,
    weighted_sum,
)
from jmerge.solvers.cg import CONVERGED, MAXITER, cg
from jmerge.tree import (
    LeafFilter,
    TreeMismatchError,
    check_finite,
    check_same_shapes,
    check_same_structure,
)

__all__ = ["mats"]

PyTree = Any
Curvatures = Sequence[Any] | PyTree

_INITS = ("task_arithmetic", "average", "fisher", "pretrained")


class _Tag(str):
    """A string that ``jax.jit`` carries as static data (e.g. ``info["solver"]``).

    Compares and hashes as the plain string; has no array leaves, so a jitted merge can
    return it in its ``info`` dict.
    """


jax.tree_util.register_static(_Tag)


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _per_model(value: Any, num_models: int, name: str) -> jax.Array:
    """:func:`per_model`, strongly typed: a Python scalar and an array of its dtype then hit
    the same compiled kernel."""
    arr = per_model(value, num_models, name)
    return jnp.asarray(arr, arr.dtype)


# ---------------------------------------------------------------------------------------------
# Curvature arguments


def _check_diagonal(reference: PyTree, tree: PyTree, name: str) -> None:
    """A diagonal curvature must be shaped like the params, finite and non-negative.

    Finiteness and signs are checked only for concrete leaves (not under ``jax.jit``).
    """
    check_same_shapes(reference, tree, ref_name="pretrained", name=name, check_dtypes=False)
    _check_nonnegative(tree, name)


def _check_nonnegative(tree: PyTree, name: str) -> None:
    check_finite(tree, name=name)
    leaves = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(tree) if not _is_tracer(x)]
    if not leaves:
        return
    mins = jax.device_get([jnp.min(x) if np.size(x) else jnp.zeros(()) for _, x in leaves])
    for (path, x), m in zip(leaves, mins, strict=True):
        if float(m) < 0:
            n_neg = int(np.sum(np.asarray(jax.device_get(x)) < 0))
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} has {n_neg} negative entries (min "
                f"{float(m):.3g}); a curvature diagonal must be non-negative (positive "
                "semidefinite curvature)."
            )


def _check_scalar_nonnegative(value: Any, name: str) -> None:
    if _is_tracer(value):
        return
    v = np.asarray(jax.device_get(value), dtype=np.float64)
    if v.ndim != 0 or not np.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite non-negative scalar, got {value!r}.")


def _check_per_model_nonnegative(
    value: jax.Array, name: str, *, not_all_zero: bool = False
) -> None:
    if _is_tracer(value):
        return
    v = np.asarray(jax.device_get(value), dtype=np.float64)
    if not np.all(np.isfinite(v)) or np.any(v < 0):
        raise ValueError(f"{name} must be finite and non-negative, got {v.tolist()}.")
    if not_all_zero and not np.any(v > 0):
        raise ValueError(f"{name} are all zero; at least one model needs a positive weight.")


def _is_scalar(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float)):
        return True
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) and np.ndim(x) == 0


def _read_one(reference: PyTree, c: Any, name: str) -> CurvatureOperator:
    """One curvature argument as an operator: an operator, a scalar s (s·I) or a diagonal."""
    if c is None:
        raise TypeError(f"{name} is None; expected a curvature operator or a diagonal pytree.")
    if isinstance(c, CurvatureOperator):
        if isinstance(c, Diagonal):
            _check_diagonal(reference, c.tree, name)
            return c
        if isinstance(c, MatrixFree) and c.diag_tree is not None:
            _check_diagonal(reference, c.diag_tree, f"{name}.diag_tree")
        return c
    if hasattr(c, "mv"):
        return MatrixFree(c.mv)
    if _is_scalar(c) and not (_is_scalar(reference) and np.ndim(reference) == 0):
        _check_scalar_nonnegative(c, name)
        return Identity(c)
    _check_diagonal(reference, c, name)
    return Diagonal(c)


def _read_curvatures(
    reference: PyTree, curvatures: Curvatures, num_models: int, name: str = "curvatures"
) -> list[CurvatureOperator]:
    """Validate the per-model curvatures and return one operator per model.

    Accepts a list/tuple of T curvature objects or diagonal pytrees (mixed freely), or one
    stacked pytree of diagonals whose leaves have shape ``(T, *param_leaf.shape)``. Errors
    name ``curvatures[i]`` and the leaf path.
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
        return [_read_one(reference, c, f"{name}[{i}]") for i, c in enumerate(curvatures)]
    # A stacked pytree of diagonals with a leading model axis.
    check_same_structure(reference, curvatures, ref_name="pretrained", name=name)
    leaves = jax.tree_util.tree_leaves(curvatures)
    lead = {int(np.shape(x)[0]) if np.ndim(x) else None for x in leaves}
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
    _check_nonnegative(curvatures, name)
    return [
        Diagonal(jax.tree_util.tree_map(lambda x, i=i: x[i], curvatures)) for i in range(num_models)
    ]


# ---------------------------------------------------------------------------------------------
# Masked solve


def _check_preconditioner(preconditioner: Any) -> None:
    if preconditioner not in ("jacobi", None):
        raise ValueError(f"preconditioner must be 'jacobi' or None, got {preconditioner!r}.")


def _masked(mask: PyTree, tree: PyTree) -> PyTree:
    """P v: zero the leaves that do not take part in the merge."""
    return select(mask, tree, otu.tree_zeros_like(tree))


def _cast_out(tree: PyTree, like: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x, r: jnp.asarray(x, jnp.result_type(r)), tree, like)


def _solve_from(
    op: CurvatureOperator,
    rhs: PyTree,
    mask: PyTree,
    like: PyTree,
    *,
    maxiter: int,
    rtol: float,
    preconditioner: str | None,
):
    """CG for (P A P) x = P rhs from x0 = 0, P the leaf mask; returns the CGResult.

    The iterates stay in the (preconditioned) Krylov space of P·rhs: excluded leaves stay 0,
    and so do coordinates where diag(A) = 0 (no curvature touches them).
    """

    def matvec(v):
        pv = _masked(mask, v)
        return _masked(mask, _cast_out(op.mv(pv), pv))

    precond = None
    if preconditioner == "jacobi":
        jac = jacobi_preconditioner(op, like=like)
        if jac is not None:
            precond = lambda v: _masked(mask, _cast_out(jac(v), v))
    return cg(
        matvec,
        _masked(mask, rhs),
        preconditioner=precond,
        rtol=rtol,
        maxiter=int(maxiter),
    )


def _cg_info(res) -> dict:
    return {
        "num_steps": res.num_steps,
        "residual_norm": res.residual_norm,
        "converged": res.converged,
        "status": res.status,
    }


def _tree_axpy(a: Any, x: PyTree, y: PyTree) -> PyTree:
    """y + a·x per leaf (a cast to each leaf's dtype)."""
    return jax.tree_util.tree_map(lambda u, v: v + jnp.asarray(a, jnp.result_type(v)) * u, x, y)


def _stacked_index(stacked: PyTree, t: int) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x[t], stacked)


# ---------------------------------------------------------------------------------------------
# MaTS


def _upcast_op(op: CurvatureOperator) -> CurvatureOperator:
    """A Diagonal with its tree in the compute dtype (other operators promote in ``mv``)."""
    return Diagonal(upcast(op.tree)) if isinstance(op, Diagonal) else op


def _unflatten_mask(like: PyTree, mask_leaves: tuple[bool, ...]) -> PyTree:
    return jax.tree_util.tree_structure(like).unflatten(mask_leaves)


def _initial_point(
    init_kind: str,
    init_tree: PyTree | None,
    *,
    theta0: PyTree,
    stacked: PyTree,
    ops: list[CurvatureOperator],
    w: jax.Array,
    init_alpha: jax.Array,
    damping: Any,
) -> PyTree:
    """θ_init in the compute dtype (before the leaf mask is applied)."""
    if init_kind == "pretrained":
        return theta0
    if init_kind == "task_arithmetic":
        return jax.tree_util.tree_map(
            lambda p, s: p + weighted_sum(s - p[None], init_alpha), theta0, stacked
        )
    if init_kind == "average":
        return jax.tree_util.tree_map(
            lambda s: weighted_sum(s, w) / jnp.sum(w).astype(s.dtype), stacked
        )
    if init_kind == "fisher":
        diags = [upcast(op.diag(like=theta0)) for op in ops]
        dstack = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *diags)

        def leaf(p, s, d):
            wl = w.astype(s.dtype)
            dmp = jnp.asarray(damping, s.dtype)
            num = jnp.tensordot(wl, d * s, axes=1) + dmp * p
            den = jnp.tensordot(wl, d, axes=1) + dmp
            ok = den > 0
            avg = jnp.tensordot(wl, s, axes=1) / jnp.sum(wl)
            return jnp.where(ok, num / jnp.where(ok, den, 1), avg)

        return jax.tree_util.tree_map(leaf, theta0, stacked, dstack)
    # init_kind == "tree"
    return jax.tree_util.tree_map(
        lambda x, p: jnp.asarray(x, jnp.result_type(p)), upcast(init_tree), theta0
    )


def _objective(
    theta: PyTree,
    *,
    ops: list[CurvatureOperator],
    w: jax.Array,
    stacked: PyTree,
    theta0: PyTree,
    damping: Any,
    mask: PyTree,
) -> jax.Array:
    """½ Σ_t w_t (θ−θ_t)ᵀ C_t (θ−θ_t) + ½ δ ‖θ−θ0‖² (T mat-vecs); θ is θ0 on excluded leaves."""
    total = 0.0
    for t, op in enumerate(ops):
        d = otu.tree_sub(theta, _stacked_index(stacked, t))
        total = total + w[t] * otu.tree_vdot(d, _cast_out(op.mv(d), d))
    d0 = _masked(mask, otu.tree_sub(theta, theta0))
    total = total + damping * otu.tree_vdot(d0, d0)
    return 0.5 * total


@functools.partial(
    jax.jit,
    static_argnames=("init_kind", "maxiter", "preconditioner", "mask_leaves", "use_damping"),
)
def _mats_kernel(
    pretrained: PyTree,
    stacked: PyTree,
    ops: list[CurvatureOperator],
    w: jax.Array,
    init_alpha: jax.Array,
    damping: Any,
    init_tree: PyTree | None,
    rtol: Any,
    *,
    init_kind: str,
    maxiter: int,
    preconditioner: str | None,
    mask_leaves: tuple[bool, ...],
    use_damping: bool,
) -> MergeResult:
    mask = _unflatten_mask(pretrained, mask_leaves)
    ops = [_upcast_op(op) for op in ops]
    theta0 = upcast(pretrained)
    stacked = upcast(stacked)
    ct = jnp.result_type(*jax.tree_util.tree_leaves(theta0))  # scalars: the compute dtype
    w = w.astype(ct)
    damping = jnp.asarray(damping, ct) if use_damping else 0.0
    theta_init = _initial_point(
        init_kind,
        init_tree,
        theta0=theta0,
        stacked=stacked,
        ops=ops,
        w=w,
        init_alpha=init_alpha,
        damping=damping,
    )
    theta_init = select(mask, theta_init, theta0)

    # The summed operator A = Σ_t w_t C_t (+ δ I): one Diagonal when every C_t is diagonal.
    if all(isinstance(op, Diagonal) for op in ops):
        total = jax.tree_util.tree_map(
            lambda *ds: sum(w[t].astype(d.dtype) * d for t, d in enumerate(ds)),
            *[op.tree for op in ops],
        )
        op_sum: CurvatureOperator = Diagonal(total)
    else:
        op_sum = Sum([Scaled(op, w[t]) for t, op in enumerate(ops)])
    op_a = Damped(op_sum, damping) if use_damping else op_sum

    # rhs = Σ_t w_t C_t (θ_t − θ_init) + δ (θ0 − θ_init)  (the initial residual of the solve),
    # and J(θ_init) from the same mat-vecs.
    rhs = otu.tree_zeros_like(theta0)
    obj_init = jnp.zeros((), ct)
    for t, op in enumerate(ops):
        d = otu.tree_sub(_stacked_index(stacked, t), theta_init)
        cd = _cast_out(op.mv(d), d)
        rhs = _tree_axpy(w[t], cd, rhs)
        obj_init = obj_init + w[t] * otu.tree_vdot(d, cd)
    if use_damping:
        d0 = _masked(mask, otu.tree_sub(theta0, theta_init))
        rhs = _tree_axpy(damping, d0, rhs)
        obj_init = obj_init + damping * otu.tree_vdot(d0, d0)
    obj_init = 0.5 * obj_init

    if maxiter == 0:  # θ_init itself; the CG fields as cg reports them for zero steps
        theta = theta_init
        r0 = _masked(mask, rhs)
        res_norm = jnp.sqrt(otu.tree_vdot(r0, r0))
        converged = res_norm <= rtol * res_norm
        info = {
            "num_steps": jnp.zeros((), jnp.int32),
            "residual_norm": res_norm,
            "converged": converged,
            "status": jnp.where(converged, CONVERGED, MAXITER).astype(jnp.int32),
            "objective": obj_init,
        }
    else:
        res = _solve_from(
            op_a, rhs, mask, theta0, maxiter=maxiter, rtol=rtol, preconditioner=preconditioner
        )
        theta = otu.tree_add(theta_init, _masked(mask, res.x))
        info = _cg_info(res)
        info["objective"] = _objective(
            theta, ops=ops, w=w, stacked=stacked, theta0=theta0, damping=damping, mask=mask
        )
    info["objective_init"] = obj_init
    params = select(mask, cast_like(theta, pretrained), pretrained)
    return MergeResult(params, info)


def mats(
    pretrained: PyTree,
    finetuned: Sequence[PyTree] | PyTree,
    curvatures: Curvatures,
    *,
    init: str | PyTree = "task_arithmetic",
    init_alpha: float | Sequence[float] | jax.Array = 1.0,
    damping: float | jax.Array = 0.0,
    weights: float | Sequence[float] | jax.Array | None = None,
    maxiter: int = 100,
    rtol: float = 1e-6,
    preconditioner: str | None = "jacobi",
    include: LeafFilter = None,
    exclude: LeafFilter = None,
) -> MergeResult:
    """MaTS merge: solve (Σ_t w_t C_t + δ I) θ = Σ_t w_t C_t θ_t + δ θ0 by CG from an init.

    Tam, Bansal & Raffel (2023), "Merging by Matching Models in Task Parameter Subspaces",
    §3 (the merge as the minimiser of Σ_t (θ−θ_t)ᵀ C_t (θ−θ_t), and solving that linear
    system with the conjugate gradient method from an initialisation; section numbers from
    the arXiv version, equation numbers not relied on). The merged model minimises

        J(θ) = ½ Σ_t w_t (θ − θ_t)ᵀ C_t (θ − θ_t) + ½ δ ‖θ − θ0‖².

    Special cases (tested to equal them): diagonal C_t = F_t is Fisher merging (Matena &
    Raffel 2022); block Grams C_t = ⊕_layers X_tᵀX_t with ``rest=1`` is RegMean (Jin et al.
    2023); exact Hessians of least-squares tasks give the joint (multitask) optimum.

    The system is solved in the *delta from init* form: x = θ − θ_init solves

        (Σ_t w_t C_t + δ I) x = Σ_t w_t C_t (θ_t − θ_init) + δ (θ0 − θ_init),     x_0 = 0,

    with ``jmerge.cg`` (Jacobi-preconditioned by the summed operator's diagonal where it is
    known). Consequences:

    * ``maxiter=0`` returns θ_init exactly.
    * CG never moves along the null space of Σ_t w_t C_t (with δ = 0): parameters that no
      task's curvature touches (zero rows/columns of every C_t, e.g. a zero Fisher entry)
      keep their initial value. For a null space that is not coordinate-aligned, the change
      θ − θ_init has no component in it (without preconditioner: the minimum-norm change;
      with Jacobi M: the minimum M⁻¹-norm change).
    * ``rtol`` is relative to the initial residual ‖Σ_t w_t C_t (θ_t − θ_init) + δ(θ0 − θ_init)‖:
      CG stops when the residual has shrunk by that factor.

    Scale: multiplying every w_t by c > 0 does not change θ* when δ = 0; with δ > 0 only the
    ratio δ / (scale of Σ w_t C_t) matters (damping pulls θ towards θ0, and away from the
    null space: untouched parameters then go to θ0 rather than staying at θ_init).

    Args:
      pretrained: θ0, a pytree of arrays (any float dtype; bf16/fp16 are computed in float32
        and cast back).
      finetuned: θ_1..θ_T, a list of pytrees shaped like ``pretrained`` or one stacked pytree
        with a leading model axis T.
      curvatures: C_1..C_T: a list with one entry per model, each a curvature operator from
        ``jmerge.curvature.operators`` (``Diagonal``, ``BlockGram``, ``KFAC``, ``MatrixFree``
        e.g. from ``fisher_operator`` / ``ggn_operator`` / ``hessian_operator``, ``Sum``,
        ``Scaled``, ``Damped``), a pytree shaped like the params (read as ``Diagonal``), or a
        scalar s (s·I); or one stacked pytree of diagonals with leaves ``(T, *leaf.shape)``.
        Diagonals must be finite and non-negative (checked outside ``jit``).
      init: θ_init: ``"task_arithmetic"`` (θ0 + init_alpha·Σ_t (θ_t − θ0)), ``"average"``
        (Σ_t w_t θ_t / Σ_t w_t), ``"fisher"`` (the closed-form diagonal merge
        (Σ_t w_t d_t θ_t + δ θ0) / (Σ_t w_t d_t + δ) with d_t = C_t.diag(), the weighted
        average where the denominator is 0 (as ``fisher_merge``); an error if a curvature has
        no known diagonal; the exact solution when every C_t is diagonal), ``"pretrained"``
        (θ0), or a pytree shaped like the params.
      init_alpha: scalar or one per model, the task-arithmetic scale of ``init``.
      damping: δ ≥ 0, the weight of the proximal term ½ δ ‖θ − θ0‖² (makes the system
        positive definite).
      weights: w_t ≥ 0, scalar or one per model; default 1 for every model.
      maxiter: maximum number of CG iterations (static under ``jit``); 0 returns θ_init.
      rtol: CG's relative tolerance (see above).
      preconditioner: ``"jacobi"`` (diag(Σ_t w_t C_t + δI)⁻¹ where every diagonal is known,
        none otherwise) or None.
      include, exclude: leaf filters as in :func:`jmerge.merges._common.prepare` (regex on the
        ``keystr`` path or predicate). Excluded leaves are returned from ``pretrained``, and the
        merged leaves minimise J with the excluded ones held at θ0: the merged block
        A_II θ_I = b_I − A_IE θ0_E of the system (curvature coupling between merged and
        excluded leaves, e.g. of a full GGN, is accounted for; J then includes the constant
        mismatch θ0 − θ_t of the excluded leaves).

    Returns:
      ``MergeResult(params, info)``: params shaped and typed like ``pretrained``; info has
      the CG fields ``num_steps``, ``residual_norm``, ``converged``, ``status`` (see
      :class:`jmerge.CGResult`), ``objective`` = J(θ*) and ``objective_init`` = J(θ_init).
      Mat-vec count: T for the right-hand side (and J(θ_init)), one Σ_t per CG step (plus one
      for cg's true residual), T for J(θ*).

    Under ``jax.jit``: curvature operators and arrays are ordinary arguments; ``init`` (when a
    string), ``maxiter``, ``preconditioner``, ``include`` and ``exclude`` must be static.
    """
    prep = prepare(pretrained, finetuned, include=include, exclude=exclude)
    num_models = prep.num_models
    ops = _read_curvatures(pretrained, curvatures, num_models)
    w = _per_model(1.0 if weights is None else weights, num_models, "weights")
    _check_per_model_nonnegative(w, "weights", not_all_zero=True)
    _check_scalar_nonnegative(damping, "damping")
    _check_preconditioner(preconditioner)
    init_tree = None
    if isinstance(init, str):
        if init not in _INITS:
            raise ValueError(
                f"Unknown init {init!r}; expected one of {list(_INITS)} or a pytree shaped like "
                "pretrained."
            )
        if init == "fisher":
            for i, op in enumerate(ops):
                if not op.has_diag:
                    raise ValueError(
                        f"init='fisher' needs the diagonal of every curvature, but "
                        f"curvatures[{i}] ({type(op).__name__}) has none; give it one (e.g. "
                        "MatrixFree(mv, diag_tree=...)) or choose another init."
                    )
        init_kind = init
    else:
        check_same_shapes(pretrained, init, ref_name="pretrained", name="init", check_dtypes=False)
        check_finite(init, name="init")
        init_kind, init_tree = "tree", init
    use_damping = not (isinstance(damping, (int, float)) and damping == 0)
    return _mats_kernel(
        pretrained,
        prep.stacked,
        ops,
        w,
        _per_model(init_alpha, num_models, "init_alpha"),
        damping,
        init_tree,
        rtol,
        init_kind=init_kind,
        maxiter=int(maxiter),
        preconditioner=preconditioner,
        mask_leaves=tuple(jax.tree_util.tree_leaves(prep.mask)),
        use_damping=use_damping,
    )
