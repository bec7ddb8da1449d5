"""Output matching: the merge that minimises the true objective behind Fisher merging and MaTS.

Fisher merging and MaTS with a Fisher (or GGN) curvature minimise a *quadratic model* of

    L(θ) = Σ_t w_t · (1/N_t) Σ_n KL( p(y | x_tn, θ_t) ‖ p(y | x_tn, θ^(t)) ),

the divergence of the merged model's predictions from each fine-tuned model's on task t's
inputs x_tn: ½ (θ − θ_t)ᵀ F_t (θ − θ_t) is L's second-order Taylor expansion around θ_t
(F_t the Fisher at θ_t), so their merge is L's minimiser only while every θ_t is close enough
to the merge for the expansion to hold. Far from it (the digits suite measures KL/quadratic
ratios of 5-1000 at the MaTS merges: ``benchmarks/RESULTS.md``) the quadratic minimiser is
not L's. :func:`output_matching` minimises L itself, with the same inputs MaTS's and RegMean's
curvatures are computed on (no labels), from any initialisation (a MaTS or Fisher merge, an
average).

θ^(t) is the merged parameters on the merged leaves and θ_t's own on the excluded ones
(``exclude=r"head"``: each task keeps its own head, as when the merged backbone is evaluated).

Solvers:

* ``"gauss_newton"`` (default): Levenberg-Marquardt. Step k solves, by CG (``jmerge.cg``),

      (Σ_t w_t G_t(θ_k) + λ_k d I) Δ = −∇L(θ_k),

  with G_t(θ_k) = (1/N_t) Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n the generalized Gauss-Newton
  matrix of task t's term at the current point (J_n the Jacobian of the logits, p_n the
  merged model's probabilities; matrix-free, one ``jax.jvp`` and one ``jax.vjp`` per task per
  product), d the mean of its diagonal at the initialisation (a Hutchinson estimate, so λ is
  relative and the step is invariant to the scale of the logits), and λ_k the damping. To
  first order in θ_t − θ_k, −∇L(θ_k) = Σ_t w_t G_t(θ_k)(θ_t − θ_k), so the
  undamped step lands on MaTS's solution (Σ_t w_t G_t)⁻¹ Σ_t w_t G_t θ_t with every task's
  curvature taken at the current point instead of at θ_t: Gauss-Newton is MaTS re-linearised
  until the true objective stops falling. A step is taken when it lowers L (ρ > 0,
  ρ = actual / predicted decrease); λ halves when ρ > 3/4 and grows ×4 when ρ < 1/4 (the
  trust-region rules of Nocedal & Wright, *Numerical Optimization*, Alg. 4.1, with
  Marquardt's damping in place of a radius). L never increases.
* an ``optax.GradientTransformation`` (e.g. ``optax.adam(1e-3)``): ``steps`` full-batch
  first-order steps on L, for comparison (benchmarks/quality: at equal accuracy Adam needed
  more steps but less time per step on the digits MLP).

The loop is a ``lax.fori_loop``: the whole merge runs inside ``jax.jit`` (``logits_fn``,
``steps``, ``solver`` and ``cg_maxiter`` static).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from jmerge.merges._common import (
    MergeResult,
    check_result,
    is_concrete,
    model_axis_weights,
    prepare,
    select,
)
from jmerge.solvers.cg import cg
from jmerge.tree import LeafFilter, cast_like, check_finite, stack, upcast

__all__ = ["OutputMatchingInfo", "output_matching", "kl_objective"]

PyTree = Any

_SOLVERS = ("gauss_newton",)


class OutputMatchingInfo(NamedTuple):
    """How an output-matching merge went.

    Attributes:
      objective: L at the returned parameters (nats, weighted sum over tasks of the mean
        KL per input).
      objective_init: L at the initialisation.
      history: (steps,) L after each step (a rejected Gauss-Newton step repeats the value).
      num_accepted: int32, Gauss-Newton steps that lowered L (= steps for optax).
      damping: the final relative damping λ (pass it back as ``damping=`` to continue).
      cg_steps: int32, CG steps summed over the Gauss-Newton steps (0 for optax).
    """

    objective: jax.Array
    objective_init: jax.Array
    history: jax.Array
    num_accepted: jax.Array
    damping: jax.Array
    cg_steps: jax.Array


def _task_params(theta: PyTree, own: PyTree, mask: PyTree) -> PyTree:
    """θ^(t): ``theta`` on merged leaves, task t's own values on the excluded ones."""
    return select(mask, theta, own)


