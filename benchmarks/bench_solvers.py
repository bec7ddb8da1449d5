"""Solver benchmark: jmerge.cg against jax.scipy.sparse.linalg.cg and lineax CG.

For each operator it prints, side by side in one run:

* the time of one operator mat-vec, (t(K2) − t(K1)) / (K2 − K1) for K mat-vecs in one jitted
  loop (so without dispatch overhead, like the mat-vecs inside a solver);
* the time per CG iteration of each solver as a ratio to one mat-vec, measured as
  (t(K2 steps) − t(K1 steps)) / (K2 − K1) with the tolerance set to 0, so set-up and the final
  residual mat-vec cancel;
* the per-iteration ratios jmerge / jax.scipy (target ≤ 1.1) and jmerge / lineax;
* iterations and wall time to ‖b − A x‖₂ ≤ 1e-6 ‖b‖₂, and the final true relative residual.

Operators:

(a) c·(diag(d) + U Uᵀ) (rank 4) laid over a pytree of four leaves, n = 1e5, 1e6, 1e7
    parameters (``--quick``: 1e4, 1e5), float32, d log-uniform in [1, 100], c ≥ 1 a scale that
    keeps lineax's breakdown test quiet (see :func:`lineax_safe_scale`);
(b) the damped matrix-free GGN of a small MLP with softmax cross-entropy,
    ``Damped(ggn_operator(...), δ)``: loss averaged over the batch with δ = 1e-2 (lineax's CG
    breaks down on it at step 1), and summed over the batch with δ = max(1, 1000·eps·n).

Tolerances. jmerge and jax.scipy stop on the CG recurrence residual, ‖r‖₂ ≤ rtol·‖b‖₂.
lineax's CG tests ‖r ⊘ (atol + rtol·|b|)‖ ≤ 1 elementwise (and the same for the step), which
for rtol > 0 depends on the smallest |b_i|; it is run with rtol = 0, atol = 1e-6·‖b‖₂ and
``norm=two_norm``, so its residual test is the same, plus lineax's step test ‖Δy‖₂ ≤ atol. lineax
keeps its default ``stabilise_every=10`` (one extra mat-vec every 10 steps). jax.scipy does
not return an iteration count: it is counted in a separate run with a ``jax.debug.callback`` in
the mat-vec (calls − 1, for its initial residual). Same ``maxiter`` for all. Everything is
jitted with the operator as an argument; times are medians over ``--repeats`` runs after a
warm-up, with ``block_until_ready``.

Run: ``python benchmarks/bench_solvers.py [--quick] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import functools
import operator
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jmerge.curvature.operators import Damped, MatrixFree, ggn_operator
from jmerge.solvers import cg

try:
    import lineax as lx
except ImportError:  # pragma: no cover - optional dependency
    lx = None


# ---------------------------------------------------------------- operators


def _lowrank_mv(v, d, u):
    """(diag(d) + U Uᵀ) v with U's k columns stored as pytree leaves of shape (k, *leaf)."""
    coef = jax.tree.reduce(
        operator.add, jax.tree.map(lambda ui, vi: jnp.tensordot(ui, vi, axes=vi.ndim), u, v)
    )
    return jax.tree.map(lambda di, vi, ui: di * vi + jnp.tensordot(coef, ui, axes=1), d, v, u)


def lineax_safe_scale(n: int) -> float:
    """A lower bound on λ_min that keeps lineax's CG from declaring breakdown.

    lineax (0.1.1) sets α = NaN when pᵀAp ≤ 100·eps·n·rᵀr, a test that is not scale invariant;
    for float32 and n = 1e6 it rejects every direction with Rayleigh quotient below ~12. CG's
    iterates and step counts are invariant under A → cA, so the problems are scaled to
    λ_min ≥ 1000·eps·n, which changes nothing for jmerge and jax.scipy.
    """
    return max(1.0, 1000.0 * float(np.finfo(np.float32).eps) * n)


