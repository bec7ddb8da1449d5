"""Merge benchmark: elementwise-merge throughput against a memory copy, and MaTS's time split.

Part 1 — throughput. T = 4 fine-tuned float32 models of n parameters each (n = 1e8, i.e.
1.6 GB for the four; ``--quick``: 1e6) laid over a pytree of six leaves (an embedding matrix,
two dense kernels with their biases, a norm scale), passed in the stacked layout (leaves
``(T, *s)``) so that stacking lists is not timed, with θ0 and, where used, T diagonal Fishers
of the same shapes. Timed side by side in one run (interleaved rounds, median after a warm-up
compile, ``block_until_ready``), every merge called through ``jax.jit`` so that the eager
input validation is not timed:

* ``copy``: ``x + c`` on every leaf of the stacked models with ``c = 0.0`` a traced scalar (so
  XLA cannot elide it): reads and writes T·n floats;
* ``average``, ``task_arithmetic`` (α = 0.3), ``ties`` (density 0.2, per-tensor threshold),
  ``dare`` (density 0.2), ``fisher_merge``, ``gradient_matching`` with diagonal curvatures
  (the Fishers) and a scalar prior 1e-3 (the closed-form path);
* a second table, timed in the same rounds: ``ties (global)`` (one threshold over all leaves
  of a model), ``dare_ties``, and the selection alone: ``kth_largest`` (the sort-free radix
  select of :mod:`jmerge.merges._select`) of the magnitudes |θ_t − θ0| of the largest leaf,
  next to ``lax.top_k`` of the same (only at ``--quick`` sizes or ``--top-k``: at 1e8 params it
  takes minutes; its bytes are counted as the selection's input, T + 1 models' worth of
  that leaf).

Throughput is GB/s = (bytes read + bytes written) / time, counting the bytes a merge cannot
avoid: its inputs once and its output once (T models; + θ0 for the merges that take task
vectors; + T Fishers for the curvature merges; one model written). The ratio to ``copy``'s
GB/s is the share of memory bandwidth a merge reaches (target ≥ 0.5). TIES's exact threshold
needs passes over the task vectors before the merge pass (two histogram passes for float32),
so it moves its bytes about three times; its target is checked all the same.

Part 2 — MaTS time split on a small MLP (T = 3 tasks, each with its own inputs, θ_t = θ0 +
a perturbation), three curvature kinds:

* ``diag``: C_t = diag Fisher (``fisher_diag(kind="exact")``), Jacobi-preconditioned CG;
* ``matrix-free``: C_t = ``fisher_operator`` (``MatrixFree``, no diagonal: no preconditioner);
* ``matrix-free+jacobi``: the same operator with ``diag_tree`` = the exact diagonal Fisher.

Columns: curvature (building C_1..C_T: the diagonal Fishers; nothing to compute for a bare
operator), solve (the jitted ``mats`` call to rtol, right-hand side and objectives included),
CG steps, solve / steps, the marginal time of one CG iteration (t(k2) − t(k1)) / (k2 − k1) with
rtol = 0, and that as a ratio to one Σ_t w_t C_t v mat-vec.

Run: ``python benchmarks/bench_merges.py [--quick] [--repeats N] [--params N] [--top-k]``.
"""

from __future__ import annotations

import argparse
import functools
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from _timing import format_table, interleaved_medians, machine_info

from jmerge.curvature.fisher import fisher_diag
from jmerge.curvature.operators import MatrixFree, fisher_operator
from jmerge.merges._select import kth_largest
from jmerge.merges.basic import average, task_arithmetic
from jmerge.merges.closed_form import fisher_merge
from jmerge.merges.gradient_matching import gradient_matching
from jmerge.merges.mats import mats
from jmerge.merges.sparse import dare, dare_ties, ties

F32 = jnp.float32
NUM_MODELS = 4

# ---------------------------------------------------------------------------- part 1


