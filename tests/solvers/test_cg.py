"""Tests of jmerge.solvers.cg against numpy.linalg.solve on SPD systems laid over pytrees."""

import functools

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.flatten_util import ravel_pytree

from jmerge.curvature.operators import (
    Damped,
    Diagonal,
    MatrixFree,
    Scaled,
    jacobi_preconditioner,
)
from jmerge.solvers import CONVERGED, INDEFINITE, MAXITER, NONFINITE, CGResult, cg
from jmerge.solvers.cg import _tree_vdot
from jmerge.tree import TreeMismatchError

SHAPES = {"a": (3, 4), "b": (5,), "c": {"d": (2, 2, 2)}}  # n = 25


def spd(n: int, cond: float, seed: int = 0) -> np.ndarray:
    """A random SPD matrix with eigenvalues log-spaced in [1, cond]."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * np.logspace(0, np.log10(cond), n)) @ q.T


def tree_of(shapes, dtypes, seed=1):
    """A random pytree with leaves of the given shapes; dtypes: one dtype or a tree of them."""
    rng = np.random.default_rng(seed)
    if not isinstance(dtypes, dict):
        dtypes = jax.tree.map(lambda _: dtypes, shapes, is_leaf=lambda s: isinstance(s, tuple))
    return jax.tree.map(
        lambda s, dt: jnp.asarray(rng.normal(size=s), dt),
        shapes,
        dtypes,
        is_leaf=lambda s: isinstance(s, tuple),
    )


def _dense_mv(v, a):
    """v ↦ A ravel(v), unravelled to v's structure and dtypes (A applied in >= float32)."""
    flat, unravel = ravel_pytree(v)
    dt = jnp.promote_types(flat.dtype, jnp.float32)
    return unravel(a.astype(dt) @ flat.astype(dt))


def dense_op(a: np.ndarray, diag_tree=None) -> MatrixFree:
    """A dense SPD matrix as an operator over pytrees; A is a traced child, so every test with
    the same shapes and dtypes shares one compiled solve."""
    return MatrixFree(_dense_mv, diag_tree=diag_tree, operands=(jnp.asarray(a),))


def dense_matvec(a: np.ndarray, like):
    """A plain closure v ↦ A v (for the tests of callables)."""
    return functools.partial(_dense_mv, a=jnp.asarray(a))


# One jitted solve shared by the tests (pass rtol and atol always: they are traced; maxiter is
# static).
cg_jit = jax.jit(cg, static_argnames="maxiter")


def reference(a, b):
    flat, unravel = ravel_pytree(b)
    return np.linalg.solve(a, np.asarray(flat, np.float64)), unravel


def rel_err(x, x_ref):
    flat = np.asarray(ravel_pytree(jax.tree.map(lambda t: t.astype(jnp.float64), x))[0])
    return np.linalg.norm(flat - x_ref) / np.linalg.norm(x_ref)


@pytest.mark.parametrize(
    "dtype, cond, rtol",
    [
        (jnp.float64, 1.0, 1e-10),
        (jnp.float64, 1e2, 1e-10),
        (jnp.float64, 1e5, 1e-10),
        (jnp.float32, 1.0, 1e-5),
        (jnp.float32, 1e3, 1e-5),
        (jnp.bfloat16, 1.0, 1e-3),
        (jnp.bfloat16, 10.0, 1e-3),
    ],
)
def test_dense_spd_matches_numpy(dtype, cond, rtol):
    b = tree_of(SHAPES, dtype)
    a = spd(25, cond)
    x_ref, _ = reference(a, b)
    res = cg_jit(dense_op(a), b, rtol=rtol, atol=0.0)
    assert isinstance(res, CGResult)
    chex.assert_trees_all_equal_shapes_and_dtypes(res.x, b)
    chex.assert_tree_all_finite(res.x)
    eps = float(jnp.finfo(dtype).eps)
    assert rel_err(res.x, x_ref) < 10 * cond * max(rtol, eps)
    if dtype != jnp.bfloat16:
        assert bool(res.converged) and int(res.status) == CONVERGED
        assert int(res.num_steps) > 0
    # residual_norm is the true residual of the returned x, up to the rounding of A x in the
    # leaves' dtype (the mat-vec runs in b's dtype).
    flat_b = np.asarray(ravel_pytree(b)[0], np.float64)
    flat_x = np.asarray(ravel_pytree(res.x)[0], np.float64)
    true_res = np.linalg.norm(flat_b - a @ flat_x)
    slack = 2 * eps * np.sqrt(25) * np.linalg.norm(np.abs(a) @ np.abs(flat_x))
    np.testing.assert_allclose(float(res.residual_norm), true_res, rtol=1e-3, atol=slack)