def _log_softmax_kl(p_log: jax.Array, z: jax.Array) -> jax.Array:
    """Mean over leading axes of KL(softmax(p_log) ‖ softmax(z)), summed over the last."""
    q_log = jax.nn.log_softmax(z, axis=-1)
    p = jnp.exp(p_log)
    return jnp.mean(jnp.sum(p * (p_log - q_log), axis=-1))


def kl_objective(
    logits_fn: Callable[[PyTree, Any], jax.Array],
    theta: PyTree,
    finetuned: Sequence[PyTree],
    inputs: Sequence[Any],
    *,
    weights: Any = None,
    mask: PyTree | None = None,
) -> jax.Array:
    """L(θ) = Σ_t w_t mean_n KL(p(·|x_tn, θ_t) ‖ p(·|x_tn, θ^(t))) (module docstring).

    ``logits_fn(params, x)`` returns logits whose last axis is the classes; the KL is summed
    over it and averaged over every other axis. ``mask`` (Python bools shaped like θ) marks
    the merged leaves; elsewhere task t's term uses θ_t's leaves. Weights default to 1/T.
    The objective :func:`output_matching` minimises, computed the same way.

    Raises:
      ValueError: ``inputs`` not one batch per model, weights summing to zero.
    """
    t = len(finetuned)
    if len(inputs) != t:
        raise ValueError(f"inputs: expected one batch per model ({t}); got {len(inputs)}.")
    if mask is None:
        mask = jax.tree.map(lambda _: True, theta)
    w = model_axis_weights(weights, t)
    prob = _make_problem(logits_fn, stack(list(finetuned)), list(inputs), w)
    return _objective(logits_fn, mask, prob, upcast(theta))


class _Problem(NamedTuple):
    """Everything the loop needs about the tasks (a pytree: arrays only): per task θ_t
    (upcast), its inputs, the targets log p(·|x_tn, θ_t) and its weight. In a ``_Problem``
    they are T-tuples and the task terms are unrolled; in a :class:`_Stacked` (every task's
    inputs of one shape) each field has a leading task axis and the terms run in a
    ``lax.scan``, so the compiled program, its compile time and its live memory do not grow
    with T."""

    finetuned: Any
    inputs: Any
    targets: Any
    weights: jax.Array


class _Stacked(_Problem):
    pass


def _make_problem(logits_fn, stacked: PyTree, inputs: list, w: jax.Array) -> _Problem:
    """The tasks' data: ``stacked`` models (leading axis T, upcast here), their inputs, the
    targets log p(·|x_tn, θ_t) (no gradient) and the weights; a :class:`_Stacked` when every
    task's inputs have one structure, shape and dtype, else an unrolled :class:`_Problem`."""
    w = w.astype(jnp.result_type(float))
    stacked = jax.tree.map(upcast, stacked)

    def targets_of(m, x):
        return jax.lax.stop_gradient(jax.nn.log_softmax(logits_fn(m, x), axis=-1))

    signatures = {
        (
            jax.tree.structure(x),
            tuple((np.shape(a), jnp.result_type(a)) for a in jax.tree.leaves(x)),
        )
        for x in inputs
    }
    if len(signatures) == 1:  # one program for every task: a lax.scan over the task axis
        xs = jax.tree.map(lambda *a: jnp.stack(a), *inputs)
        return _Stacked(stacked, xs, jax.lax.map(lambda mx: targets_of(*mx), (stacked, xs)), w)
    models = tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(len(inputs)))
    targets = tuple(targets_of(m, x) for m, x in zip(models, inputs, strict=True))
    return _Problem(models, tuple(inputs), targets, w)


