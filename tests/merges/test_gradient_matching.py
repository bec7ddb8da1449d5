"""gradient_matching: the paper's formula in its argument forms, both solver paths, filters,
dtypes and errors. Dense-reference exactness on least-squares tasks is in test_exactness.py."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmerge import SOLVER_CG, SOLVER_CLOSED_FORM, absolute, gradient_matching
from jmerge.curvature import Diagonal, MatrixFree
from jmerge.tree import TreeMismatchError


def _problem(seed=0, num_models=3, dtype=np.float64):
    rng = np.random.default_rng(seed)
    shapes = {"a": (4,), "c": (2, 3)}
    pre = {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in shapes.items()}
    ft = [
        {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in shapes.items()}
        for _ in range(num_models)
    ]
    fish = [
        {k: jnp.asarray(rng.uniform(0.1, 2.0, size=s)) for k, s in shapes.items()}
        for _ in range(num_models)
    ]
    return pre, ft, fish


def _formula(pre, ft, hs, h0, alpha):
    """θ0 + Σ_t α_t (h0 + h_t)(θ_t − θ0) / (h0 + Σ_t α_t h_t), leafwise (diagonal curvature)."""
    out = {}
    for k in pre:
        p = np.asarray(pre[k], np.float64)
        h0k = h0[k] if isinstance(h0, dict) else h0
        h_bar = h0k + sum(a * np.asarray(h[k]) for a, h in zip(alpha, hs, strict=True))
        num = sum(
            a * (h0k + np.asarray(h[k])) * (np.asarray(t[k], np.float64) - p)
            for a, h, t in zip(alpha, hs, ft, strict=True)
        )
        out[k] = p + num / h_bar
    return out


def test_dataset_sizes_alpha_and_negation_match_formula():
    pre, ft, fish = _problem()
    sizes = np.array([10.0, 20.0, 5.0])
    for alpha in (np.array([0.5, 0.3, 0.9]), np.array([1.0, -0.4, 0.6])):  # α_t < 0: negation
        res = gradient_matching(
            pre, ft, fish, alpha=alpha, prior=absolute(2.0), dataset_sizes=sizes
        )
        assert int(res.info.solver) == SOLVER_CLOSED_FORM and bool(res.info.converged)
        hs = [{k: n * np.asarray(f[k]) for k in f} for n, f in zip(sizes, fish, strict=True)]
        chex.assert_trees_all_close(res.params, _formula(pre, ft, hs, 2.0, alpha), rtol=1e-10)
        # dataset_sizes scales the curvatures: the same as passing N_t F_t.
        prescaled = gradient_matching(pre, ft, hs, alpha=alpha, prior=absolute(2.0))
        chex.assert_trees_all_close(prescaled.params, res.params, rtol=1e-12)


def _diag_mv(v, d):
    return jax.tree_util.tree_map(jnp.multiply, d, v)


def test_cg_path_equals_closed_form():
    pre, ft, fish = _problem(seed=1)
    prior = {k: 0.5 + jnp.abs(v) for k, v in pre.items()}
    alpha = np.array([0.5, 0.8, 0.4])
    closed = gradient_matching(pre, ft, fish, alpha=alpha, prior=prior)
    assert int(closed.info.solver) == SOLVER_CLOSED_FORM
    chex.assert_trees_all_close(closed.params, _formula(pre, ft, fish, prior, alpha), rtol=1e-10)
    ops = [MatrixFree(_diag_mv, diag_tree=f, operands=(f,)) for f in fish]
    prior_op = MatrixFree(_diag_mv, operands=(prior,))  # no diagonal: unpreconditioned CG
    res = gradient_matching(pre, ft, ops, alpha=alpha, prior=prior_op, rtol=1e-12)
    assert int(res.info.solver) == SOLVER_CG and bool(res.info.converged)
    chex.assert_trees_all_close(res.params, closed.params, rtol=1e-9)


def test_stacked_inputs_and_diagonal_objects_agree():
    pre, ft, fish = _problem(seed=2)
    want = gradient_matching(pre, ft, fish, alpha=0.4, prior=0.1).params
    stack = lambda ts: jax.tree_util.tree_map(lambda *x: jnp.stack(x), *ts)
    got = gradient_matching(pre, stack(ft), stack(fish), alpha=0.4, prior=0.1).params
    chex.assert_trees_all_close(got, want, rtol=1e-12)
    got = gradient_matching(
        pre, ft, [Diagonal(f) for f in fish], alpha=0.4, prior=jnp.asarray(0.1)
    ).params
    chex.assert_trees_all_close(got, want, rtol=1e-12)


def test_exclude_and_entries_without_curvature_keep_task_arithmetic():
    pre, ft, fish = _problem(seed=3)
    fish = [{"a": f["a"].at[1].set(0.0), "c": f["c"].at[0, 0].set(0.0)} for f in fish]
    res = gradient_matching(pre, ft, fish, alpha=0.5)
    ta_c = pre["c"][0, 0] + 0.5 * sum(t["c"][0, 0] - pre["c"][0, 0] for t in ft)
    np.testing.assert_allclose(res.params["c"][0, 0], ta_c, rtol=1e-14)
    assert bool(res.info.converged)
    res = gradient_matching(pre, ft, fish, alpha=0.5, exclude="c")
    np.testing.assert_array_equal(res.params["c"], pre["c"])
    ta = pre["a"][1] + 0.5 * sum(t["a"][1] - pre["a"][1] for t in ft)
    np.testing.assert_allclose(res.params["a"][1], ta, rtol=1e-14)


def test_bf16_params():
    pre, ft, fish = _problem(seed=4, dtype=jnp.bfloat16)
    res = gradient_matching(pre, ft, fish, alpha=0.5, prior=absolute(1.0))
    chex.assert_trees_all_equal_dtypes(res.params, pre)
    want = _formula(pre, ft, fish, 1.0, [0.5] * 3)
    up = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), res.params)
    chex.assert_trees_all_close(up, want, rtol=2e-2, atol=2e-2)


def test_bad_arguments():
    pre, ft, fish = _problem(seed=5)
    with pytest.raises(ValueError, match=r"alpha must be a scalar or have one entry per model"):
        gradient_matching(pre, ft, fish, alpha=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"prior must be a finite non-negative"):
        gradient_matching(pre, ft, fish, prior=-1.0)
    neg = {"a": -jnp.ones(4), "c": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match=r"prior\['a'\] has 4 negative"):
        gradient_matching(pre, ft, fish, prior=neg)
    with pytest.raises(TreeMismatchError, match=r"prior\['c'\] has shape \(6,\)"):
        gradient_matching(pre, ft, fish, prior={"a": jnp.ones(4), "c": jnp.ones(6)})
    with pytest.raises(ValueError, match=r"dataset_sizes must be finite and non-negative"):
        gradient_matching(pre, ft, fish, dataset_sizes=[1.0, -2.0, 3.0])
    with pytest.raises(ValueError, match=r"Got 4 curvatures for 3"):
        gradient_matching(pre, ft, [*fish, fish[0]])
    with pytest.raises(ValueError, match=r"preconditioner must be 'jacobi' or None"):
        gradient_matching(pre, ft, fish, preconditioner="amg")


def _dense_mv(v, m):
    """M [a; vec(c)] for a dense symmetric M coupling the two leaves."""
    x = m @ jnp.concatenate([v["a"], v["c"].reshape(-1)])
    return {"a": x[:4], "c": x[4:].reshape(2, 3)}


def test_exclude_with_coupled_curvature_solves_the_shared_block_per_task():
    pre, ft, _ = _problem(seed=6)
    rng = np.random.default_rng(6)

    def spd(scale=1.0):
        x = rng.normal(size=(12, 10))
        return scale * x.T @ x / 12

    hs, h0, alpha = [spd() for _ in ft], spd(0.3), np.array([0.6, 0.3, 0.8])
    ops = [MatrixFree(_dense_mv, operands=(jnp.asarray(h),)) for h in hs]
    prior = MatrixFree(_dense_mv, operands=(jnp.asarray(h0),))
    res = gradient_matching(pre, ft, ops, alpha=alpha, prior=prior, exclude="c", rtol=1e-12)
    assert int(res.info.solver) == SOLVER_CG and bool(res.info.converged)
    np.testing.assert_array_equal(res.params["c"], pre["c"])
    # H̄_SS x_S = Σ_t α_t (H0 + H_t)_SS Δ_t,S: each task's head c held at its own value.
    h_bar = h0 + sum(a * h for a, h in zip(alpha, hs, strict=True))
    b = sum(
        a * (h0 + h)[:4, :4] @ (np.asarray(t["a"]) - np.asarray(pre["a"]))
        for a, h, t in zip(alpha, hs, ft, strict=True)
    )
    x_a = np.linalg.solve(h_bar[:4, :4], b)
    np.testing.assert_allclose(res.params["a"], np.asarray(pre["a"]) + x_a, rtol=1e-9)
