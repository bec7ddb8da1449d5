"""MaTS: merging by matching models in task parameter subspaces, solved by conjugate gradients.

Tam, Bansal & Raffel (2023), "Merging by Matching Models in Task Parameter Subspaces" (TMLR
2024; arXiv:2312.04339). Each fine-tuned model θ_t comes with a curvature C_t (symmetric
positive semidefinite: a diagonal Fisher, RegMean's per-layer input Grams, K-FAC blocks, or a
matrix-free Hessian / GGN / Fisher) that says which directions of parameter space matter to
task t. The merge minimises the sum of the tasks' quadratic penalties (their §3), plus an
optional damping term that pulls towards an anchor a,

    θ* = argmin_θ  ½ Σ_t w_t (θ − θ_t)ᵀ C_t (θ − θ_t)  +  ½ δ ‖θ − a‖²,

i.e. it solves the linear system (DESIGN.md eq. 1 with C0 = δ I)

    (Σ_t w_t C_t + δ I) θ = Σ_t w_t C_t θ_t + δ a,

which has a closed form only for special C (Fisher merging for diagonal C_t, RegMean for
block Grams), and is solved here for every kind of C_t by preconditioned CG (``jmerge.cg``),
started from an initialisation θ_init (task arithmetic, an average, the closed-form diagonal
merge, ...), as the paper does. The solve path is shared with gradient matching
(:mod:`jmerge.merges._solve`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jmerge.curvature.operators import CurvatureOperator, Damped, Identity, Scaled
from jmerge.merges._common import MergeResult, model_sum, prepare, select, weighted_sum
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
    read_anchor,
    read_curvatures,
    solve,
    stacked_index,
    unflatten_mask,
    upcast_op,
    weighted_sum_op,
)
from jmerge.solvers.cg import _tree_vdot
from jmerge.tree import LeafFilter, axpy, cast_like, place, placed_shardings, upcast

__all__ = ["mats"]

PyTree = Any

_INITS = ("task_arithmetic", "average", "fisher", "pretrained")
_ANCHORS = ("pretrained", "init")


def _initial_point(
    init_kind: str,
    init_tree: PyTree | None,
    *,
    theta0: PyTree,
    stacked: PyTree,
    ops: list[CurvatureOperator],
    w: jax.Array,
    init_alpha: jax.Array,
    delta: jax.Array | None,
    anchor: PyTree | None,
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
        # The damping term enters with its anchor; an anchor "init" is θ_init itself: no term.
        anchors = theta0 if anchor is None else anchor

        def leaf(a, s, d):
            wl = w.astype(s.dtype)
            dmp = jnp.zeros((), s.dtype) if delta is None or anchor is None else delta
            num = model_sum(d * s, wl) + dmp.astype(s.dtype) * a
            den = model_sum(d, wl) + dmp.astype(s.dtype)
            ok = den > 0
            avg = model_sum(s, wl) / jnp.sum(wl)
            return jnp.where(ok, num / jnp.where(ok, den, 1), avg)

        return jax.tree_util.tree_map(leaf, anchors, stacked, dstack)
    # init_kind == "tree"
    return cast_like(upcast(init_tree), theta0)


@functools.partial(
    jax.jit,
    static_argnames=(
        "init_kind",
        "anchor_kind",
        "maxiter",
        "preconditioner",
        "mask_leaves",
        "use_damping",
    ),
)
def _mats_kernel(
    pretrained: PyTree,
    stacked: PyTree,
    ops: list[CurvatureOperator],
    w: jax.Array,
    init_alpha: jax.Array,
    damping: Any,
    init_tree: PyTree | None,
    anchor_tree: PyTree | None,
    rtol: Any,
    *,
    init_kind: str,
    anchor_kind: str,
    maxiter: int,
    preconditioner: str | None,
    mask_leaves: tuple[bool, ...],
    use_damping: bool,
) -> MergeResult:
    mask = unflatten_mask(pretrained, mask_leaves)
    ops = [upcast_op(op) for op in ops]
    theta0 = upcast(pretrained)
    stacked = upcast(stacked)
    ct = jnp.result_type(*jax.tree_util.tree_leaves(theta0))  # scalars: the compute dtype
    w = w.astype(ct)

    delta = None
    if use_damping:
        relative = not isinstance(damping, Absolute)
        scale = curvature_scale(ops, w, theta0, mask) if relative else None
        delta = resolve(damping, scale, ct)
    fixed_anchor = {"pretrained": theta0, "init": None, "tree": None}[anchor_kind]
    if anchor_kind == "tree":
        fixed_anchor = cast_like(upcast(anchor_tree), theta0)
    theta_init = _initial_point(
        init_kind,
        init_tree,
        theta0=theta0,
        stacked=stacked,
        ops=ops,
        w=w,
        init_alpha=init_alpha,
        delta=delta,
        anchor=fixed_anchor,
    )
    theta_init = select(mask, theta_init, theta0)
    anchor = theta_init if anchor_kind == "init" else fixed_anchor

    # J(θ) = ½ Σ_k (θ − a_k)ᵀ P K_k P (θ − a_k) with K = w_t C_t at a = θ_t, and δ I at a.
    terms = [(Scaled(op, w[t]), stacked_index(stacked, t)) for t, op in enumerate(ops)]
    op_a = weighted_sum_op(ops, w)
    if use_damping:
        terms.append((Identity(delta), anchor))
        op_a = Damped(op_a, delta)

    # b = Σ_k K_k P (a_k − θ_init), and J(θ_init) from the same mat-vecs.
    rhs = jax.tree_util.tree_map(jnp.zeros_like, theta0)
    obj_init = jnp.zeros((), ct)
    for op, a in terms:
        d = masked(mask, jax.tree_util.tree_map(jnp.subtract, a, theta_init))
        kd = cast_like(op.mv(d), d)
        rhs = axpy(1.0, kd, rhs)
        obj_init = obj_init + _tree_vdot(d, kd).astype(ct)
    obj_init = 0.5 * obj_init

    theta, stats = solve(
        op_a,
        rhs,
        mask,
        theta_init,
        pretrained,
        maxiter=maxiter,
        rtol=rtol,
        preconditioner=preconditioner,
    )
    objective = obj_init if maxiter == 0 else quadratic(terms, theta, mask)
    return MergeResult(finish(mask, theta, pretrained), make_info(stats, objective, obj_init))


def mats(
    pretrained: PyTree,
    finetuned: Sequence[PyTree] | PyTree,
    curvatures: Curvatures,
    *,
    init: str | PyTree = "task_arithmetic",
    init_alpha: float | Sequence[float] | jax.Array = 1.0,
    damping: float | jax.Array | Absolute = 0.0,
    damping_anchor: str | PyTree = "pretrained",
    weights: float | Sequence[float] | jax.Array | None = None,
    maxiter: int = 100,
    rtol: float = 1e-6,
    preconditioner: str | None = "jacobi",
    include: LeafFilter = None,
    exclude: LeafFilter = None,
) -> MergeResult:
    """MaTS merge: solve (Σ_t w_t P C_t P + δ P) θ = Σ_t w_t P C_t P θ_t + δ P a by CG.

    Tam, Bansal & Raffel (2023), "Merging by Matching Models in Task Parameter Subspaces",
    §3 (the merge as the minimiser of Σ_t (θ−θ_t)ᵀ C_t (θ−θ_t), and solving that linear
    system with the conjugate gradient method from an initialisation; section numbers from
    the arXiv version, equation numbers not relied on). The merged model minimises

        J(θ) = ½ Σ_t w_t (θ − θ_t)ᵀ P C_t P (θ − θ_t) + ½ δ ‖P (θ − a)‖²,

    with P the projection on the merged leaves (all leaves unless ``include``/``exclude``
    leave some out), δ the damping and a its anchor. Excluded leaves are per task: in task
    t's quadratic they are held at θ_t's own values (e.g. each task keeps its classifier
    head), so with a curvature that couples shared (S) and excluded (E) parameters only the
    shared block counts: Σ_t w_t (C_t)_SS (θ_S − θ_t,S) + δ (θ_S − a_S) = 0. A one-model
    merge returns that model's shared parameters. The returned excluded leaves are
    ``pretrained``'s.

    Special cases (tested to equal them): diagonal C_t = F_t is Fisher merging (Matena &
    Raffel 2022); block Grams C_t = ⊕_layers X_tᵀX_t with ``rest=1`` is RegMean (Jin et al.
    2023); exact Hessians of least-squares tasks give the joint (multitask) optimum.

    The system is solved in the *delta from init* form: x = θ − θ_init solves

        (Σ_t w_t P C_t P + δ P) x = Σ_t w_t P C_t P (θ_t − θ_init) + δ P (a − θ_init),  x_0 = 0,

    elementwise when every C_t is diagonal (``info.solver == SOLVER_CLOSED_FORM``), else with
    ``jmerge.cg`` (Jacobi-preconditioned by the summed operator's diagonal where it is
    known). Consequences:

    * ``maxiter=0`` returns θ_init exactly.
    * The solve never moves along the null space of Σ_t w_t C_t (with δ = 0): parameters
      that no task's curvature touches keep their initial value. For a null space that is not
      coordinate-aligned, the change θ − θ_init has no component in it (without
      preconditioner: the minimum-norm change; with Jacobi M: the minimum M⁻¹-norm change).
    * ``rtol`` is relative to the initial residual ‖right-hand side above‖; ``info.converged``
      is True exactly when the true residual of the returned θ meets it.

    Scale: the merge is unchanged when every C_t is multiplied by one c > 0 (to rounding;
    tested for c from 1e-20 to 1e20 in float32), because δ is relative by default: δ =
    ``damping`` · s with s = mean diag(Σ_t w_t C_t) over the merged entries (exact where
    diagonals are known, Hutchinson probes otherwise). ``damping=jmerge.absolute(δ)`` gives δ
    in the curvature's units instead.

    Args:
      pretrained: θ0, a pytree of arrays (any float dtype; bf16/fp16 are computed in float32
        and cast back).
      finetuned: θ_1..θ_T, a list of pytrees shaped like ``pretrained`` or one stacked pytree
        with a leading model axis T.
      curvatures: C_1..C_T: a list with one entry per model, each read by
        ``jmerge.curvature.as_operator`` (an operator such as ``Diagonal``, ``BlockGram``,
        ``KFAC``, ``MatrixFree`` from ``fisher_operator`` / ``ggn_operator`` /
        ``hessian_operator``; a pytree shaped like the params, read as ``Diagonal``; a scalar
        s, read as s·I); or one stacked pytree of diagonals with leaves ``(T, *leaf.shape)``.
        Diagonals must be finite and non-negative (checked where concrete).
      init: θ_init: ``"task_arithmetic"`` (θ0 + Σ_t init_alpha_t (θ_t − θ0)), ``"average"``
        (Σ_t w_t θ_t / Σ_t w_t), ``"fisher"`` (the closed-form diagonal merge
        (Σ_t w_t d_t θ_t + δ a) / (Σ_t w_t d_t + δ) with d_t = C_t.diag() (δ omitted when
        the anchor is ``"init"``), the weighted average where the denominator is 0; an error
        if a curvature has no known diagonal), ``"pretrained"`` (θ0), or a pytree shaped like
        the params.
      init_alpha: scalar or one per model, the task-arithmetic scale of ``init``.
      damping: δ ≥ 0, relative to s (see Scale) unless given as ``jmerge.absolute(δ)``; may be
        traced.
      damping_anchor: a, where damping pulls: ``"pretrained"`` (θ0, default),
        ``"init"`` (θ_init: damping then only slows the move away from the initialisation,
        a trust region), or a pytree shaped like the params. Measured on the digits suite
        (benchmarks/RESULTS.md, MLP, 3 seeds): with a matrix-free Fisher curvature the trust
        region ``damping=1.0, damping_anchor="init"`` beat the default (0.670 vs 0.641
        normalized accuracy, every seed: the undamped solve leaves the region where the
        quadratic model holds, true KL 100-1400x its prediction); with Gram or K-FAC blocks
        it lost (-0.030, -0.011), so the default stays.
      weights: w_t ≥ 0, scalar or one per model; default 1 for every model.
      maxiter: maximum number of CG iterations (static under ``jit``); 0 returns θ_init.
      rtol: relative tolerance of the solve (see above).
      preconditioner: ``"jacobi"`` (diag(Σ_t w_t C_t + δI)⁻¹ where every diagonal is known,
        none otherwise) or None.
      include, exclude: leaf filters (regex on the ``keystr`` path or predicate); see above.

    Returns:
      ``MergeResult(params, info)``: params shaped and typed like ``pretrained``; ``info`` a
      :class:`jmerge.MergeInfo` with ``objective`` = J(θ*) and ``objective_init`` = J(θ_init).
      Mat-vec count: T (+1 with damping) for the right-hand side and J(θ_init), one summed
      operator per CG step plus one per true residual, T (+1) for J(θ*), and Hutchinson probes
      for s when ``damping`` is relative and a curvature has no known diagonal.

    Raises:
      TreeMismatchError: a model, curvature, ``init`` or anchor not shaped like
        ``pretrained`` (the message names ``finetuned[i]`` / ``curvatures[i]`` and the leaf).
      NonFiniteError, ValueError: non-finite inputs, negative curvature diagonals, weights or
        damping (where concrete; under tracing these checks are staged with
        ``jmerge.tree.require``), an unknown ``init`` / anchor / preconditioner.

    Under ``jax.jit``: curvature operators and arrays are ordinary arguments; ``init`` and
    ``damping_anchor`` (when strings), ``maxiter``, ``preconditioner``, ``include`` and
    ``exclude`` must be static.

    Sharded parameters (a ``jax.sharding.Mesh``, e.g. ``jmerge.sharding.shard_params``): the
    merged params come back with ``pretrained``'s shardings whether the merge is called
    eagerly or inside the user's own ``jax.jit`` under ``jax.set_mesh(mesh)``, Auto or
    Explicit axes, with no ``out_shardings`` and no extra argument (each output leaf is put in
    one sharding group with its pretrained leaf, ``jax.experimental.shard_alike``). The CG
    iterates are left to the partitioner, which lays them out like the model's gradients:
    a CG step with a matrix-free curvature runs the model's own collectives (activation
    all-gathers, reductions over the data axis) and scalar all-reduces, no gather or
    all-to-all of parameter blocks; a replicated leaf's result is all-gathered once at the
    end. Hutchinson probes (relative damping / prior with a curvature of unknown diagonal)
    are laid out like their products (no all-to-all of kernel blocks per probe; a replicated
    leaf's product is all-gathered, its own size). ``out_shardings`` of the user's ``jit``
    still choose another layout for the result. Checked on the compiled HLO on 8 devices
    (tests/merges/test_sharded_merges.py, tests/curvature/test_sharded_curvature.py).
    """
    prep = prepare(pretrained, finetuned, include=include, exclude=exclude)
    num_models = prep.num_models
    ops = read_curvatures(pretrained, curvatures, num_models)
    w = per_model(1.0 if weights is None else weights, num_models, "weights")
    check_nonnegative(w, "weights", not_all_zero=True)
    check_nonnegative(damping.value if isinstance(damping, Absolute) else damping, "damping")
    check_preconditioner(preconditioner)
    init_kind, init_tree = read_anchor(pretrained, init, _INITS, "init")
    if init_kind == "fisher":
        for i, op in enumerate(ops):
            if not op.has_diag:
                raise ValueError(
                    f"init='fisher' needs the diagonal of every curvature, but "
                    f"curvatures[{i}] ({type(op).__name__}) has none; give it one (e.g. "
                    "MatrixFree(mv, diag_tree=...)) or choose another init."
                )
    anchor_kind, anchor_tree = read_anchor(pretrained, damping_anchor, _ANCHORS, "damping_anchor")
    result = _mats_kernel(
        pretrained,
        prep.stacked,
        ops,
        w,
        per_model(init_alpha, num_models, "init_alpha"),
        damping,
        init_tree,
        anchor_tree,
        rtol,
        init_kind=init_kind,
        anchor_kind=anchor_kind,
        maxiter=int(maxiter),
        preconditioner=preconditioner,
        mask_leaves=tuple(jax.tree_util.tree_leaves(prep.mask)),
        use_damping=not is_static_zero(damping),
    )
    return result._replace(params=place(result.params, placed_shardings(pretrained)))
