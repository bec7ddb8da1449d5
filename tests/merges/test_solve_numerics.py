"""Numerics of the shared solve path of mats and gradient_matching (issue: numerics).

* the merge does not depend on the curvatures' overall scale c ∈ [1e-20, 1e20];
* ``info.converged`` is True exactly when the true residual of the returned params meets the
  tolerance, on ill-conditioned systems in float32 and bfloat16 (matrix-free and K-FAC);
* eager = jit (arguments) = jit (closure) = vmap, and gradients in α through the solve equal
  finite differences;
* excluded leaves are per task (one-model merges return the model; dense two-task reference);
* the damping anchor (pretrained, init, pytree) against a dense solve.

References are dense float64 NumPy solves.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
from jmerge import SOLVER_CG, absolute, gradient_matching, mats
from jmerge.curvature import KFAC, Diagonal, MatrixFree
from tests.helpers import (
    dense_mv,
    leaf_selector,
    problem,
    ravel,
    scale_tree,
    spd,
    unravel,
)

SCALES = [1e-20, 1e-10, 1.0, 1e10, 1e20]


def _dense_ops(mats_np, dtype):
    return [MatrixFree(dense_mv, operands=(jnp.asarray(m, dtype),)) for m in mats_np]


# --------------------------------------------------------------------------------------------
# Scale invariance


@pytest.mark.parametrize("c", SCALES)
def test_mats_diagonal_scale_invariant_and_not_stuck_at_init(c):
    pre, ft, fish = problem(seed=0, dtype=np.float32, fisher_range=(1e-9, 3e-9))
    fish = [jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), f) for f in fish]
    ref = mats(pre, ft, fish, damping=0.1)
    out = mats(pre, ft, [scale_tree(f, c) for f in fish], damping=0.1)
    assert bool(out.info.converged), out.info
    chex.assert_trees_all_close(out.params, ref.params, rtol=2e-5, atol=1e-6)
    init = jmerge.task_arithmetic(pre, ft, 1.0)
    assert not np.allclose(ravel(out.params), ravel(init), atol=1e-3)


@pytest.mark.parametrize("c", SCALES)
def test_matrix_free_relative_damping_and_prior_scale_invariant(c):
    pre, ft, _ = problem(seed=1, dtype=np.float32)
    n = ravel(pre).size
    ms = [spd(n, 1e2, seed=s)[0] * 1e-6 for s in (1, 2)]  # a Fisher-like small scale
    ops = _dense_ops([m * c for m in ms], jnp.float32)
    ref_ops = _dense_ops(ms, jnp.float32)
    for merge, kw in ((mats, dict(damping=0.05)), (gradient_matching, dict(prior=0.05))):
        ref = merge(pre, ft, ref_ops, rtol=1e-5, **kw)
        out = merge(pre, ft, ops, rtol=1e-5, **kw)
        assert int(out.info.solver) == SOLVER_CG
        assert bool(out.info.converged) and bool(ref.info.converged), (merge, out.info)
        chex.assert_trees_all_close(out.params, ref.params, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("c", SCALES)
def test_gradient_matching_closed_form_scale_invariant(c):
    pre, ft, fish = problem(seed=2, dtype=np.float32, fisher_range=(1e-9, 3e-9))
    ref = gradient_matching(pre, ft, fish, alpha=0.7, prior=0.2)
    out = gradient_matching(pre, ft, [scale_tree(f, c) for f in fish], alpha=0.7, prior=0.2)
    assert bool(out.info.converged)
    chex.assert_trees_all_close(out.params, ref.params, rtol=2e-5, atol=1e-6)


def test_absolute_damping_is_not_relative():
    pre, ft, fish = problem(seed=3)
    a = mats(pre, ft, fish, damping=absolute(0.5)).params
    b = mats(pre, ft, [scale_tree(f, 10.0) for f in fish], damping=absolute(0.5)).params
    assert not np.allclose(ravel(a), ravel(b))


# --------------------------------------------------------------------------------------------
# converged tells the truth


def _true_residual(merge, pre, ft, ms, theta, init, alpha):
    """‖Σ_k K_k (a_k − θ)‖ and ‖Σ_k K_k (a_k − θ_init)‖ in float64 (no damping, no prior)."""
    th, th0 = ravel(theta), ravel(init)
    if merge is mats:
        r = sum(m @ (ravel(t) - th) for m, t in zip(ms, ft, strict=True))
        b = sum(m @ (ravel(t) - th0) for m, t in zip(ms, ft, strict=True))
    else:
        r = sum(a * m @ (ravel(t) - th) for a, m, t in zip(alpha, ms, ft, strict=True))
        b = sum(a * m @ (ravel(t) - th0) for a, m, t in zip(alpha, ms, ft, strict=True))
    return np.linalg.norm(r), np.linalg.norm(b)


@pytest.mark.parametrize("merge", [mats, gradient_matching])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kappa", [1e2, 1e4, 1e6, 1e8])
def test_converged_iff_true_residual_meets_tolerance(merge, dtype, kappa):
    pre, ft, _ = problem(seed=4, dtype=dtype)
    n = ravel(pre).size
    ms = [spd(n, kappa, seed=s)[0] for s in (5, 6)]
    ops = _dense_ops(ms, dtype)
    rtol = 1e-3 if dtype == jnp.float32 else 1e-2
    kw = dict(alpha=[0.5, 0.5]) if merge is gradient_matching else {}
    res = merge(pre, ft, ops, rtol=rtol, maxiter=60, **kw)
    init = jmerge.task_arithmetic(pre, ft, kw.get("alpha", 1.0))
    ms_used = [np.asarray(jnp.asarray(m, dtype), np.float64) for m in ms]
    true, b = _true_residual(merge, pre, ft, ms_used, res.params, init, kw.get("alpha"))
    thr = rtol * b
    eps = float(jnp.finfo(dtype).eps)
    absm = sum(np.abs(m) for m in ms_used)
    bound = 4 * n * eps * (b + np.linalg.norm(absm @ np.abs(ravel(res.params))))
    assert abs(float(res.info.residual_norm) - true) <= bound
    if bool(res.info.converged):
        assert true <= thr + bound
    else:
        assert true >= thr - bound
        assert int(res.info.status) != 0


@pytest.mark.parametrize("kappa", [1e2, 1e6])
def test_kfac_info_is_honest(kappa):
    rng = np.random.default_rng(10)
    pre = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.zeros(3, jnp.float32)}
    ft = [
        jax.tree_util.tree_map(lambda x: x + jnp.asarray(rng.normal(size=x.shape), x.dtype), pre)
        for _ in range(2)
    ]
    facs = []
    for s in (11, 12):
        a, _ = spd(4, kappa, seed=s)
        b, _ = spd(3, 10.0, seed=s + 1)
        facs.append((a, b))
    ops = [
        KFAC({"['w']": (jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))}, rest=1.0)
        for a, b in facs
    ]
    res = mats(pre, ft, ops, rtol=1e-4, maxiter=40)
    # Dense reference: vec(A W B) = (A ⊗ B) vec(W) for row-major vec; the bias has C = I.
    ms = [
        np.block([[np.eye(3), np.zeros((3, 12))], [np.zeros((12, 3)), np.kron(a, b)]])
        for a, b in facs
    ]
    true, bnorm = _true_residual(
        mats, pre, ft, ms, res.params, jmerge.task_arithmetic(pre, ft), None
    )
    eps = float(jnp.finfo(jnp.float32).eps)
    bound = (
        60
        * eps
        * (
            bnorm
            + sum(np.linalg.norm(np.abs(m), 2) for m in ms) * np.linalg.norm(ravel(res.params))
        )
    )
    assert (
        bool(res.info.converged) == (true <= 1e-4 * bnorm + bound)
        or abs(true - 1e-4 * bnorm) <= bound
    )


# --------------------------------------------------------------------------------------------
# jit / vmap / grad


def _assert_infos_close(a, b):
    assert int(a.solver) == int(b.solver) and int(a.status) == int(b.status)
    assert int(a.num_steps) == int(b.num_steps)
    np.testing.assert_allclose(a.objective, b.objective, rtol=1e-8)


@pytest.mark.parametrize("merge", [mats, gradient_matching])
def test_four_modes_agree(merge):
    pre, ft, _ = problem(seed=13)
    n = ravel(pre).size
    ms = [spd(n, 10.0, seed=s)[0] for s in (14, 15)]
    ops = _dense_ops(ms, jnp.float64)
    if merge is mats:
        call = lambda p, f, o, a: mats(p, f, o, weights=a, damping=0.1, rtol=1e-10)
        sweep = jnp.asarray([[1.0, 2.0], [0.5, 0.5], [3.0, 1.0]])
    else:
        call = lambda p, f, o, a: gradient_matching(p, f, o, alpha=a, prior=0.1, rtol=1e-10)
        sweep = jnp.asarray([[0.3, 0.6], [1.0, 1.0], [0.5, 0.2]])
    eager = [call(pre, ft, ops, a) for a in sweep]
    jit_args = jax.jit(call)
    jit_closed = jax.jit(lambda a: call(pre, ft, ops, a))
    vmapped = jax.jit(jax.vmap(lambda a: call(pre, ft, ops, a)))(sweep)
    for i, (a, e) in enumerate(zip(sweep, eager, strict=True)):
        for got in (jit_args(pre, ft, ops, a), jit_closed(a)):
            chex.assert_trees_all_close(got.params, e.params, rtol=1e-8, atol=1e-10)
            _assert_infos_close(got.info, e.info)
        v = jax.tree_util.tree_map(lambda x, i=i: x[i], vmapped)
        chex.assert_trees_all_close(v.params, e.params, rtol=1e-6, atol=1e-8)
        assert bool(v.info.converged)


def test_grad_in_alpha_through_the_solve_matches_finite_differences():
    pre, ft, _ = problem(seed=16)
    n = ravel(pre).size
    ms = [spd(n, 10.0, seed=s)[0] for s in (17, 18)]
    ops = _dense_ops(ms, jnp.float64)
    probe = {k: jnp.asarray(np.random.default_rng(19).normal(size=v.shape)) for k, v in pre.items()}

    def f_gm(alpha):
        p = gradient_matching(pre, ft, ops, alpha=alpha, prior=0.3, rtol=1e-12).params
        return sum(jnp.vdot(p[k], probe[k]) for k in p)

    def f_mats(w):
        p = mats(pre, ft, ops, weights=w, damping=0.3, rtol=1e-12).params
        return sum(jnp.vdot(p[k], probe[k]) for k in p)

    x = jnp.asarray([0.4, 0.9])
    for f in (f_gm, f_mats):
        g = jax.grad(f)(x)
        h = 1e-5
        fd = [(f(x.at[i].add(h)) - f(x.at[i].add(-h))) / (2 * h) for i in range(2)]
        np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Excluded leaves are per task


def _coupled_problem(seed):
    pre, ft, _ = problem(seed=seed)
    n = ravel(pre).size
    ms = [spd(n, 20.0, seed=seed + s)[0] for s in (1, 2)]
    return pre, ft, ms


@pytest.mark.parametrize("merge", [mats, gradient_matching])
def test_one_model_merge_returns_the_model_with_coupled_curvature(merge):
    pre, ft, ms = _coupled_problem(20)
    ops = _dense_ops(ms[:1], jnp.float64)
    res = merge(pre, ft[:1], ops, exclude="c", rtol=1e-12)
    assert bool(res.info.converged)
    np.testing.assert_allclose(res.params["a"], ft[0]["a"], rtol=1e-10)
    np.testing.assert_array_equal(res.params["c"], pre["c"])


def test_one_model_merge_with_kfac_block_and_head():
    rng = np.random.default_rng(21)
    pre = {
        "body": jnp.asarray(rng.normal(size=(4, 3))),
        "head": jnp.asarray(rng.normal(size=(3, 2))),
    }
    ft = {k: v + jnp.asarray(rng.normal(size=v.shape)) for k, v in pre.items()}
    op = KFAC({"['body']": (jnp.asarray(spd(4, 5.0, 1)[0]), jnp.asarray(spd(3, 5.0, 2)[0]))})
    for merge in (mats, gradient_matching):
        res = merge(pre, [ft], [op], exclude="head", rtol=1e-12)
        np.testing.assert_allclose(res.params["body"], ft["body"], rtol=1e-10)
        np.testing.assert_array_equal(res.params["head"], pre["head"])


def test_two_task_merge_matches_dense_per_task_reference():
    pre, ft, ms = _coupled_problem(22)
    w = np.array([0.7, 1.6])
    res = mats(pre, ft, _dense_ops(ms, jnp.float64), weights=w, exclude="c", rtol=1e-12)
    s = leaf_selector(pre, {"a"})
    # Σ_t w_t (C_t)_SS (θ_S − θ_t,S) = 0: the excluded block E takes no part.
    lhs = sum(wt * m[np.ix_(s, s)] for wt, m in zip(w, ms, strict=True))
    rhs = sum(wt * m[np.ix_(s, s)] @ ravel(t)[s] for wt, m, t in zip(w, ms, ft, strict=True))
    want = np.linalg.solve(lhs, rhs)
    np.testing.assert_allclose(ravel(res.params)[s], want, rtol=1e-9)
    np.testing.assert_array_equal(res.params["c"], pre["c"])


# --------------------------------------------------------------------------------------------
# Damping anchor


@pytest.mark.parametrize("anchor", ["pretrained", "init", "tree"])
def test_damping_anchor_against_dense_solve(anchor):
    pre, ft, ms = _coupled_problem(23)
    delta = 0.4
    init = jmerge.task_arithmetic(pre, ft, 0.5)
    tree = {k: jnp.full_like(v, 0.25) for k, v in pre.items()}
    a = {"pretrained": pre, "init": init, "tree": tree}[anchor]
    arg = tree if anchor == "tree" else anchor
    res = mats(
        pre,
        ft,
        _dense_ops(ms, jnp.float64),
        init_alpha=0.5,
        damping=absolute(delta),
        damping_anchor=arg,
        rtol=1e-12,
    )
    n = ravel(pre).size
    lhs = sum(ms) + delta * np.eye(n)
    rhs = sum(m @ ravel(t) for m, t in zip(ms, ft, strict=True)) + delta * ravel(a)
    want = unravel(np.linalg.solve(lhs, rhs), pre)
    chex.assert_trees_all_close(res.params, want, rtol=1e-9, atol=1e-11)


def test_damping_anchor_diagonal_closed_form():
    pre, ft, fish = problem(seed=24)
    tree = {k: jnp.full_like(v, -1.0) for k, v in pre.items()}
    res = mats(pre, ft, [Diagonal(f) for f in fish], damping=absolute(0.3), damping_anchor=tree)
    for k in pre:
        num = sum(np.asarray(f[k]) * np.asarray(t[k]) for f, t in zip(fish, ft, strict=True))
        den = sum(np.asarray(f[k]) for f in fish)
        np.testing.assert_allclose(res.params[k], (num - 0.3) / (den + 0.3), rtol=1e-12)