class CGVariantsTest(chex.TestCase):
    """The same solves jitted and not jitted (a plain closure as the mat-vec)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_mixed_dtype_leaves(self):
        dtypes = {"a": jnp.float32, "b": jnp.float64, "c": {"d": jnp.bfloat16}}
        b = tree_of(SHAPES, dtypes)
        a = spd(25, 10.0)
        x_ref, _ = reference(a, b)
        res = self.variant(functools.partial(cg, dense_matvec(a, b), rtol=1e-6))(b)
        chex.assert_trees_all_equal_shapes_and_dtypes(res.x, b)
        self.assertLess(rel_err(res.x, x_ref), 0.05)

    @chex.variants(with_jit=True, without_jit=True)
    def test_operator_argument_and_warm_start(self):
        d = tree_of(SHAPES, jnp.float64, seed=3)
        op = Diagonal(jax.tree.map(lambda t: 1.0 + t**2, d))
        b = tree_of(SHAPES, jnp.float64)
        x_exact = jax.tree.map(lambda bi, di: bi / di, b, op.tree)
        res, cold = self.variant(
            lambda op, b, x0: (cg(op, b, x0, rtol=1e-10), cg(op, b, rtol=1e-10))
        )(op, b, x_exact)
        self.assertEqual(int(res.num_steps), 0)
        self.assertTrue(bool(res.converged))
        chex.assert_trees_all_close(res.x, x_exact)
        self.assertGreater(int(cold.num_steps), 0)
        chex.assert_trees_all_close(cold.x, x_exact, rtol=1e-8)


def test_bf16_state_is_accumulated_in_float32():
    b = tree_of(SHAPES, jnp.bfloat16)
    a = spd(25, 5.0)
    jaxpr = jax.make_jaxpr(lambda b: cg(dense_matvec(a, b), b))(b)
    text = str(jaxpr)
    assert "while" in text
    # the loop carry holds float32 vectors for every bf16 leaf
    (eqn,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "custom_linear_solve"]
    solve_jaxpr = eqn.params["jaxprs"].solve
    (loop,) = [e for e in solve_jaxpr.jaxpr.eqns if e.primitive.name == "while"]
    carry = [v.aval for v in loop.outvars if v.aval.shape]
    assert carry and all(av.dtype == jnp.float32 for av in carry)


@settings(deadline=None, max_examples=4)
@given(
    shapes=st.lists(
        st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4
    ),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_hypothesis(shapes, seed):
    tree = {f"leaf{i}": s for i, s in enumerate(shapes)}
    b = tree_of(tree, jnp.float64, seed=seed)
    n = ravel_pytree(b)[0].size
    a = spd(n, 100.0, seed=seed)
    x_ref, _ = reference(a, b)
    res = cg_jit(dense_op(a), b, rtol=1e-10, atol=0.0)
    assert int(res.status) == CONVERGED
    assert int(res.num_steps) <= 10 * n
    assert rel_err(res.x, x_ref) < 1e-6


def test_maxiter_too_small_reports_non_convergence():
    b = tree_of(SHAPES, jnp.float64)
    res = cg_jit(dense_op(spd(25, 1e4)), b, rtol=1e-6, atol=0.0, maxiter=3)
    assert not bool(res.converged)
    assert int(res.status) == MAXITER
    assert int(res.num_steps) == 3
    chex.assert_tree_all_finite(res.x)


def test_default_maxiter_is_ten_n():
    # With rtol = atol = 0 only an exactly zero residual stops CG; rounding on this
    # ill-conditioned system keeps it nonzero, so the default maxiter 10·n = 40 is reached.
    d = {"a": jnp.array([1.0, 1e3, 1e5, 3e7])}
    res = cg(Diagonal(d), {"a": jnp.ones(4)}, rtol=0.0)
    assert int(res.num_steps) == 40
    assert int(res.status) == MAXITER


def test_indefinite_operator_reports_breakdown_and_keeps_finite_x():
    d = {"a": jnp.array([1.0, 2.0, 3.0, -5.0]), "b": jnp.array([[4.0, 0.5], [1.5, -0.1]])}
    b = jax.tree.map(jnp.ones_like, d)
    res = jax.jit(lambda op, b: cg(op, b))(Diagonal(d), b)
    assert int(res.status) == INDEFINITE
    assert not bool(res.converged)
    chex.assert_tree_all_finite(res.x)
    # the reported residual is that of the returned x
    r = jax.tree.map(lambda bi, di, xi: bi - di * xi, b, d, res.x)
    np.testing.assert_allclose(float(res.residual_norm), float(jnp.sqrt(_tree_vdot(r, r))))


def test_nonfinite_matvec_reports_status_3():
    b = {"a": jnp.ones(3)}
    op = Diagonal({"a": jnp.array([1.0, jnp.inf, 2.0])})
    res = cg_jit(op, b, jax.tree.map(jnp.zeros_like, b), rtol=1e-6, atol=0.0)
    assert int(res.status) == NONFINITE
    chex.assert_tree_all_finite(res.x)


def test_zero_rhs_returns_zero_without_iterating():
    b = {"a": jnp.zeros(3)}
    x0 = jax.tree.map(jnp.ones_like, b)
    res = cg_jit(Diagonal({"a": jnp.array([1.0, 2.0, 3.0])}), b, x0, rtol=1e-6, atol=0.0)
    assert int(res.num_steps) == 0 and bool(res.converged)
    chex.assert_trees_all_close(res.x, b)


def test_jacobi_preconditioning_takes_fewer_steps():
    n = 25
    rng = np.random.default_rng(0)
    scale = np.logspace(-3, 3, n)
    rng.shuffle(scale)
    a = np.sqrt(scale)[:, None] * spd(n, 5.0) * np.sqrt(scale)[None, :]
    b = tree_of(SHAPES, jnp.float64)
    _, unravel = ravel_pytree(b)
    op = dense_op(a, diag_tree=unravel(jnp.asarray(np.diag(a))))
    plain = cg_jit(op, b, rtol=1e-8, atol=0.0)
    pre = cg_jit(op, b, rtol=1e-8, atol=0.0, preconditioner=jacobi_preconditioner(op))
    assert bool(pre.converged)
    assert int(pre.num_steps) < int(plain.num_steps)
    x_ref, _ = reference(a, b)
    assert rel_err(pre.x, x_ref) < 1e-5


def test_atol_stops_early():
    b = tree_of(SHAPES, jnp.float64)
    op = dense_op(spd(25, 1e3))
    loose = cg_jit(op, b, rtol=0.0, atol=1e-1)
    tight = cg_jit(op, b, rtol=0.0, atol=1e-9)
    assert bool(loose.converged) and bool(tight.converged)
    assert int(loose.num_steps) < int(tight.num_steps)
    assert float(loose.residual_norm) <= 1e-1 * 1.01


def test_vmap_over_rhs():
    d = {"a": jnp.array([1.0, 2.0, 3.0]), "b": jnp.array([[4.0, 5.0]])}
    bs = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((2, 1, 2))}
    x_exact = jax.tree.map(lambda b, d: b / d, bs, d)
    x0s = jax.tree.map(lambda x: x.at[1].set(0.0), x_exact)  # exact warm start, then cold
    res = jax.jit(jax.vmap(lambda b, x0: cg(Diagonal(d), b, x0, rtol=1e-12)))(bs, x0s)
    chex.assert_trees_all_close(res.x, x_exact)
    assert res.num_steps.shape == (2,)
    assert int(res.num_steps[0]) == 0 and int(res.num_steps[1]) > 0


def test_warm_start_gets_no_gradient():
    d = {"a": jnp.array([1.0, 2.0, 3.0])}
    b = {"a": jnp.ones(3)}
    g = jax.jit(jax.grad(lambda x0: jnp.sum(cg(Diagonal(d), b, x0).x["a"])))(b)
    chex.assert_trees_all_close(g, {"a": jnp.zeros(3)})


def test_validation_errors():
    with pytest.raises(TypeError, match=r"\['a'\]"):
        cg(lambda v: v, {"a": jnp.arange(3)})
    with pytest.raises(TreeMismatchError, match="x0"):
        cg(lambda v: v, {"a": jnp.ones(3)}, {"a": jnp.ones(4)})
    with pytest.raises(TypeError, match="matvec"):
        cg(3.0, {"a": jnp.ones(3)})


def test_tree_vdot_accumulates_low_precision_in_float32():
    x = {"a": jnp.full((4096,), 0.01, jnp.bfloat16), "b": jnp.ones((3,), jnp.float32)}
    out = _tree_vdot(x, x)
    assert out.dtype == jnp.float32
    expected = 4096 * float(jnp.bfloat16(0.01)) ** 2 + 3
    np.testing.assert_allclose(float(out), expected, rtol=1e-5)
    y = {"a": jnp.ones(3, jnp.float64), "b": jnp.ones(2, jnp.float32)}
    assert _tree_vdot(y, y).dtype == jnp.float64


def _lowrank_damped_op(scale, d, u):
    """Scaled diagonal + damping + low-rank uuᵀ (operand of a MatrixFree)."""
    low_rank = MatrixFree(
        lambda v, u: jax.tree.map(lambda ui: _tree_vdot(u, v) * ui, u), operands=(u,)
    )
    return Damped(Scaled(Diagonal(d), scale), 0.1) + low_rank


def test_gradients_by_implicit_differentiation_match_finite_differences():
    d = jax.tree.map(lambda t: 1.0 + t**2, tree_of(SHAPES, jnp.float64, seed=4))
    u = jax.tree.map(lambda t: 0.3 * t, tree_of(SHAPES, jnp.float64, seed=5))
    b = tree_of(SHAPES, jnp.float64, seed=6)
    w = tree_of(SHAPES, jnp.float64, seed=7)

    @jax.jit
    def f(scale, b):
        x = cg(_lowrank_damped_op(scale, d, u), b, rtol=1e-13).x
        return _tree_vdot(w, jax.tree.map(jnp.sin, x))

    g_scale, g_b = jax.jit(jax.grad(f, argnums=(0, 1)))(1.7, b)
    h = 1e-6
    fd_scale = (f(1.7 + h, b) - f(1.7 - h, b)) / (2 * h)
    np.testing.assert_allclose(float(g_scale), float(fd_scale), rtol=1e-6)
    e = jax.tree.map(jnp.zeros_like, b)
    e["a"] = e["a"].at[1, 2].set(1.0)
    fd_b = (f(1.7, otu_add(b, e, h)) - f(1.7, otu_add(b, e, -h))) / (2 * h)
    np.testing.assert_allclose(float(g_b["a"][1, 2]), float(fd_b), rtol=1e-6)
    # directional derivative in b along a random direction (covers every leaf)
    dirn = tree_of(SHAPES, jnp.float64, seed=8)
    fd_dir = (f(1.7, otu_add(b, dirn, h)) - f(1.7, otu_add(b, dirn, -h))) / (2 * h)
    np.testing.assert_allclose(float(_tree_vdot(g_b, dirn)), float(fd_dir), rtol=1e-6)
    # forward mode agrees with reverse mode
    _, jvp_scale = jax.jvp(lambda s: f(s, b), (1.7,), (1.0,))
    np.testing.assert_allclose(float(jvp_scale), float(g_scale), rtol=1e-8)


def otu_add(x, y, h):
    return jax.tree.map(lambda a, b: a + h * b, x, y)
