"""mats: argument forms, weights and damping, objective, leaf filters, dtypes, inits, errors.

The exactness of the solve against dense references is in test_exactness.py, the numerics
(scale, conditioning, tracing, per-task exclusion, anchors) in test_solve_numerics.py.
Problems here are small diagonal ones with closed-form answers, so that each test compiles
little.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmerge import absolute, mats
from jmerge.curvature import Diagonal, MatrixFree
from jmerge.solvers import CONVERGED, MAXITER
from jmerge.tree import NonFiniteError, TreeMismatchError
from tests.helpers import diag_merge as _diag_merge
from tests.helpers import diag_objective as _objective
from tests.helpers import problem as _problem


def test_curvature_forms_agree_and_equal_closed_form():
    pre, ft, fish = _problem()
    w = np.array([0.5, 2.0])
    want = _diag_merge(pre, ft, fish, w)
    stacked_fish = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *fish)
    stacked_ft = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *ft)
    forms = {
        "list of pytrees": (ft, fish),
        "tuple of Diagonal": (ft, tuple(Diagonal(f) for f in fish)),
        "stacked diagonals": (ft, stacked_fish),
        "stacked models": (stacked_ft, fish),
    }
    for name, (models, curv) in forms.items():
        res = mats(pre, models, curv, weights=w, rtol=1e-12)
        assert bool(res.info["converged"]), name
        chex.assert_trees_all_close(res.params, want, rtol=1e-10, atol=1e-12, custom_message=name)
    # J(θ_init) and J(θ*) as defined in the docstring.
    ta = {k: pre[k] + sum(t[k] - pre[k] for t in ft) for k in pre}
    np.testing.assert_allclose(res.info["objective_init"], _objective(ta, pre, ft, fish, w))
    np.testing.assert_allclose(res.info["objective"], _objective(want, pre, ft, fish, w))
    assert res.info["objective"] < res.info["objective_init"]


def test_weight_scale_and_damping():
    pre, ft, fish = _problem(seed=1)
    w = np.array([1.0, 3.0])
    base = mats(pre, ft, fish, weights=w, rtol=1e-12).params
    # Without damping the scale of Σ w_t C_t does not matter ...
    scaled = mats(pre, ft, fish, weights=10 * w, rtol=1e-12).params
    chex.assert_trees_all_close(scaled, base, rtol=1e-10)
    # ... with damping δ only δ relative to it does; δ pulls towards θ0.
    res = mats(pre, ft, fish, weights=w, damping=absolute(0.7), rtol=1e-12)
    want = _diag_merge(pre, ft, fish, w, damping=0.7)
    chex.assert_trees_all_close(res.params, want, rtol=1e-10)
    res10 = mats(pre, ft, fish, weights=10 * w, damping=absolute(7.0), rtol=1e-12)
    chex.assert_trees_all_close(res10.params, want, rtol=1e-10)
    np.testing.assert_allclose(
        res.info["objective"], _objective(want, pre, ft, fish, w, damping=0.7), rtol=1e-10
    )
    # A relative damping is δ = damping · mean diag(Σ_t w_t F_t): the same merge.
    s = np.mean(
        np.concatenate(
            [np.ravel(sum(wt * f[k] for wt, f in zip(w, fish, strict=True))) for k in pre]
        )
    )
    rel = mats(pre, ft, fish, weights=w, damping=0.7 / s, rtol=1e-12)
    chex.assert_trees_all_close(rel.params, want, rtol=1e-10)


def test_scalar_and_default_weights():
    pre, ft, fish = _problem(seed=2)
    res = mats(pre, ft, fish, rtol=1e-12)  # weights default to 1
    chex.assert_trees_all_close(res.params, _diag_merge(pre, ft, fish, [1.0, 1.0]), rtol=1e-10)


def _lin_mv(v, xa, xc):
    """(Xᵀ X) v for y = X_a a + X_c vec(c), via the linear model's Jacobian."""
    f = lambda p: xa @ p["a"] + xc @ p["c"].reshape(-1)
    z, vjp = jax.vjp(f, v)
    return vjp(z)[0]


@pytest.mark.parametrize("filters", [dict(exclude=r"\['c'\]"), dict(include="a")])
def test_excluded_leaves_are_pretrained_and_held_per_task(filters):
    rng = np.random.default_rng(3)
    pre, ft, _ = _problem(seed=3)
    xs = [(rng.normal(size=(10, 3)), rng.normal(size=(10, 6))) for _ in ft]
    ops = [MatrixFree(_lin_mv, operands=(jnp.asarray(xa), jnp.asarray(xc))) for xa, xc in xs]
    res = mats(pre, ft, ops, init="average", maxiter=50, rtol=1e-12, **filters)
    assert bool(res.info["converged"])
    np.testing.assert_array_equal(res.params["c"], pre["c"])
    # a minimises Σ_t ‖X_a (a − a_t)‖²: in task t's quadratic c is held at c_t.
    xa = np.concatenate([x[0] for x in xs])
    y = np.concatenate([x[0] @ np.asarray(t["a"]) for x, t in zip(xs, ft, strict=True)])
    want = np.linalg.lstsq(xa, y, rcond=None)[0]
    np.testing.assert_allclose(res.params["a"], want, rtol=1e-8)