def leaf_shapes(n: int) -> dict:
    """Six leaves holding about n parameters: embed 25 %, two kernels, biases, a norm scale."""
    w = 4096 if n >= 10**7 else 512
    embed = (max(n // 4 // 1024, 1), 1024)
    k0 = (max(int(0.4 * n) // w, 1), w)
    used = math.prod(embed) + math.prod(k0) + 2 * w
    k1 = (w, max((n - used) // (w + 1), 1))
    return {
        "embed": embed,
        "block_0": {"kernel": k0, "bias": (w,)},
        "block_1": {"kernel": k1, "bias": (k1[1],)},
        "norm": {"scale": (w,)},
    }


def make_models(n: int, num_models: int, seed: int = 0):
    """θ0, the stacked θ_t = θ0 + 0.01 ε_t, and stacked Fishers F_t ~ Exp(1), all float32."""
    shapes = leaf_shapes(n)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(jax.random.key(seed), 3 * len(leaves))

    @functools.partial(jax.jit, static_argnums=(1,))
    def one(k, shape):
        k0, k1, k2 = jax.random.split(k, 3)
        p = jax.random.normal(k0, shape, F32)
        s = p + 0.01 * jax.random.normal(k1, (num_models, *shape), F32)
        f = jax.random.exponential(k2, (num_models, *shape), F32)
        return p, s, f

    out = [one(keys[i], s) for i, s in enumerate(leaves)]
    tree = lambda j: jax.tree.unflatten(treedef, [o[j] for o in out])
    return tree(0), tree(1), tree(2)


MERGES = ["copy", "average", "task_arithmetic", "ties", "dare", "fisher_merge", "gradient_matching"]


def bench_throughput(n: int, repeats: int, with_top_k: bool):
    pre, stacked, fishers = make_models(n, NUM_MODELS)
    jax.block_until_ready((pre, stacked, fishers))
    num = sum(x.size for x in jax.tree.leaves(pre))
    t, b = NUM_MODELS, 4 * num  # models, bytes of one model
    key = jax.random.key(1)
    zero = jnp.zeros((), F32)
    big = max(jax.tree.leaves(pre), key=lambda x: x.size)
    big_s = max(jax.tree.leaves(stacked), key=lambda x: x.size)
    k_big = max(1, int(0.2 * big.size))
    big_share = big.size / num  # the selection rows read one leaf, not the model

    def mags(p, s):
        return jnp.abs(s - p).reshape(t, -1)

    # name: (function, arguments, models' worth read + written, how they add up)
    ops = {
        "copy": (lambda s, c: jax.tree.map(lambda x: x + c, s), (stacked, zero), 2 * t, f"{t}+{t}"),
        "average": (lambda s: average(s), (stacked,), t + 1, f"{t}+1"),
        "task_arithmetic": (
            lambda p, s: task_arithmetic(p, s, 0.3),
            (pre, stacked),
            t + 2,
            f"1+{t}+1",
        ),
        "ties": (lambda p, s: ties(p, s, density=0.2), (pre, stacked), t + 2, f"1+{t}+1"),
        "dare": (
            lambda p, s, k: dare(p, s, density=0.2, key=k),
            (pre, stacked, key),
            t + 2,
            f"1+{t}+1",
        ),
        "fisher_merge": (
            lambda s, f: fisher_merge(s, f),
            (stacked, fishers),
            2 * t + 1,
            f"{t}+{t}+1",
        ),
        "gradient_matching": (
            lambda p, s, f: gradient_matching(p, s, f, alpha=1.0, prior=1e-3).params,
            (pre, stacked, fishers),
            2 * t + 2,
            f"1+{2 * t}+1",
        ),
        "ties (global)": (
            lambda p, s: ties(p, s, density=0.2, scope="global"),
            (pre, stacked),
            t + 2,
            f"1+{t}+1",
        ),
        "dare_ties": (
            lambda p, s, k: dare_ties(p, s, density=0.2, key=k),
            (pre, stacked, key),
            t + 2,
            f"1+{t}+1",
        ),
        "kth_largest (largest leaf)": (
            lambda p, s: kth_largest(mags(p, s), k_big),
            (big, big_s),
            (t + 1) * big_share,
            f"({t}+1) x {big_share:.2f}",
        ),
    }
    if with_top_k:
        ops["lax.top_k (largest leaf)"] = (
            lambda p, s: jax.lax.top_k(mags(p, s), k_big)[0][:, -1],
            (big, big_s),
            (t + 1) * big_share,
            f"({t}+1) x {big_share:.2f}",
        )
    compiled, compile_s = {}, {}
    for k, (fn, args, _, _) in ops.items():
        t0 = time.perf_counter()
        compiled[k] = jax.jit(fn).lower(*args).compile()
        compile_s[k] = time.perf_counter() - t0
    out = {k: compiled[k](*ops[k][1]) for k in ops}
    if with_top_k:  # the sort-free selection is exact: the same value as lax.top_k
        kth, top = out["kth_largest (largest leaf)"], out["lax.top_k (largest leaf)"]
        assert np.array_equal(np.asarray(kth), np.asarray(top)), (kth, top)
    thunks = {k: functools.partial(compiled[k], *ops[k][1]) for k in ops}
    times = interleaved_medians(thunks, repeats)
    gbs = {k: ops[k][2] * b / times[k] / 1e9 for k in ops}

    def row(k):
        ratio = gbs[k] / gbs["copy"]
        target = "" if k == "copy" or "(largest leaf)" in k else "PASS" if ratio >= 0.5 else "MISS"
        return [
            k,
            ops[k][3],
            f"{ops[k][2] * b / 1e9:.3f}",
            f"{1e3 * times[k]:.1f}",
            f"{gbs[k]:.3g}",
            f"{ratio:.3g}",
            f"{compile_s[k]:.2f}",
            repeats,
            target,
        ]

    header = [
        "models moved",
        "GB moved",
        "ms",
        "GB/s",
        "ratio to copy",
        "compile s",
        "runs",
        "target >= 0.5",
    ]
    main = format_table(["merge", *header], [row(k) for k in MERGES], "<>>>>>>><")
    extra = format_table(
        ["variant", *header], [row(k) for k in ops if k not in MERGES], "<>>>>>>><"
    )
    return num, main, extra, gbs


# ---------------------------------------------------------------------------- part 2


class MLP(nn.Module):
    widths: tuple[int, ...]
    classes: int

    @nn.compact
    def __call__(self, x):
        for w in self.widths:
            x = jnp.tanh(nn.Dense(w, param_dtype=F32)(x))
        return nn.Dense(self.classes, param_dtype=F32)(x)


class _Apply:
    """``logits_fn(params, x)``; one object, so static-argument jit caches are hit."""

    def __init__(self, module):
        self.module = module

    def __call__(self, params, x):
        return self.module.apply({"params": params}, x)


def _tree_sum(trees):
    return jax.tree.map(lambda *xs: sum(xs), *trees)


def bench_mats(quick: bool, repeats: int, num_tasks: int = 3):
    d_in, widths, n_ex = (32, (64,), 64) if quick else (256, (512, 512), 1024)
    module = MLP(widths, 10)
    fn = _Apply(module)
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.normal(loc=0.5 * t, size=(n_ex, d_in)), F32) for t in range(num_tasks)]
    pre = module.init(jax.random.key(0), xs[0][:1])["params"]
    models = [
        jax.tree.map(lambda p: p + jnp.asarray(0.05 * rng.normal(size=p.shape), F32), pre)
        for _ in range(num_tasks)
    ]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *models)
    num_params = sum(p.size for p in jax.tree.leaves(pre))
    damping, maxiter, rtol = 1e-3, 200, 1e-4
    k1, k2 = 10, 40

    diag_fn = jax.jit(lambda p, x: fisher_diag(fn, p, x, kind="exact"))
    diags = [diag_fn(m, x) for m, x in zip(models, xs, strict=True)]
    bare = [fisher_operator(fn, m, x) for m, x in zip(models, xs, strict=True)]
    jac = [
        MatrixFree(o.mv_fn, diag_tree=d, operands=o.operands)
        for o, d in zip(bare, diags, strict=True)
    ]
    curv = {"diag": diags, "matrix-free": bare, "matrix-free+jacobi": jac}

    def solver(k, tol):
        return jax.jit(lambda p, s, c: mats(p, s, c, damping=damping, maxiter=k, rtol=tol))

    mv_sum = jax.jit(
        lambda c, v: _tree_sum(
            [o.mv(v) if hasattr(o, "mv") else jax.tree.map(jnp.multiply, o, v) for o in c]
        )
    )
    v = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), F32), pre)
    solve_tol, solve_k1, solve_k2 = solver(maxiter, rtol), solver(k1, 0.0), solver(k2, 0.0)
    thunks = {
        ("curvature", "diag"): lambda: [diag_fn(m, x) for m, x in zip(models, xs, strict=True)]
    }
    for name, c in curv.items():
        thunks[("solve", name)] = lambda c=c: solve_tol(pre, stacked, c)
        thunks[("k1", name)] = lambda c=c: solve_k1(pre, stacked, c)
        thunks[("k2", name)] = lambda c=c: solve_k2(pre, stacked, c)
        thunks[("mv", name)] = lambda c=c: mv_sum(c, v)
    t = interleaved_medians(thunks, repeats)
    rows = []
    for name, c in curv.items():
        info = solve_tol(pre, stacked, c).info
        steps = int(info["num_steps"])
        k2_steps = int(solve_k2(pre, stacked, c).info["num_steps"])
        t_curv = t[("curvature", "diag")] if name != "matrix-free" else 0.0
        t_solve = t[("solve", name)]
        marginal = (t[("k2", name)] - t[("k1", name)]) / (k2 - k1)
        rows.append(
            [
                name,
                f"{1e3 * t_curv:.1f}",
                f"{1e3 * t_solve:.1f}",
                f"{steps}{'' if bool(info['converged']) else ' (not conv.)'}",
                f"{1e3 * t_solve / max(steps, 1):.2f}",
                f"{1e3 * marginal:.2f}" if k2_steps == k2 else f"n/a (stops at {k2_steps})",
                f"{1e3 * t[('mv', name)]:.2f}",
                f"{marginal / t[('mv', name)]:.2f}" if k2_steps == k2 else "n/a",
            ]
        )
    header = [
        "curvature",
        "curvature ms",
        "solve ms",
        "CG steps",
        "solve/steps ms",
        "marginal ms/iter",
        "sum mat-vec ms",
        "iter/mat-vec",
    ]
    desc = (
        f"MLP {d_in}-{'-'.join(map(str, widths))}-10 (tanh), {num_params:,} params, "
        f"{num_tasks} tasks x {n_ex} examples; mats(damping={damping:g}, rtol={rtol:g}, "
        f"maxiter={maxiter}); marginal per iteration from maxiter {k1} vs {k2} at rtol=0"
    )
    return desc, format_table(header, rows, "<>>>>>>>")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI sizes (seconds)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument(
        "--params",
        type=float,
        default=None,
        help="parameters per model for part 1 (default 1e8; --quick 1e6)",
    )
    parser.add_argument(
        "--top-k",
        action="store_true",
        help="also time lax.top_k on the largest leaf (default: only with --quick)",
    )
    args = parser.parse_args(argv)
    n = int(args.params or (1e6 if args.quick else 1e8))

    print(machine_info())
    num, table, extra, gbs = bench_throughput(n, args.repeats, args.top_k or args.quick)
    print(
        f"\nElementwise merges: {NUM_MODELS} models x {num:,} float32 params "
        f"({NUM_MODELS * 4 * num / 1e9:.2f} GB stacked); compiled ahead of time, median of "
        "'runs' timed calls after one warm-up call\n"
        "GB/s = (bytes read + bytes written) / time; models moved = models' worth read + "
        "written (theta0 + models [+ Fishers] + output)"
    )
    print(table)
    print("\nTIES and DARE variants and the selection alone, timed in the same rounds")
    print(extra)
    desc, mats_table = bench_mats(args.quick, args.repeats)
    print(f"\nMaTS time split: {desc}")
    print(mats_table)
    return gbs


if __name__ == "__main__":
    main()
