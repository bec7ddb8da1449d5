"""Tests of jmerge.curvature.operators: mv and diag against dense matrices (from basis vectors)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.flatten_util import ravel_pytree

from jmerge.curvature.operators import (
    KFAC,
    BlockGram,
    CurvatureOperator,
    Damped,
    Diagonal,
    Identity,
    MatrixFree,
    Scaled,
    Sum,
    as_operator,
    damped,
    fisher_operator,
    ggn_operator,
    hessian_operator,
    jacobi_preconditioner,
)
from jmerge.tree import TreeMismatchError

K0 = "['params']['Dense_0']['kernel']"
K1 = "['params']['DenseGeneral_0']['kernel']"


def params_tree(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {
        "params": {
            "Dense_0": {"kernel": (3, 4), "bias": (4,)},
            "DenseGeneral_0": {"kernel": (2, 3, 5)},  # in dims (2, 3) -> d_in = 6
        }
    }
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s)), shapes, is_leaf=lambda s: isinstance(s, tuple)
    )


def spd(n, seed):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(n, n))
    return jnp.asarray(m @ m.T + 0.5 * np.eye(n))


def dense(op, like, jit=False):
    """The matrix of op in ravel_pytree coordinates: column i is ravel(op.mv(e_i))."""
    flat, unravel = ravel_pytree(like)
    cols_fn = jax.vmap(lambda e: ravel_pytree(op.mv(unravel(e)))[0])
    cols = (jax.jit(cols_fn) if jit else cols_fn)(jnp.eye(flat.size))
    return np.asarray(cols).T


def dense_diag(op, like):
    return np.asarray(ravel_pytree(op.diag(like))[0])


def blocks_in_leaf_order(like, block_of_path):
    """Block-diagonal matrix over the leaves (ravel order), block_of_path(path, leaf) each."""
    return scipy.linalg.block_diag(
        *[
            np.asarray(block_of_path(jax.tree_util.keystr(p), x))
            for p, x in jax.tree_util.tree_leaves_with_path(like)
        ]
    )


def check_against(op, like, expected):
    got = dense(op, like)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    if op.has_diag:
        np.testing.assert_allclose(dense_diag(op, like), np.diag(expected), rtol=1e-10)
    else:
        assert op.diag(like) is None


def test_diagonal():
    p = params_tree()
    d = jax.tree.map(lambda x: x**2 + 0.1, params_tree(1))
    check_against(Diagonal(d), p, np.diag(ravel_pytree(d)[0]))


def test_matrix_free_with_and_without_diag():
    p = params_tree()
    n = ravel_pytree(p)[0].size
    a = spd(n, 2)
    _, unravel = ravel_pytree(p)
    mv = lambda v: unravel(a @ ravel_pytree(v)[0])
    check_against(MatrixFree(mv), p, np.asarray(a))
    check_against(MatrixFree(mv, diag_tree=unravel(jnp.diag(a))), p, np.asarray(a))
    # operands are children: traced under jit
    op = MatrixFree(lambda v, s: jax.tree.map(lambda x: s * x, v), operands=(jnp.array(3.0),))
    out = jax.jit(lambda op, v: op.mv(v))(op, p)
    chex.assert_trees_all_close(out, jax.tree.map(lambda x: 3 * x, p))


@pytest.mark.parametrize("rest", [0.7, 0.0])
def test_block_gram_dense_and_dense_general(rest):
    p = params_tree()
    g0, g1 = spd(3, 3), spd(6, 4)
    op = BlockGram({K0: g0, K1: g1}, rest=rest)

    def block(path, x):
        if path == K0:
            return np.kron(g0, np.eye(4))
        if path == K1:
            return np.kron(g1, np.eye(5))
        return rest * np.eye(x.size)  # rest = 0: the bias is in the null space

    check_against(op, p, blocks_in_leaf_order(p, block))


def test_block_gram_validation_names_the_path():
    p = params_tree()
    with pytest.raises(TreeMismatchError, match=r"\['params'\]\['Dense_1'\]\['kernel'\]"):
        BlockGram({"['params']['Dense_1']['kernel']": spd(3, 0)}).mv(p)
    with pytest.raises(TreeMismatchError, match=r"DenseGeneral_0.*\(2, 3, 5\)"):
        BlockGram({K1: spd(4, 0)}).mv(p)  # 4 is not a product of leading dims of (2, 3, 5)
    with pytest.raises(ValueError, match="square"):
        BlockGram({K0: jnp.ones((3, 4))})
    with pytest.raises(ValueError, match="like"):
        BlockGram({K0: spd(3, 0)}).diag()


def test_kfac():
    p = params_tree()
    a0, b0 = spd(3, 5), spd(4, 6)
    a1, b1 = spd(6, 7), spd(5, 8)
    op = KFAC({K0: (a0, b0), K1: (a1, b1)}, rest=2.0)

    def block(path, x):
        if path == K0:
            return np.kron(a0, b0)
        if path == K1:
            return np.kron(a1, b1)
        return 2.0 * np.eye(x.size)

    check_against(op, p, blocks_in_leaf_order(p, block))
    with pytest.raises(TreeMismatchError, match=r"Dense_0.*\(3, 4\)"):
        KFAC({K0: (spd(3, 0), spd(5, 0))}).mv(p)


def test_sum_scaled_damped_identity_compose():
    p = params_tree()
    n = ravel_pytree(p)[0].size
    d = jax.tree.map(lambda x: x**2 + 0.1, params_tree(1))
    g0 = spd(3, 3)
    dg, bg = Diagonal(d), BlockGram({K0: g0})
    dd, db = dense(dg, p), dense(bg, p)
    check_against(Sum([dg, bg]), p, dd + db)
    check_against(dg + bg, p, dd + db)
    check_against(Scaled(bg, 2.5), p, 2.5 * db)
    check_against(0.5 * dg, p, 0.5 * dd)
    check_against(Damped(bg, 0.3), p, db + 0.3 * np.eye(n))
    check_against(damped(dg, 0.3), p, dd + 0.3 * np.eye(n))
    check_against(Identity(1.5), p, 1.5 * np.eye(n))
    mf = MatrixFree(lambda v: v)
    check_against(Sum([dg, mf]), p, dd + np.eye(n))  # diag unknown -> None
    assert jacobi_preconditioner(Sum([dg, mf])) is None


def test_operators_are_pytrees_and_scale_is_differentiable():
    p = params_tree()
    d = jax.tree.map(lambda x: x**2 + 0.1, params_tree(1))
    op = Damped(Scaled(Diagonal(d) + BlockGram({K0: spd(3, 3)}), 2.0), 0.1)
    leaves, treedef = jax.tree.flatten(op)
    assert len(leaves) == 3 + 1 + 1 + 1 + 1  # diag leaves, gram, rest, scale, delta
    rebuilt = jax.tree.unflatten(treedef, leaves)
    chex.assert_trees_all_close(rebuilt.mv(p), op.mv(p))

    def f(scale):
        o = Scaled(Diagonal(d), scale)
        return jnp.sum(ravel_pytree(o.mv(p))[0])

    g = jax.jit(jax.grad(f))(1.3)
    np.testing.assert_allclose(g, float(jnp.sum(ravel_pytree(Diagonal(d).mv(p))[0])))
    # jit with an operator argument: the same compiled function for new array values
    mv = jax.jit(lambda op, v: op.mv(v))
    chex.assert_trees_all_close(mv(op, p), op.mv(p))


def test_as_operator():
    d = {"a": jnp.ones(3)}
    op = Diagonal(d)
    assert as_operator(op) is op
    assert isinstance(as_operator(d), Diagonal)
    assert isinstance(as_operator(0.5), Identity)

    class Duck:
        def mv(self, v):
            return v

    wrapped = as_operator(Duck())
    assert isinstance(wrapped, CurvatureOperator) and not wrapped.has_diag


def test_jacobi_preconditioner_guards_zeros_and_is_lazy_for_block_ops():
    d = {"a": jnp.array([0.0, 2.0, -1.0, 4.0])}
    pre = jacobi_preconditioner(Diagonal(d))
    chex.assert_trees_all_close(pre({"a": jnp.ones(4)}), {"a": jnp.array([1.0, 0.5, 1.0, 0.25])})
    assert jacobi_preconditioner(MatrixFree(lambda v: v)) is None
    p = params_tree()
    bg = Damped(BlockGram({K0: spd(3, 3)}, rest=2.0), 0.1)
    lazy = jacobi_preconditioner(bg)
    eager = jacobi_preconditioner(bg, like=p)
    inv = jax.tree.map(lambda x: 1.0 / x, bg.diag(p))
    expected = jax.tree.map(lambda x, i: x * i, p, inv)
    chex.assert_trees_all_close(lazy(p), expected)
    chex.assert_trees_all_close(eager(p), expected)
    # both are pytrees (pass through jit as arguments)
    chex.assert_trees_all_close(jax.jit(lambda m, v: m(v))(lazy, p), expected)


# Matrix-free constructors, against dense curvature matrices from jax.hessian / jax.jacobian.


def mlp_setup():
    rng = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(rng.normal(size=(3, 4)) * 0.5),
        "b1": jnp.asarray(rng.normal(size=(4,)) * 0.1),
        "w2": jnp.asarray(rng.normal(size=(4, 3)) * 0.5),
    }
    x = jnp.asarray(rng.normal(size=(5, 3)))
    y = jnp.asarray(rng.integers(0, 3, size=(5,)))

    def logits_fn(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    def out_loss(z, batch):
        _, y = batch
        return jnp.mean(jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, y[:, None], -1)[:, 0])

    model_fn = lambda p, batch: logits_fn(p, batch[0])
    loss_fn = lambda p, batch: out_loss(model_fn(p, batch), batch)
    return params, (x, y), logits_fn, model_fn, out_loss, loss_fn


def test_hessian_operator_matches_jax_hessian():
    params, batch, _, _, _, loss_fn = mlp_setup()
    flat, unravel = ravel_pytree(params)
    h = jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), batch)))(flat)
    op = hessian_operator(loss_fn, params, batch)
    assert op.diag(params) is None
    np.testing.assert_allclose(dense(op, params, jit=True), np.asarray(h), rtol=1e-8, atol=1e-10)


def test_ggn_and_fisher_operators_match_dense_jt_h_j():
    params, batch, logits_fn, model_fn, out_loss, _ = mlp_setup()
    flat, unravel = ravel_pytree(params)
    z = model_fn(params, batch)
    jac = jax.jit(jax.jacobian(lambda f: model_fn(unravel(f), batch).ravel()))(flat)  # (N*K, n)
    hz = jax.jit(jax.hessian(lambda zz: out_loss(zz.reshape(z.shape), batch)))(z.ravel())
    ggn = np.asarray(jac.T @ hz @ jac)
    np.testing.assert_allclose(
        dense(ggn_operator(model_fn, out_loss, params, batch), params, jit=True),
        ggn,
        rtol=1e-8,
        atol=1e-10,
    )
    # softmax cross-entropy: the Fisher equals the GGN
    np.testing.assert_allclose(
        dense(fisher_operator(logits_fn, params, batch[0]), params, jit=True),
        ggn,
        rtol=1e-8,
        atol=1e-10,
    )


def test_matrix_free_constructor_hits_jit_cache():
    params, batch, _, _, _, loss_fn = mlp_setup()
    traces = []

    @jax.jit
    def mv(op, v):
        traces.append(1)
        return op.mv(v)

    mv(hessian_operator(loss_fn, params, batch), params)
    mv(hessian_operator(loss_fn, jax.tree.map(lambda x: 2 * x, params), batch), params)
    assert len(traces) == 1