def test_bf16_params_computed_in_float32_and_cast_back():
    pre, ft, fish = _problem(seed=4, dtype=jnp.bfloat16)
    res = mats(pre, ft, fish, rtol=1e-6)
    chex.assert_trees_all_equal_dtypes(res.params, pre)
    up = lambda t: jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), t)
    want = _diag_merge(up(pre), [up(t) for t in ft], fish, [1.0, 1.0])
    chex.assert_trees_all_close(up(res.params), want, rtol=2e-2, atol=2e-2)
    assert res.info["objective"].dtype == jnp.float32


def test_inits_at_maxiter_zero():
    pre, ft, fish = _problem(seed=5)
    w = np.array([1.0, 3.0])
    res = mats(pre, ft, fish, weights=w, init="average", maxiter=0)
    want = {k: (ft[0][k] + 3 * ft[1][k]) / 4 for k in pre}
    chex.assert_trees_all_close(res.params, want, rtol=1e-14)
    assert int(res.info["num_steps"]) == 0 and not bool(res.info["converged"])
    assert int(res.info["status"]) == MAXITER
    # init="fisher" is the exact (damped) diagonal solution: nothing left to do.
    res = mats(pre, ft, fish, weights=w, damping=absolute(0.3), init="fisher", maxiter=0)
    chex.assert_trees_all_close(res.params, _diag_merge(pre, ft, fish, w, 0.3), rtol=1e-12)
    assert float(res.info["residual_norm"]) < 1e-12
    # A pytree init; an excluded leaf still comes from pretrained.
    init = {k: jnp.full_like(v, 2.0) for k, v in pre.items()}
    res = mats(pre, ft, fish, init=init, exclude="c", maxiter=0)
    np.testing.assert_array_equal(res.params["a"], init["a"])
    np.testing.assert_array_equal(res.params["c"], pre["c"])


def test_zero_rhs_converges_immediately():
    pre, _, fish = _problem(seed=6)
    res = mats(pre, [pre, pre], fish, init="pretrained", maxiter=0)
    assert bool(res.info["converged"]) and int(res.info["status"]) == CONVERGED
    chex.assert_trees_all_close(res.params, pre)


def test_bad_arguments():
    pre, ft, fish = _problem(seed=7)
    with pytest.raises(ValueError, match=r"Got 1 curvatures for 2"):
        mats(pre, ft, fish[:1])
    with pytest.raises(TypeError, match=r"single Diagonal"):
        mats(pre, ft, Diagonal(fish[0]))
    with pytest.raises(TypeError, match=r"curvatures\[1\] is None"):
        mats(pre, ft, [fish[0], None])
    neg = {"a": fish[1]["a"], "c": fish[1]["c"].at[1, 2].set(-1.0)}
    with pytest.raises(ValueError, match=r"curvatures\[1\]\['c'\] has 1 negative"):
        mats(pre, ft, [fish[0], neg])
    nan = {"a": fish[1]["a"].at[0].set(jnp.nan), "c": fish[1]["c"]}
    with pytest.raises(NonFiniteError, match=r"curvatures\[1\]\['a'\]"):
        mats(pre, ft, [fish[0], Diagonal(nan)])
    bad = {"a": fish[1]["a"], "c": fish[1]["c"].T}
    with pytest.raises(TreeMismatchError, match=r"curvatures\[1\]\['c'\] has shape \(3, 2\)"):
        mats(pre, ft, [fish[0], bad])
    three = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *fish, fish[0])
    with pytest.raises(TreeMismatchError, match=r"leading \(model\) axis is \[3\], expected 2"):
        mats(pre, ft, three)
    with pytest.raises(ValueError, match=r"weights must be finite and non-negative"):
        mats(pre, ft, fish, weights=[1.0, -1.0])
    with pytest.raises(ValueError, match=r"weights are all zero"):
        mats(pre, ft, fish, weights=0.0)
    with pytest.raises(ValueError, match=r"weights must be a scalar or have one entry per model"):
        mats(pre, ft, fish, weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"damping must be finite and non-negative"):
        mats(pre, ft, fish, damping=-1.0)
    with pytest.raises(ValueError, match=r"Unknown init 'mean'"):
        mats(pre, ft, fish, init="mean")
    with pytest.raises(TreeMismatchError, match=r"init\['c'\]"):
        mats(pre, ft, fish, init={"a": pre["a"], "c": pre["c"].T})
    with pytest.raises(ValueError, match=r"init_alpha must be a scalar or have one entry"):
        mats(pre, ft, fish, init_alpha=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"preconditioner must be 'jacobi' or None"):
        mats(pre, ft, fish, preconditioner="ilu")
    with pytest.raises(TreeMismatchError, match=r"finetuned\[1\]"):
        mats(pre, [ft[0], {"a": ft[1]["a"]}], fish)
