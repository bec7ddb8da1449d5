"""Exact suite: linear and logistic regression tasks, where the exact curvature is known.

Setting (DESIGN.md §4, issue 12 item 4). Parameters θ = {"dense": {"kernel" (d, k), "bias"
(k,)}} of a linear model f(θ, x) = x W + b. Task t has data (X_t, Y_t) (its own input mean and
scales, its own true weights) and the mean loss ℓ_t(θ) (½‖f − y‖² for regression, softmax
cross-entropy for logistic regression). Fine-tuning minimises ℓ_0 + ℓ_t with the prior
ℓ_0(θ) = ½ λ ‖θ − θ0‖² (θ0 a model fitted on pooled "pretraining" data); every optimum is
found by Newton's method on the raveled parameters (dense Hessians, exact to rounding).

Two joint optima, two exactness claims (both hold exactly when every ℓ_t is quadratic):

* gradient matching (Daheim et al. 2024, §3) with H_t = ∇²ℓ_t(θ_t), prior H0 = λ I, α_t = 1:
  θ = θ0 + (λ + Σ_t H_t)⁻¹ Σ_t (λ + H_t)(θ_t − θ0) is the minimiser of ℓ_0 + Σ_t ℓ_t
  (the prior counted once);
* MaTS (Tam et al. 2023, §3) with C_t = ∇²(ℓ_0 + ℓ_t)(θ_t): the solution of
  Σ_t C_t (θ − θ_t) = 0 is the minimiser of Σ_t (ℓ_0 + ℓ_t) (each fine-tuning objective once).

For each curvature — ``exact`` (matrix-free Hessian, ``jmerge.curvature.hessian_operator``),
``diag`` (the exact Hessian's diagonal), ``kfac`` (Kronecker factors of the kernel block:
``kfac_factors`` for logistic regression, the input Gram ⊗ I for regression, which is the
kernel's exact block; biases get their exact diagonal; the kernel–bias coupling is dropped),
``gram`` (RegMean's input Gram, no output curvature) — the table reports the distance of the
merge to its target optimum, ‖θ − θ*‖ / ‖θ* − θ0‖, and the excess of the target objective,
(L(θ) − L(θ*)) / (L(θ_TA) − L(θ*)) with θ_TA = task arithmetic at α = 1/T (so 0 is the
optimum and 1 is as bad as averaging the task vectors). Logistic regression is not quadratic:
there exact curvature lands close to the optimum, not on it, and the table says how close.

Run: ``python -m benchmarks.quality.exact [--quick] [--seeds N]`` (float64 throughout).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

PyTree = Any
KINDS = ("linear", "logistic")
CURVATURES = ("exact", "diag", "kfac", "gram")


@dataclasses.dataclass(frozen=True)
class Apply:
    """f(θ, x) = x W + b (hashable: a static argument of the curvature routines' jit)."""

    def __call__(self, params: PyTree, x: jax.Array) -> jax.Array:
        d = params["dense"]
        return x @ d["kernel"] + d["bias"]


@dataclasses.dataclass(frozen=True)
class TaskLoss:
    """ℓ_t(θ) = mean loss of ``kind`` on batch (x, y), plus ½ λ ‖θ − θ0‖² if ``prior``.

    ``theta0`` is passed in the batch, ``(x, y, theta0)``, so the function stays hashable.
    """

    kind: str
    prior: float = 0.0

    def __call__(self, params: PyTree, batch: tuple) -> jax.Array:
        x, y, theta0 = batch
        z = Apply()(params, x)
        if self.kind == "linear":
            loss = 0.5 * jnp.mean(jnp.sum((z - y) ** 2, axis=-1))
        else:
            loss = optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
        if self.prior:
            diff = jax.tree.map(jnp.subtract, params, theta0)
            loss = loss + 0.5 * self.prior * optax.tree_utils.tree_norm(diff, squared=True)
        return loss


class Problem(NamedTuple):
    """One exact-suite instance.

    Attributes:
      kind: ``"linear"`` or ``"logistic"``. prior: λ.
      theta0: θ0. finetuned: [θ_t]. batches: [(X_t, Y_t)].
      joint_gm: argmin ℓ_0 + Σ_t ℓ_t. joint_mats: argmin Σ_t (ℓ_0 + ℓ_t).
    """

    kind: str
    prior: float
    theta0: PyTree
    finetuned: list[PyTree]
    batches: list[tuple[jax.Array, jax.Array]]
    joint_gm: PyTree
    joint_mats: PyTree


def newton(objective, params: PyTree, *, steps: int = 50, tol: float = 1e-13) -> PyTree:
    """Minimise a smooth convex ``objective(params)`` by damped-free Newton steps on the
    raveled parameters (dense Hessian, ``numpy.linalg.solve``); stops when ‖∇‖ < tol."""
    flat, unravel = ravel_pytree(params)
    f = jax.jit(lambda v: objective(unravel(v)))
    grad, hess = jax.jit(jax.grad(f)), jax.jit(jax.hessian(f))
    for _ in range(steps):
        g = np.asarray(grad(flat))
        if np.linalg.norm(g) < tol:
            break
        flat = flat - jnp.asarray(np.linalg.solve(np.asarray(hess(flat)), g))
    return unravel(flat)


def make_problem(
    kind: str,
    *,
    num_tasks: int = 4,
    dim: int = 12,
    classes: int = 3,
    num_examples: int = 200,
    prior: float = 0.1,
    seed: int = 0,
) -> Problem:
    """Draw T tasks with different input distributions and true weights, fit θ0, θ_t and both
    joint optima. Deterministic in ``seed`` (NumPy ``default_rng``); float64 if x64 is on."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    rng = np.random.default_rng(seed)
    dt = jnp.result_type(float)
    w_shared = rng.standard_normal((dim, classes))

    def draw(n: int, shift: float) -> tuple[jax.Array, jax.Array]:
        mean = shift * rng.standard_normal(dim)
        scale = np.exp(0.5 * rng.standard_normal(dim))
        x = mean + scale * rng.standard_normal((n, dim))
        w = w_shared + 0.7 * rng.standard_normal((dim, classes))
        z = x @ w / np.sqrt(dim)
        if kind == "linear":
            y = z + 0.1 * rng.standard_normal(z.shape)
            return jnp.asarray(x, dt), jnp.asarray(y, dt)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        y = np.array([rng.choice(classes, p=pi) for pi in p], np.int32)
        return jnp.asarray(x, dt), jnp.asarray(y)

    zeros = {"dense": {"kernel": jnp.zeros((dim, classes), dt), "bias": jnp.zeros(classes, dt)}}
    pre_x, pre_y = draw(4 * num_examples, 0.0)
    theta0 = newton(lambda p: TaskLoss(kind, prior)(p, (pre_x, pre_y, zeros)), zeros)
    batches = [draw(num_examples, 1.0) for _ in range(num_tasks)]
    loss, fine = TaskLoss(kind), TaskLoss(kind, prior)
    finetuned = [newton(lambda p, b=b: fine(p, (*b, theta0)), theta0) for b in batches]

    def gm_objective(p):
        total = sum(loss(p, (*b, theta0)) for b in batches)
        diff = jax.tree.map(jnp.subtract, p, theta0)
        return total + 0.5 * prior * optax.tree_utils.tree_norm(diff, squared=True)

    joint_gm = newton(gm_objective, theta0)
    joint_mats = newton(lambda p: sum(fine(p, (*b, theta0)) for b in batches), theta0)
    return Problem(kind, prior, theta0, finetuned, batches, joint_gm, joint_mats)


def _diag_hessian(loss_fn, params: PyTree, batch: tuple) -> PyTree:
    flat, unravel = ravel_pytree(params)
    h = jax.hessian(lambda v: loss_fn(unravel(v), batch))(flat)
    return unravel(jnp.diagonal(h))


def _bias_only(tree: PyTree) -> PyTree:
    d = tree["dense"]
    return {"dense": {"kernel": jnp.zeros_like(d["kernel"]), "bias": d["bias"]}}


def curvature(problem: Problem, t: int, name: str, *, with_prior: bool) -> Any:
    """Task t's curvature of kind ``name`` at θ_t: of ℓ_t, or of ℓ_0 + ℓ_t if ``with_prior``.

    Returns a ``jmerge.curvature`` operator (``exact``: ``hessian_operator``; ``diag``:
    ``Diagonal``; ``kfac``: ``KFAC`` or ``BlockGram`` on the kernel + the bias's exact
    diagonal; ``gram``: ``BlockGram`` on the kernel + the bias's exact diagonal), λI added
    (``Damped``) for ``with_prior`` except on ``exact``, where the prior is in the loss.
    """
    from jmerge import curvature as jc

    x, y = problem.batches[t]
    theta_t, theta0 = problem.finetuned[t], problem.theta0
    loss = TaskLoss(problem.kind)
    if name == "exact":
        fn = TaskLoss(problem.kind, problem.prior if with_prior else 0.0)
        return jc.hessian_operator(fn, theta_t, (x, y, theta0))
    diag = _diag_hessian(loss, theta_t, (x, y, theta0))
    if name == "diag":
        op = jc.Diagonal(diag)
    elif name == "gram" or (name == "kfac" and problem.kind == "linear"):
        # ℓ = ½ mean ‖xW + b − y‖²: the kernel block of the Hessian is (XᵀX / N) ⊗ I.
        g = jc.gram(Apply(), theta_t, x, normalize="mean", rest=0.0)
        op = jc.Sum((g, jc.Diagonal(_bias_only(diag))))
    elif name == "kfac":
        k = jc.kfac_factors(Apply(), theta_t, x, kind="exact", rest=0.0)
        op = jc.Sum((k, jc.Diagonal(_bias_only(diag))))
    else:
        raise ValueError(f"unknown curvature {name!r}; expected one of {CURVATURES}.")
    return jc.Damped(op, problem.prior) if with_prior else op


def _flat(tree: PyTree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0])


class Row(NamedTuple):
    kind: str
    method: str
    curvature: str
    target: str
    distance: float
    excess: float
    note: str


def evaluate(problem: Problem, *, maxiter: int = 500, rtol: float = 1e-12) -> list[Row]:
    """Every merge of ``problem`` against its target optimum (see the module docstring)."""
    import jmerge

    p0, ft = problem.theta0, problem.finetuned
    t = len(ft)
    loss, fine = TaskLoss(problem.kind), TaskLoss(problem.kind, problem.prior)

    def gm_obj(p):
        diff = jax.tree.map(jnp.subtract, p, p0)
        total = sum(float(loss(p, (*b, p0))) for b in problem.batches)
        return total + 0.5 * problem.prior * float(optax.tree_utils.tree_norm(diff, squared=True))

    def mats_obj(p):
        return sum(float(fine(p, (*b, p0))) for b in problem.batches)

    targets = {"gm": (problem.joint_gm, gm_obj), "mats": (problem.joint_mats, mats_obj)}
    ta = jmerge.task_arithmetic(p0, ft, 1.0 / t)

    def row(method, curv, target, params, note=""):
        star, obj = targets[target]
        dist = np.linalg.norm(_flat(params) - _flat(star)) / np.linalg.norm(_flat(star) - _flat(p0))
        excess = (obj(params) - obj(star)) / (obj(ta) - obj(star))
        return Row(problem.kind, method, curv, target, float(dist), float(excess), note)

    def solve_note(res):
        info = res.info
        return (
            f"{jmerge.SOLVER_NAMES[int(info.solver)]}, {int(info.num_steps)} it, "
            f"{'converged' if bool(info.converged) else 'not converged'}"
        )

    rows = [
        row("task_arithmetic(1/T)", "-", "gm", ta),
        row("task_arithmetic(1)", "-", "gm", jmerge.task_arithmetic(p0, ft, 1.0)),
        row("average", "-", "mats", jmerge.average(ft)),
    ]
    for name in CURVATURES:
        c_gm = [curvature(problem, i, name, with_prior=False) for i in range(t)]
        c_mats = [curvature(problem, i, name, with_prior=True) for i in range(t)]
        gm = jmerge.gradient_matching(
            p0,
            ft,
            c_gm,
            alpha=1.0,
            prior=jmerge.absolute(problem.prior),
            maxiter=maxiter,
            rtol=rtol,
        )
        rows.append(row("gradient_matching", name, "gm", gm.params, solve_note(gm)))
        ms = jmerge.mats(
            p0, ft, c_mats, init="task_arithmetic", init_alpha=1.0 / t, maxiter=maxiter, rtol=rtol
        )
        rows.append(row("mats", name, "mats", ms.params, solve_note(ms)))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, smaller problems (CI)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    from benchmarks.quality._common import table

    seeds = range(args.seeds or (1 if args.quick else 3))
    sizes = {"dim": 8, "num_examples": 200} if args.quick else {"dim": 16, "num_examples": 500}
    start = time.perf_counter()
    results: dict[tuple, list[Row]] = {}
    for kind in KINDS:
        for seed in seeds:
            for r in evaluate(make_problem(kind, seed=seed, **sizes)):
                results.setdefault((r.kind, r.method, r.curvature, r.target), []).append(r)
    header = ["problem", "method", "curvature", "target", "‖θ−θ*‖/‖θ*−θ0‖", "excess", "solve"]
    body = [
        [*key, _sci([r.distance for r in rs]), _sci([r.excess for r in rs]), rs[0].note]
        for key, rs in results.items()
    ]
    print(
        f"exact suite: T=4 tasks, d={sizes['dim']}, k=3, N={sizes['num_examples']} per task, "
        f"λ=0.1, seeds {list(seeds)}; float64; target gm = argmin ℓ0+Σℓ_t, "
        f"mats = argmin Σ(ℓ0+ℓ_t)"
    )
    print(table(header, body, markdown=args.markdown))
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


def _sci(values: Sequence[float]) -> str:
    """Mean over seeds (max in brackets when several), 2 significant digits."""
    a = np.asarray(values)
    s = f"{a.mean():.2g}"
    return s if a.size == 1 else f"{s} (max {a.max():.2g})"


if __name__ == "__main__":
    raise SystemExit(main())