def _over_tasks(prob: _Problem, term: Callable, init: PyTree) -> PyTree:
    """Σ_t term(θ_t, x_t, log p_t, w_t), with ``init`` the zero of the result."""
    if isinstance(prob, _Stacked):

        def body(acc, task):
            return jax.tree.map(jnp.add, acc, term(*task)), None

        fields = (prob.finetuned, prob.inputs, prob.targets, prob.weights)
        return jax.lax.scan(body, init, fields)[0]
    acc = init
    for t in range(len(prob.finetuned)):
        task = (prob.finetuned[t], prob.inputs[t], prob.targets[t], prob.weights[t])
        acc = jax.tree.map(jnp.add, acc, term(*task))
    return acc


def _objective(logits_fn, mask, prob: _Problem, theta: PyTree) -> jax.Array:
    def term(own, x, p_log, w):
        z = logits_fn(_task_params(theta, own, mask), x)
        return (w * _log_softmax_kl(p_log, z)).astype(prob.weights.dtype)

    return _over_tasks(prob, term, jnp.zeros((), prob.weights.dtype))


def _ggn_mv(logits_fn, mask, prob: _Problem, theta: PyTree, v: PyTree) -> PyTree:
    """Σ_t w_t G_t(θ) v on the merged leaves (zero elsewhere)."""

    def term(own, x, p_log, w):
        def f(th):
            return logits_fn(_task_params(th, own, mask), x)

        z, jv = jax.jvp(f, (theta,), (v,))
        s = jax.nn.softmax(z, axis=-1)
        hjv = s * jv - s * jnp.sum(s * jv, axis=-1, keepdims=True)
        count = hjv.size // hjv.shape[-1]  # the mean over every axis but the classes
        _, vjp = jax.vjp(f, theta)
        return vjp(hjv * (w / count).astype(hjv.dtype))[0]

    out = _over_tasks(prob, term, jax.tree.map(jnp.zeros_like, v))
    return select(mask, out, jax.tree.map(jnp.zeros_like, out))


def _mean_diagonal(logits_fn, mask, prob: _Problem, theta: PyTree, key: jax.Array) -> jax.Array:
    """Hutchinson estimate (4 Rademacher probes) of the mean diagonal of Σ_t w_t G_t(θ) over
    the merged entries."""
    leaves, treedef = jax.tree.flatten(theta)
    mask_leaves = jax.tree.leaves(mask)
    n = sum(x.size for x, m in zip(leaves, mask_leaves, strict=True) if m)

    def probe(k):
        ks = jax.random.split(k, len(leaves))
        v = [
            jax.random.rademacher(kk, x.shape, x.dtype) if m else jnp.zeros_like(x)
            for kk, x, m in zip(ks, leaves, mask_leaves, strict=True)
        ]
        v = jax.tree.unflatten(treedef, v)
        return otu.tree_vdot(v, _ggn_mv(logits_fn, mask, prob, theta, v))

    return jnp.sum(jax.lax.map(probe, jax.random.split(key, 4))) / (4 * max(n, 1))


