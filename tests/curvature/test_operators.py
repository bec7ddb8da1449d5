"""Tests of jmerge.curvature.operators: mv and diag against dense matrices (from basis vectors)."""

import dataclasses
import functools

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
    mean_diagonal,
)
from jmerge.tree import NonFiniteError, TreeMismatchError

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


# Dataclass registration: children, static fields, rebuilding under transformations.


def test_operators_are_frozen_dataclasses_with_static_functions():
    p = params_tree()
    f = lambda v, s: jax.tree.map(lambda x: s * x, v)
    diag = jax.tree.map(jnp.ones_like, p)
    op = MatrixFree(f, diag_tree=diag, operands=[jnp.array(2.0)])
    assert isinstance(op.operands, tuple)
    leaves, treedef = jax.tree.flatten(op)
    assert len(leaves) == 3 + 1  # diag_tree leaves and the operand; mv_fn is static
    assert treedef == jax.tree.structure(MatrixFree(f, diag_tree=diag, operands=(1.0,)))
    assert treedef != jax.tree.structure(
        MatrixFree(lambda v, s: v, diag_tree=diag, operands=(1.0,))
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        op.diag_tree = None
    with pytest.raises(TypeError, match="callable"):
        MatrixFree(3.0)
    with pytest.raises(ValueError, match="square"):
        KFAC({K0: (spd(3, 0), jnp.ones((4, 5)))})
    with pytest.raises(ValueError, match="at least one"):
        Sum([])


def test_unflatten_tolerates_placeholders_tracers_and_stacked_operators():
    """register_dataclass rebuilds through the constructor (__post_init__ runs): the checks
    skip leaves without a shape and allow a leading (stacked) axis."""
    p = params_tree()
    ops = [BlockGram({K0: (i + 1.0) * spd(3, 3)}, rest=0.5 * i) for i in range(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *ops)
    out = jax.vmap(lambda o, v: o.mv(v), in_axes=(0, None))(stacked, p)
    for i, o in enumerate(ops):
        chex.assert_trees_all_close(jax.tree.map(lambda x, i=i: x[i], out), o.mv(p))
    # an in_axes prefix tree is an operator with int/None leaves
    axes = BlockGram({K0: 0}, rest=0)
    out2 = jax.vmap(lambda o, v: o.mv(v), in_axes=(axes, None))(stacked, p)
    chex.assert_trees_all_close(out2, out)
    assert jax.tree.map(lambda x: None, ops[0]).grams == {K0: None}
    shapes = jax.eval_shape(lambda o: o, KFAC({K0: (spd(3, 0), spd(4, 1))}))
    chex.assert_shape(shapes.factors[K0][1], (4, 4))
    # grad through an operator argument
    d = jax.tree.map(lambda x: x**2 + 0.1, params_tree(1))
    g = jax.grad(lambda op: jnp.sum(ravel_pytree(op.mv(p))[0]))(Damped(Diagonal(d), 0.3))
    chex.assert_trees_all_close(g.op.tree, p)
    np.testing.assert_allclose(g.delta, jnp.sum(ravel_pytree(p)[0]))


# as_matrix against known matrices.


@pytest.mark.parametrize("jit", [False, True])
def test_as_matrix_known_matrices(jit):
    p = params_tree()
    n = ravel_pytree(p)[0].size
    mat = (
        (lambda op: jax.jit(lambda o, l: o.as_matrix(l))(op, p))
        if jit
        else (lambda op: op.as_matrix(p))
    )
    d = jax.tree.map(lambda x: x**2 + 0.1, params_tree(1))
    dd = np.diag(np.asarray(ravel_pytree(d)[0]))
    np.testing.assert_allclose(mat(Diagonal(d)), dd, rtol=1e-12)
    # ravel order of p: DenseGeneral_0/kernel (30), Dense_0/bias (4), Dense_0/kernel (12)
    a0, b0, a1, b1 = spd(3, 5), spd(4, 6), spd(6, 7), spd(5, 8)
    kfac = KFAC({K0: (a0, b0), K1: (a1, b1)}, rest=2.0)
    want_kfac = scipy.linalg.block_diag(np.kron(a1, b1), 2.0 * np.eye(4), np.kron(a0, b0))
    np.testing.assert_allclose(mat(kfac), want_kfac, rtol=1e-12)
    g0, g1 = spd(3, 3), spd(6, 4)
    bg = BlockGram({K0: g0, K1: g1}, rest=0.7)
    want_bg = scipy.linalg.block_diag(
        np.kron(g1, np.eye(5)), 0.7 * np.eye(4), np.kron(g0, np.eye(4))
    )
    np.testing.assert_allclose(mat(bg), want_bg, rtol=1e-12)
    np.testing.assert_allclose(mat(Identity(1.5)), 1.5 * np.eye(n))
    comp = Damped(Scaled(Diagonal(d) + kfac, 2.5), 0.3) + bg
    np.testing.assert_allclose(
        mat(comp), 2.5 * (dd + want_kfac) + 0.3 * np.eye(n) + want_bg, rtol=1e-12
    )
    a = spd(n, 9)
    _, unravel = ravel_pytree(p)
    mf = MatrixFree(lambda v: unravel(a @ ravel_pytree(v)[0]))
    np.testing.assert_allclose(mat(mf), a, rtol=1e-12)
    np.testing.assert_allclose(mat(mf), dense(mf, p), rtol=1e-12)


# as_operator: the one rule for a curvature argument.


def scalar_param_like():
    return jnp.asarray(1.5)


@pytest.mark.parametrize(
    "s", [np.float32(2.0), np.float64(2.0), 2, 2.0, jnp.asarray(2.0), np.asarray(2.0)]
)
def test_as_operator_scalars_are_identity(s):
    p = params_tree()
    for like in (None, p):
        op = as_operator(s, like)
        assert isinstance(op, Identity)
        np.testing.assert_allclose(op.as_matrix(p), 2.0 * np.eye(ravel_pytree(p)[0].size))
    # a scalar parameter: the scalar is its diagonal
    op = as_operator(s, scalar_param_like())
    assert isinstance(op, Diagonal)
    np.testing.assert_allclose(op.mv(jnp.asarray(3.0)), 6.0)


def test_as_operator_pytrees_operators_and_ducks():
    p = params_tree()
    d = jax.tree.map(lambda x: x**2, params_tree(1))
    assert isinstance(as_operator(d), Diagonal)
    assert isinstance(as_operator(d, p), Diagonal)
    op = Diagonal(d)
    assert as_operator(op, p) is op
    mf = MatrixFree(lambda v: v, diag_tree=d)
    assert as_operator(mf, p) is mf

    class Duck:
        def mv(self, v):
            return v

    duck = as_operator(Duck(), p)
    assert isinstance(duck, MatrixFree) and not duck.has_diag


@pytest.mark.parametrize("bad", [True, False, np.bool_(True), None])
def test_as_operator_rejects_bool_and_none(bad):
    with pytest.raises(TypeError, match=r"curvatures\[2\]"):
        as_operator(bad, params_tree(), name="curvatures[2]")


@pytest.mark.parametrize("s", [-1.0, np.float32(-0.5), jnp.asarray(-2.0), np.nan, np.inf])
def test_as_operator_rejects_negative_or_nonfinite_scalars(s):
    with pytest.raises(ValueError, match=r"curvatures\[0\] must be a finite non-negative"):
        as_operator(s, name="curvatures[0]")


def test_as_operator_diagonal_errors_name_the_path():
    p = params_tree()
    d = jax.tree.map(lambda x: x**2, params_tree(1))
    neg = jax.tree.map(lambda x: x, d)
    neg["params"]["Dense_0"]["bias"] = jnp.array([-0.5, 1.0, -0.25, -0.1])
    path = r"curvatures\[1\]\['params'\]\['Dense_0'\]\['bias'\]"
    with pytest.raises(ValueError, match=path + r" has 3 negative entries \(min -0.5\)"):
        as_operator(neg, p, name="curvatures[1]")
    with pytest.raises(ValueError, match=path + " has 3 negative"):
        as_operator(Diagonal(neg), p, name="curvatures[1]")
    nan = jax.tree.map(lambda x: x, d)
    nan["params"]["Dense_0"]["bias"] = jnp.array([np.nan, 1.0, 1.0, 1.0])
    with pytest.raises(NonFiniteError, match=path + " is not finite"):
        as_operator(nan, p, name="curvatures[1]")
    wrong = jax.tree.map(lambda x: x, d)
    wrong["params"]["Dense_0"]["bias"] = jnp.ones(5)
    with pytest.raises(TreeMismatchError, match=path + r" has shape \(5,\), expected \(4,\)"):
        as_operator(wrong, p, name="curvatures[1]")
    with pytest.raises(TreeMismatchError, match=r"curvatures\[1\]\.diag_tree\['params'\]"):
        as_operator(MatrixFree(lambda v: v, diag_tree=wrong), p, name="curvatures[1]")
    with pytest.raises(TreeMismatchError, match="missing"):
        as_operator({"params": d["params"]["Dense_0"]}, p, name="curvatures[1]")
    with pytest.raises(ValueError, match=r"^curvature must be a finite non-negative scalar"):
        as_operator(-1.0)
    with pytest.raises(ValueError, match=r"^curvature has 1 negative entries"):
        as_operator(-1.0, scalar_param_like())  # the diagonal of a scalar parameter


def test_as_operator_under_jit_checks_concrete_and_skips_traced():
    p = params_tree()
    neg = jax.tree.map(lambda x: -(x**2) - 1.0, params_tree(1))
    minus_one = jnp.asarray(-1.0)

    def closed_over(v):  # neg is a concrete constant of the traced function
        return as_operator(neg, p, name="c").mv(v)

    with pytest.raises(
        ValueError, match=r"c\['params'\]\['DenseGeneral_0'\]\['kernel'\] has 30 neg"
    ):
        jax.jit(closed_over)(p)
    with pytest.raises(ValueError, match="c must be a finite non-negative"):
        jax.jit(lambda v: as_operator(minus_one, p, name="c").mv(v))(p)
    # traced curvature arguments cannot be inspected: read, not checked
    out = jax.jit(lambda c, v: as_operator(c, p).mv(v))(neg, p)
    chex.assert_trees_all_close(out, Diagonal(neg).mv(p))
    op = jax.jit(lambda s: as_operator(s, p))(jnp.asarray(-1.0))
    assert isinstance(op, Identity)


# mean_diagonal: tr(P C P) / n_P.


def leaf_ranges(like):
    """[(keystr path, start, stop)] of each leaf in ravel_pytree order."""
    out, start = [], 0
    for path, x in jax.tree_util.tree_leaves_with_path(like):
        out.append((jax.tree_util.keystr(path), start, start + np.size(x)))
        start += np.size(x)
    return out


def masked_mean_trace(m, like, mask):
    keep = jax.tree_util.tree_leaves(mask)
    idx = np.concatenate(
        [np.arange(a, b) for (_, a, b), k in zip(leaf_ranges(like), keep, strict=True) if k]
    )
    return np.trace(np.asarray(m)[np.ix_(idx, idx)]) / idx.size


def maybe_jit(jit, fn):
    return jax.jit(fn) if jit else fn


@pytest.mark.parametrize("jit", [False, True])
def test_mean_diagonal_exact(jit):
    p = params_tree()
    n = ravel_pytree(p)[0].size
    d = jax.tree.map(lambda x: x**2 + 0.1, params_tree(1))
    mf = MatrixFree(lambda v: jax.tree.map(lambda x: 3.0 * x, v))  # Hutchinson is exact for 3I
    ops = [
        Diagonal(d),
        KFAC({K0: (spd(3, 5), spd(4, 6)), K1: (spd(6, 7), spd(5, 8))}, rest=2.0),
        BlockGram({K0: spd(3, 3), K1: spd(6, 4)}, rest=0.7),
        Identity(1.5),
        Damped(Scaled(Diagonal(d) + BlockGram({K0: spd(3, 3)}), 2.5), 0.3),
        Sum([mf, Diagonal(d)]),
    ]
    mask = jax.tree.map(lambda _: True, p)
    mask["params"]["Dense_0"]["kernel"] = False
    fn = maybe_jit(jit, mean_diagonal)
    masked = maybe_jit(jit, functools.partial(mean_diagonal, mask=mask))
    for op in ops:
        m = np.asarray(op.as_matrix(p))
        np.testing.assert_allclose(fn(op, p), np.trace(m) / n, rtol=1e-12)
        np.testing.assert_allclose(masked(op, p), masked_mean_trace(m, p, mask), rtol=1e-12)


def hutchinson_setup():
    rng = np.random.default_rng(0)
    like = {"w": jnp.asarray(rng.normal(size=(5, 6))), "b": jnp.asarray(rng.normal(size=(20,)))}
    a = spd(50, 11)
    _, unravel = ravel_pytree(like)

    def make(c):
        return MatrixFree(lambda v: unravel(c * (a @ ravel_pytree(v)[0])))

    return like, np.asarray(a), make


@pytest.mark.parametrize("jit", [False, True])
def test_mean_diagonal_hutchinson_accuracy_and_linearity(jit):
    like, a, make = hutchinson_setup()
    key = jax.random.PRNGKey(3)
    fn = maybe_jit(jit, functools.partial(mean_diagonal, num_probes=64))
    est = fn(make(1.0), like, key=key)
    chex.assert_shape(est, ())
    np.testing.assert_allclose(est, np.trace(a) / 50, rtol=0.2)
    # linear in the operator for a fixed key (the same probes)
    np.testing.assert_allclose(fn(make(3.7), like, key=key), 3.7 * est, rtol=1e-12)
    np.testing.assert_allclose(fn(Scaled(make(1.0), 3.7), like, key=key), 3.7 * est, rtol=1e-12)
    np.testing.assert_allclose(fn(Damped(make(1.0), 0.5), like, key=key), est + 0.5, rtol=1e-12)
    mask = {"w": False, "b": True}
    est_b = maybe_jit(jit, functools.partial(mean_diagonal, mask=mask, num_probes=64))(
        make(1.0), like, key=key
    )
    np.testing.assert_allclose(est_b, masked_mean_trace(a, like, mask), rtol=0.2)


def test_mean_diagonal_dtypes_and_errors():
    like, _, make = hutchinson_setup()
    like32 = jax.tree.map(lambda x: x.astype(jnp.float32), like)
    assert mean_diagonal(make(1.0), like32).dtype == jnp.float32
    assert mean_diagonal(make(1.0), like).dtype == jnp.float64
    assert mean_diagonal(Identity(2), like32).dtype == jnp.float32
    with pytest.raises(ValueError, match="selects no entry"):
        mean_diagonal(Identity(1.0), like, {"w": False, "b": False})
    with pytest.raises(TypeError, match="Python bools"):
        mean_diagonal(Identity(1.0), like, {"w": jnp.array(True), "b": True})
    with pytest.raises(TreeMismatchError, match="mask"):
        mean_diagonal(Identity(1.0), like, {"w": True})
    with pytest.raises(ValueError, match="num_probes"):
        mean_diagonal(make(1.0), like, num_probes=0)