def diag_lowrank_problem(n: int, rank: int = 4, seed: int = 0):
    """Operator c·(diag(d) + U Uᵀ) over four leaves holding ~n float32 parameters, and b;
    d log-uniform in [1, 100], c = :func:`lineax_safe_scale`."""
    rng = np.random.default_rng(seed)
    sizes = [int(n * f) for f in (0.5, 0.3, 0.15)]
    shapes = {
        "embed": (max(sizes[0] // 256, 1), 256),
        "dense_0": (max(sizes[1] // 128, 1), 128),
        "dense_1": (max(sizes[2] // 64, 1), 64),
    }
    shapes["bias"] = (max(n - sum(int(np.prod(s)) for s in shapes.values()), 1),)
    leaf = lambda f: {k: jnp.asarray(f(s), jnp.float32) for k, s in shapes.items()}
    c = lineax_safe_scale(n)
    d = leaf(lambda s: c * np.exp(rng.uniform(0.0, np.log(100.0), size=s)))
    u = leaf(lambda s: np.sqrt(c) * rng.normal(size=(rank, *s)) / np.sqrt(n))
    b = leaf(lambda s: rng.normal(size=s))
    op = MatrixFree(_lowrank_mv, operands=(d, u))
    return op, b


def _mlp_logits(params, x):
    last = sum(k.startswith("w") for k in params) - 1
    h = x
    for i in range(last):
        h = jnp.tanh(h @ params[f"w{i}"] + params[f"b{i}"])
    return h @ params[f"w{last}"]


def _model_fn(params, batch):
    return _mlp_logits(params, batch[0])


def _ce_per_example(z, batch):
    y = batch[1]
    return jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, y[:, None], -1)[:, 0]


def _ce_mean(z, batch):
    return jnp.mean(_ce_per_example(z, batch))


def _ce_sum(z, batch):
    return jnp.sum(_ce_per_example(z, batch))


def mlp_ggn_problem(widths, batch_size: int, damping: float, reduction: str, seed: int = 0):
    """Damped GGN of an MLP (widths[0] inputs, tanh hidden layers, widths[-1] classes) for the
    cross-entropy averaged (``reduction="mean"``) or summed over the batch."""
    rng = np.random.default_rng(seed)
    params = {}
    for i, (a, c) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        params[f"w{i}"] = jnp.asarray(rng.normal(size=(a, c)) / np.sqrt(a), jnp.float32)
        if i < len(widths) - 2:
            params[f"b{i}"] = jnp.zeros((c,), jnp.float32)
    x = jnp.asarray(rng.normal(size=(batch_size, widths[0])), jnp.float32)
    y = jnp.asarray(rng.integers(0, widths[-1], size=(batch_size,)))
    loss = {"mean": _ce_mean, "sum": _ce_sum}[reduction]
    op = Damped(ggn_operator(_model_fn, loss, params, (x, y)), damping)
    b = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    return op, b


# ---------------------------------------------------------------- solvers


def _two_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


@functools.partial(jax.jit, static_argnames="maxiter")
def solve_jmerge(op, b, rtol, maxiter):
    res = cg(op, b, rtol=rtol, atol=0.0, maxiter=maxiter)
    return res.x, res.num_steps


@functools.partial(jax.jit, static_argnames="maxiter")
def solve_scipy(op, b, rtol, maxiter):
    x, _ = jax.scipy.sparse.linalg.cg(op.mv, b, tol=rtol, atol=0.0, maxiter=maxiter)
    return x, jnp.int32(-1)


def _count_scipy_iterations(op, b, rtol, maxiter) -> int:
    calls = []

    def solve(op, b):
        def counted(v):
            jax.debug.callback(lambda: calls.append(1))
            return op.mv(v)

        return jax.scipy.sparse.linalg.cg(counted, b, tol=rtol, atol=0.0, maxiter=maxiter)[0]

    jax.block_until_ready(jax.jit(solve)(op, b))
    return len(calls) - 1


@functools.partial(jax.jit, static_argnames="maxiter")
def solve_lineax(op, b, atol, maxiter):
    structure = jax.eval_shape(lambda: b)
    lop = lx.FunctionLinearOperator(
        op.mv, structure, tags=[lx.symmetric_tag, lx.positive_semidefinite_tag]
    )
    solver = lx.CG(rtol=0.0, atol=atol, norm=_two_norm, max_steps=maxiter)
    sol = lx.linear_solve(lop, b, solver, throw=False)
    return sol.value, sol.stats["num_steps"]


# ---------------------------------------------------------------- timing


def _interleaved_medians(thunks: dict, repeats: int) -> dict:
    """Median wall time of each thunk; one warm-up (compile) each, then ``repeats`` rounds that
    run every thunk once in turn, so that drifts in machine load hit all of them alike."""
    for fn in thunks.values():
        jax.block_until_ready(fn())
    times = {k: [] for k in thunks}
    for _ in range(repeats):
        for k, fn in thunks.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@jax.jit
def _rel_residual(op, b, x):
    r = jax.tree.map(jnp.subtract, b, op.mv(x))
    return _two_norm(r) / _two_norm(b)


@functools.partial(jax.jit, static_argnames="k")
def _repeated_mv(op, v, scale, k):
    """k mat-vecs in one jitted loop, v ← scale·A v (scale ≈ 1/λ_max keeps v bounded)."""
    return jax.lax.fori_loop(0, k, lambda _, v: jax.tree.map(lambda x: scale * x, op.mv(v)), v)


@jax.jit
def _inverse_top_eigenvalue(op, v):
    """1/λ_max of A by 30 normalised power iterations."""

    def step(_, v):
        w = op.mv(v)
        return jax.tree.map(lambda x: x / _two_norm(w), w)

    v = jax.lax.fori_loop(0, 30, step, jax.tree.map(lambda x: x / _two_norm(v), v))
    return 1.0 / _two_norm(op.mv(v))


def bench(name: str, op, b, *, maxiter: int, repeats: int, k1: int, k2: int, rtol=1e-6):
    n = sum(x.size for x in jax.tree.leaves(b))
    bnorm = float(_two_norm(b))
    solvers = {
        "jmerge": lambda k, tol: solve_jmerge(op, b, tol, k),
        "scipy": lambda k, tol: solve_scipy(op, b, tol, k),
    }
    if lx is not None:
        solvers["lineax"] = lambda k, tol: solve_lineax(op, b, tol * bnorm, k)
    # One mat-vec: the difference of k2 and k1 mat-vecs in a jitted loop (no dispatch cost).
    scale = _inverse_top_eigenvalue(op, b)
    thunks = {("mv", k): lambda k=k: _repeated_mv(op, b, scale, k) for k in (k1, k2)}
    # Per iteration: tolerance 0, so exactly k steps are taken unless the solver breaks down.
    for s, run in solvers.items():
        for k in (k1, k2):
            thunks[(s, k)] = lambda run=run, k=k: run(k, 0.0)
        thunks[(s, "tol")] = lambda run=run: run(maxiter, rtol)
    t = _interleaved_medians(thunks, repeats)
    row = {"problem": name, "n": n, "t_mv": (t[("mv", k2)] - t[("mv", k1)]) / (k2 - k1)}
    for s, run in solvers.items():
        steps_k2 = int(run(k2, 0.0)[1])
        ok = s == "scipy" or steps_k2 == k2  # scipy has no count; it never stops early at tol 0
        row[f"{s}_iter"] = max(t[(s, k2)] - t[(s, k1)], 0.0) / (k2 - k1) if ok else float("nan")
        row[f"{s}_t"] = t[(s, "tol")]
        x, steps = run(maxiter, rtol)
        row[f"{s}_steps"] = (
            _count_scipy_iterations(op, b, rtol, maxiter) if s == "scipy" else int(steps)
        )
        row[f"{s}_res"] = float(_rel_residual(op, b, x))
    return row


def print_table(rows, have_lineax: bool):
    solvers = ["jmerge", "scipy"] + (["lineax"] if have_lineax else [])
    ratio = lambda a, c: a / c if c > 0 else float("nan")
    head = (
        f"{'problem':<24}{'n':>10}{'matvec ms':>11}"
        + "".join(f"{'iter/mv ' + s:>16}" for s in solvers)
        + f"{'jm/scipy':>10}"
        + (f"{'jm/lineax':>11}" if have_lineax else "")
    )
    print("Time per CG iteration (ratio to one mat-vec) and jmerge / other per iteration")
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{r['problem']:<24}{r['n']:>10d}{1e3 * r['t_mv']:>11.3f}"
        line += "".join(f"{ratio(r[f'{s}_iter'], r['t_mv']):>16.2f}" for s in solvers)
        line += f"{ratio(r['jmerge_iter'], r['scipy_iter']):>10.2f}"
        if have_lineax:
            line += f"{ratio(r['jmerge_iter'], r['lineax_iter']):>11.2f}"
        print(line)
    head = (
        f"{'problem':<24}"
        + "".join(f"{'iters ' + s:>14}" for s in solvers)
        + "".join(f"{'ms ' + s:>12}" for s in solvers)
        + "".join(f"{'relres ' + s:>15}" for s in solvers)
    )
    print("\nTo ||r|| <= 1e-6 ||b||: iterations, wall time, true relative residual")
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{r['problem']:<24}"
        line += "".join(f"{r[f'{s}_steps']:>14d}" for s in solvers)
        line += "".join(f"{1e3 * r[f'{s}_t']:>12.1f}" for s in solvers)
        line += "".join(f"{r[f'{s}_res']:>15.1e}" for s in solvers)
        print(line)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI sizes (seconds)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement")
    args = parser.parse_args(argv)
    repeats = args.repeats or 5
    sizes = [10**4, 10**5] if args.quick else [10**5, 10**6, 10**7]
    mlp = ([32, 64, 64, 10], 128) if args.quick else ([64, 256, 256, 10], 512)

    print(
        f"jax {jax.__version__}, backend {jax.devices()[0].platform} ({platform.machine()},"
        f" {os.cpu_count()} cores), {jax.device_count()} device(s); lineax "
        + (lx.__version__ if lx is not None else "not installed: its columns are skipped")
    )
    rows = []
    for n in sizes:
        op, b = diag_lowrank_problem(n)
        reps = min(repeats, 3) if n >= 10**7 else repeats
        k2 = 210 if n <= 10**5 else 60  # enough steps that the difference dwarfs timing noise
        name = f"diag+rank4 1e{int(np.log10(n))}"
        rows.append(bench(name, op, b, maxiter=1000, repeats=reps, k1=10, k2=k2))
        print(f"  done {rows[-1]['problem']}", flush=True)
    n_mlp = sum(a * c + c for a, c in zip(mlp[0][:-1], mlp[0][1:], strict=True)) - mlp[0][-1]
    for reduction, damping in (("mean", 1e-2), ("sum", lineax_safe_scale(n_mlp))):
        op, b = mlp_ggn_problem(*mlp, damping=damping, reduction=reduction)
        name = f"MLP GGN {reduction} d={damping:.3g}"
        rows.append(bench(name, op, b, maxiter=1000, repeats=repeats, k1=10, k2=40))
        print(f"  done {name}", flush=True)
    print()
    print_table(rows, lx is not None)
    print(
        "\niter/mv: time per CG iteration / time of one mat-vec; jm/scipy,"
        " jm/lineax: jmerge's time per iteration over theirs (target jm/scipy <= 1.1); relres:"
        " true ||b - A x|| / ||b||; nan: the solver broke down before the step count (lineax"
        " sets alpha = NaN when p'Ap <= 100 eps n r'r, which the mean-loss GGN triggers)."
    )


if __name__ == "__main__":
    main()