def _gauss_newton(logits_fn, mask, prob, theta, steps, damping, cg_maxiter, cg_rtol, key):
    mv = lambda th, v: _ggn_mv(logits_fn, mask, prob, th, v)  # noqa: E731
    value_and_grad = jax.value_and_grad(lambda th: _objective(logits_fn, mask, prob, th))
    zero = jax.tree.map(jnp.zeros_like, theta)
    scale = _mean_diagonal(logits_fn, mask, prob, theta, key)
    scale = jnp.where(scale > 0, scale, 1.0)
    value0 = _objective(logits_fn, mask, prob, theta)

    def body(k, state):
        th, value, lam, history, accepted, cg_steps = state
        _, g = value_and_grad(th)
        g = select(mask, g, zero)
        shift = lam * scale

        def damped(v):
            return jax.tree.map(lambda a, b: a + shift.astype(a.dtype) * b, mv(th, v), v)

        res = cg(damped, otu.tree_scale(-1.0, g), rtol=cg_rtol, maxiter=cg_maxiter)
        step = res.x
        predicted = -(otu.tree_vdot(g, step) + 0.5 * otu.tree_vdot(step, mv(th, step)))
        trial = otu.tree_add(th, step)
        new_value = _objective(logits_fn, mask, prob, trial)
        rho = (value - new_value) / predicted
        good = jnp.isfinite(new_value) & (new_value < value) & (predicted > 0)
        th = otu.tree_where(good, trial, th)
        value = jnp.where(good, new_value, value)
        lam = jnp.where(
            good & (rho > 0.75), lam * 0.5, jnp.where(~good | (rho < 0.25), lam * 4.0, lam)
        )
        history = history.at[k].set(value)
        return th, value, lam, history, accepted + good.astype(jnp.int32), cg_steps + res.num_steps

    init = (
        theta,
        value0,
        jnp.asarray(damping, value0.dtype),
        jnp.zeros((steps,), value0.dtype),
        jnp.int32(0),
        jnp.int32(0),
    )
    th, value, lam, history, accepted, cg_steps = jax.lax.fori_loop(0, steps, body, init)
    return th, OutputMatchingInfo(value, value0, history, accepted, lam, cg_steps)


def _first_order(logits_fn, mask, prob, theta, steps, tx: optax.GradientTransformation):
    zero = jax.tree.map(jnp.zeros_like, theta)
    value_and_grad = jax.value_and_grad(lambda th: _objective(logits_fn, mask, prob, th))

    def body(k, state):
        # values[k] = L before step k: the forward pass of the gradient, not a second one
        th, opt, values = state
        value, g = value_and_grad(th)
        updates, opt = tx.update(select(mask, g, zero), opt, th)
        th = optax.apply_updates(th, select(mask, updates, zero))
        return th, opt, values.at[k].set(value)

    values = jnp.zeros((steps + 1,), prob.weights.dtype)
    th, _, values = jax.lax.fori_loop(0, steps, body, (theta, tx.init(theta), values))
    values = values.at[steps].set(_objective(logits_fn, mask, prob, th))
    info = OutputMatchingInfo(
        values[steps],
        values[0],
        values[1:],
        jnp.int32(steps),
        jnp.asarray(jnp.nan, values.dtype),
        jnp.int32(0),
    )
    return th, info


def output_matching(
    logits_fn: Callable[[PyTree, Any], jax.Array],
    pretrained: PyTree,
    finetuned: Sequence[PyTree],
    inputs: Sequence[Any],
    *,
    init: PyTree | None = None,
    weights: Any = None,
    include: LeafFilter = None,
    exclude: LeafFilter = None,
    steps: int = 20,
    solver: str | optax.GradientTransformation = "gauss_newton",
    damping: float = 1.0,
    cg_maxiter: int = 30,
    cg_rtol: float = 1e-3,
    key: jax.Array | None = None,
) -> MergeResult:
    """Merge by minimising the KL of the merged model's predictions from each fine-tuned one's.

    θ* = argmin_θ L(θ),  L(θ) = Σ_t w_t (1/N_t) Σ_n KL(p(·|x_tn, θ_t) ‖ p(·|x_tn, θ^(t))),

    the objective whose quadratic model around each θ_t Fisher merging and MaTS minimise
    (module docstring); found by Levenberg-Marquardt Gauss-Newton steps, each a matrix-free
    CG solve with the current point's GGN, or by an optax optimizer.

    Args:
      logits_fn: ``logits_fn(params, x)`` → logits, classes on the last axis (a Flax
        ``lambda p, x: model.apply(p, x)``). Static under ``jax.jit``: pass a hashable callable.
      pretrained: θ0: the parameter structure, and the value of leaves not merged.
      finetuned: the T fine-tuned models θ_t, shaped and typed like ``pretrained``.
      inputs: T batches, ``inputs[t]`` task t's inputs x_t (any pytree ``logits_fn`` takes;
        the same inputs as its curvature, no labels).
      init: the starting point (default: the average of ``finetuned``), e.g. a MaTS or Fisher
        merge's ``params``.
      weights: w_t, a scalar or T values (default 1/T); their sum must not be zero.
      include, exclude: which leaves are merged (``jmerge.tree.leaf_mask``); in task t's term
        the other leaves take θ_t's values, and the result takes ``pretrained``'s.
      steps: static int ≥ 0, optimizer steps (Gauss-Newton steps, or optax updates).
      solver: ``"gauss_newton"`` or an ``optax.GradientTransformation``.
      damping: initial relative Levenberg-Marquardt damping λ0 (> 0; in units of the mean
        GGN diagonal at ``init``); adapted every step.
      cg_maxiter, cg_rtol: the CG solve of each Gauss-Newton step (inexact Newton: a loose
        tolerance is enough).
      key: PRNG key of the Hutchinson probes that set the damping's scale (default key 0).

    Returns:
      :class:`MergeResult` ``(params, info)`` with info an :class:`OutputMatchingInfo`;
      params shaped and typed like ``pretrained``.

    Raises:
      ValueError: ``inputs`` not one batch per model, ``steps`` < 0, ``damping`` ≤ 0, an
        unknown solver, weights summing to zero.
      jmerge.tree.TreeMismatchError / NonFiniteError: a model or ``init`` that does not match
        ``pretrained`` (naming the leaf path) or holds NaN/Inf.

    Source: the objective is the one Fisher merging approximates (Matena & Raffel 2022, §2)
    and MaTS generalises (Tam et al. 2023, §3); Levenberg-Marquardt per Nocedal & Wright,
    *Numerical Optimization*, 2nd ed., §10.3 and Alg. 4.1.
    """
    prep = prepare(pretrained, finetuned, include=include, exclude=exclude)
    t = prep.num_models
    inputs = list(inputs)
    if len(inputs) != t:
        raise ValueError(f"inputs: expected one batch per model ({t}); got {len(inputs)}.")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0; got {steps!r}.")
    if isinstance(solver, str) and solver not in _SOLVERS:
        raise ValueError(
            f"solver: expected one of {_SOLVERS} or an optax.GradientTransformation; "
            f"got {solver!r}."
        )
    if is_concrete(damping) and not float(damping) > 0:
        raise ValueError(f"damping must be > 0; got {damping!r}.")
    for i, x in enumerate(inputs):
        check_finite(x, name=f"inputs[{i}]")
    w = model_axis_weights(weights, t)
    if init is None:
        theta = jax.tree.map(lambda a: jnp.mean(upcast(a), axis=0), prep.stacked)
    else:
        prepare(pretrained, [init], ref_name="pretrained", check_dtypes=False)
        theta = upcast(init)
    theta = select(prep.mask, theta, upcast(pretrained))
    prob = _make_problem(logits_fn, prep.stacked, inputs, w)
    if isinstance(solver, str):
        key = jax.random.key(0) if key is None else key
        theta, info = _gauss_newton(
            logits_fn, prep.mask, prob, theta, steps, damping, cg_maxiter, cg_rtol, key
        )
    else:
        theta, info = _first_order(logits_fn, prep.mask, prob, theta, steps, solver)
    merged = cast_like(select(prep.mask, theta, pretrained), pretrained)
    return MergeResult(check_result(merged, "output_matching", finetuned, inputs, init), info)
