"""Exactness of mats and gradient_matching against independent dense references.

Least-squares tasks have exact Hessians H_t = X_tᵀX_t, so with exact curvature both merges
must equal the joint (multitask) optimum; the special cases (Fisher merging, RegMean, K-FAC,
task arithmetic) must be reproduced; and a real Flax MLP must merge end to end with
matrix-free Fisher / GGN curvature. float64 throughout (conftest enables x64).
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

from jmerge import (
    SOLVER_CG,
    SOLVER_CLOSED_FORM,
    absolute,
    average,
    fisher_merge,
    gradient_matching,
    mats,
    regmean,
    task_arithmetic,
)
from jmerge.curvature import (
    KFAC,
    BlockGram,
    MatrixFree,
    fisher_operator,
    ggn_operator,
    hessian_operator,
)
from jmerge.tree import TreeMismatchError

RTOL = 1e-5
SOLVE = dict(maxiter=200, rtol=1e-12)

# ---------------------------------------------------------------------------------------------
# Linear-regression tasks: y = X_w w + X_b b, params {"w": (d1,), "b": (d2,)}.


def _linear_model(params, xw, xb):
    return xw @ params["w"] + xb @ params["b"]


def _gram_mv(v, xw, xb):
    """H v = Xᵀ X v through the linear model: Jᵀ (J v), J the model's Jacobian."""
    z, vjp = jax.vjp(lambda p: _linear_model(p, xw, xb), v)
    return vjp(z)[0]


def _flat(tree):
    return np.concatenate([np.asarray(tree["w"]), np.asarray(tree["b"])])


def _unflat(x, d1):
    return {"w": jnp.asarray(x[:d1]), "b": jnp.asarray(x[d1:])}


class _Tasks:
    """T least-squares tasks with their own data; θ_t the per-task least-squares optimum."""

    def __init__(self, seed=0, num_tasks=3, d1=4, d2=3, n=12, zero_b=False):
        rng = np.random.default_rng(seed)
        self.d1, self.d2 = d1, d2
        self.xw, self.xb, self.y, self.x = [], [], [], []
        for _ in range(num_tasks):
            xw = rng.normal(size=(n, d1))
            xb = np.zeros((n, d2)) if zero_b else rng.normal(size=(n, d2))
            y = rng.normal(size=n)
            self.xw.append(xw)
            self.xb.append(xb)
            self.y.append(y)
            self.x.append(np.concatenate([xw, xb], axis=1))
        self.thetas = [
            np.linalg.lstsq(x, y, rcond=None)[0] for x, y in zip(self.x, self.y, strict=True)
        ]
        self.finetuned = [_unflat(t, d1) for t in self.thetas]
        self.pretrained = _unflat(rng.normal(size=d1 + d2), d1)
        self.hessians = [x.T @ x for x in self.x]

    def operators(self, with_diag=False):
        return [
            MatrixFree(
                _gram_mv,
                diag_tree=_unflat(np.diag(h), self.d1) if with_diag else None,
                operands=(jnp.asarray(xw), jnp.asarray(xb)),
            )
            for xw, xb, h in zip(self.xw, self.xb, self.hessians, strict=True)
        ]

    def joint_optimum(self):
        return np.linalg.lstsq(np.concatenate(self.x), np.concatenate(self.y), rcond=None)[0]


def _assert_rel(got, want, rtol=RTOL):
    got, want = np.asarray(got), np.asarray(want)
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
    assert err <= rtol, f"relative error {err:.3g} > {rtol:g}"


def _sq_loss(params, batch):
    xw, xb, y = batch
    return 0.5 * jnp.sum((_linear_model(params, xw, xb) - y) ** 2)


@pytest.mark.parametrize(
    ("init", "curvature"),
    [("task_arithmetic", "hessian_operator"), ("pretrained", "matrix_free_with_diag")],
)
def test_mats_exact_hessians_equal_joint_least_squares(init, curvature):
    tasks = _Tasks(seed=1)
    if curvature == "hessian_operator":  # ∇²_θ ½‖Xθ − y‖² = XᵀX at θ_t, by forward-over-reverse
        ops = [
            hessian_operator(_sq_loss, theta, tuple(map(jnp.asarray, (xw, xb, y))))
            for theta, xw, xb, y in zip(tasks.finetuned, tasks.xw, tasks.xb, tasks.y, strict=True)
        ]
    else:
        ops = tasks.operators(with_diag=True)
    res = mats(tasks.pretrained, tasks.finetuned, ops, init=init, **SOLVE)
    assert bool(res.info["converged"])
    _assert_rel(_flat(res.params), tasks.joint_optimum())
    # The objective is Σ_t (loss_t(θ) − loss_t(θ_t)): it decreases to its minimum.
    assert float(res.info["objective"]) <= float(res.info["objective_init"])


def test_gradient_matching_no_prior_equals_joint_least_squares():
    tasks = _Tasks(seed=2)
    res = gradient_matching(
        tasks.pretrained, tasks.finetuned, tasks.operators(), prior=0.0, **SOLVE
    )
    assert int(res.info.solver) == SOLVER_CG
    assert bool(res.info["converged"])
    _assert_rel(_flat(res.params), tasks.joint_optimum())


def _paper_formula(theta0, thetas, hessians, h0, alpha):
    """θ0 + H̄⁻¹ Σ_t α_t (H0 + H_t)(θ_t − θ0), H̄ = H0 + Σ_t α_t H_t, densely."""
    h_bar = h0 + sum(a * h for a, h in zip(alpha, hessians, strict=True))
    rhs = sum(a * (h0 + h) @ (t - theta0) for a, h, t in zip(alpha, hessians, thetas, strict=True))
    return theta0 + np.linalg.solve(h_bar, rhs)


@pytest.mark.parametrize("prior_kind", ["scalar", "diagonal_pytree"])
def test_gradient_matching_with_prior_equals_paper_formula(prior_kind):
    tasks = _Tasks(seed=3)
    d = tasks.d1 + tasks.d2
    rng = np.random.default_rng(0)
    alpha = np.array([0.5, 0.8, 0.3])
    sizes = np.array([2.0, 1.0, 3.0])
    if prior_kind == "scalar":
        prior, h0 = absolute(0.7), 0.7 * np.eye(d)
    else:
        diag0 = rng.uniform(0.1, 2.0, size=d)
        h0 = np.diag(diag0)
        prior = _unflat(diag0, tasks.d1)
    res = gradient_matching(
        tasks.pretrained,
        tasks.finetuned,
        tasks.operators(),
        alpha=alpha,
        prior=prior,
        dataset_sizes=sizes,
        **SOLVE,
    )
    assert bool(res.info["converged"])
    want = _paper_formula(
        _flat(tasks.pretrained),
        tasks.thetas,
        [n * h for n, h in zip(sizes, tasks.hessians, strict=True)],
        h0,
        alpha,
    )
    _assert_rel(_flat(res.params), want)


@settings(max_examples=8, deadline=None)
@given(
    shapes=st.lists(
        st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=3
    ),
    num_models=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    prior_kind=st.sampled_from(["zero", "scalar", "pytree"]),
)
def test_gradient_matching_diagonal_closed_form_equals_formula(
    shapes, num_models, seed, prior_kind
):
    rng = np.random.default_rng(seed)
    pre = {f"l{i}": jnp.asarray(rng.normal(size=s)) for i, s in enumerate(shapes)}
    ft = [
        jax.tree_util.tree_map(lambda x: x + rng.normal(size=x.shape), pre)
        for _ in range(num_models)
    ]
    fish = [
        jax.tree_util.tree_map(lambda x: jnp.asarray(rng.uniform(0.1, 2, x.shape)), pre) for _ in ft
    ]
    alpha = rng.uniform(0.2, 1.0, size=num_models)
    prior = {
        "zero": 0.0,
        "scalar": absolute(0.3),
        "pytree": jax.tree_util.tree_map(lambda x: jnp.asarray(rng.uniform(0, 1, x.shape)), pre),
    }[prior_kind]
    res = gradient_matching(pre, ft, fish, alpha=alpha, prior=prior)
    assert int(res.info.solver) == SOLVER_CLOSED_FORM
    flat = lambda t: ravel_pytree(t)[0]
    h0 = (
        np.zeros(flat(pre).size)
        if prior_kind == "zero"
        else (np.full(flat(pre).size, 0.3) if prior_kind == "scalar" else np.asarray(flat(prior)))
    )
    want = _paper_formula(
        np.asarray(flat(pre)),
        [np.asarray(flat(t)) for t in ft],
        [np.diag(np.asarray(flat(f))) for f in fish],
        np.diag(h0),
        alpha,
    )
    np.testing.assert_allclose(flat(res.params), want, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Closed-form special cases.


@settings(max_examples=4, deadline=None)
@given(
    shapes=st.lists(
        st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=3
    ),
    num_models=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_mats_diagonal_equals_fisher_merge(shapes, num_models, seed):
    rng = np.random.default_rng(seed)
    pre = {f"l{i}": jnp.asarray(rng.normal(size=s)) for i, s in enumerate(shapes)}
    ft = [
        jax.tree_util.tree_map(lambda x: x + rng.normal(size=x.shape), pre)
        for _ in range(num_models)
    ]
    fish = [
        jax.tree_util.tree_map(lambda x: jnp.asarray(rng.uniform(0.1, 3, x.shape)), pre) for _ in ft
    ]
    weights = rng.uniform(0.5, 2.0, size=num_models)
    res = mats(pre, ft, fish, weights=weights, rtol=1e-12)
    assert bool(res.info["converged"])
    want = fisher_merge(ft, fish, weights=weights, eps=0.0)
    chex.assert_trees_all_close(res.params, want, rtol=1e-9, atol=1e-12)


def _flax_params(rng, d_in=5, hidden=4, d_out=3):
    def dense(i, o):
        return {
            "kernel": jnp.asarray(rng.normal(size=(i, o))),
            "bias": jnp.asarray(rng.normal(size=o)),
        }

    return {"params": {"Dense_0": dense(d_in, hidden), "Dense_1": dense(hidden, d_out)}}


_K0 = "['params']['Dense_0']['kernel']"
_K1 = "['params']['Dense_1']['kernel']"


def _spd(rng, d, n=None):
    x = rng.normal(size=(n or 2 * d, d))
    return jnp.asarray(x.T @ x)


def test_mats_blockgram_equals_regmean():
    rng = np.random.default_rng(4)
    pre = _flax_params(rng)
    ft = [jax.tree_util.tree_map(lambda x: x + rng.normal(size=x.shape), pre) for _ in range(3)]
    grams = [{_K0: _spd(rng, 5), _K1: _spd(rng, 4)} for _ in ft]
    res = mats(pre, ft, [BlockGram(g, rest=1.0) for g in grams], **SOLVE)
    assert bool(res.info["converged"])
    want = regmean(ft, grams, alpha=1.0, ridge=0.0)
    chex.assert_trees_all_close(res.params, want, rtol=1e-8, atol=1e-10)


def test_mats_kfac_equals_dense_kronecker_solve():
    rng = np.random.default_rng(5)
    pre = _flax_params(rng)
    ft = [jax.tree_util.tree_map(lambda x: x + rng.normal(size=x.shape), pre) for _ in range(2)]
    shapes = {_K0: (5, 4), _K1: (4, 3)}
    factors = [{k: (_spd(rng, i), _spd(rng, o)) for k, (i, o) in shapes.items()} for _ in ft]
    weights = np.array([0.7, 1.6])
    res = mats(pre, ft, [KFAC(f, rest=1.0) for f in factors], weights=weights, **SOLVE)
    assert bool(res.info["converged"])
    for key, layer in ((_K0, "Dense_0"), (_K1, "Dense_1")):
        i, o = shapes[key]
        # C vec(W) = vec(A W B) = (B ⊗ A) vec(W), vec column-major (B symmetric).
        lhs = sum(w * np.kron(f[key][1], f[key][0]) for w, f in zip(weights, factors, strict=True))
        rhs = sum(
            w
            * np.kron(f[key][1], f[key][0])
            @ np.asarray(t["params"][layer]["kernel"]).flatten("F")
            for w, f, t in zip(weights, factors, ft, strict=True)
        )
        want = np.linalg.solve(lhs, rhs).reshape((i, o), order="F")
        np.testing.assert_allclose(res.params["params"][layer]["kernel"], want, rtol=1e-8)
        bias = (
            sum(w * t["params"][layer]["bias"] for w, t in zip(weights, ft, strict=True))
            / weights.sum()
        )
        np.testing.assert_allclose(res.params["params"][layer]["bias"], bias, rtol=1e-8)


def test_gradient_matching_identity_curvature_is_task_arithmetic():
    rng = np.random.default_rng(6)
    pre = _flax_params(rng)
    ft = [jax.tree_util.tree_map(lambda x: x + rng.normal(size=x.shape), pre) for _ in range(3)]
    ones = jax.tree_util.tree_map(jnp.ones_like, pre)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, pre)
    alpha = np.array([0.2, 0.5, 0.3])  # Σ α = 1: H_t = I, H0 = 0 gives exactly task arithmetic
    got = gradient_matching(pre, ft, [ones] * 3, alpha=alpha).params
    chex.assert_trees_all_close(got, task_arithmetic(pre, ft, alpha), rtol=1e-12)
    # In general H_t = I gives θ0 + Σ α_t Δ_t / Σ α_t; H_t = 0 with H0 = δI gives θ0 + Σ α_t Δ_t.
    alpha = np.array([0.4, 0.9, 0.6])
    got = gradient_matching(pre, ft, [ones] * 3, alpha=alpha, prior=0.0).params
    chex.assert_trees_all_close(got, task_arithmetic(pre, ft, alpha / alpha.sum()), rtol=1e-12)
    got = gradient_matching(pre, ft, [zeros] * 3, alpha=alpha, prior=absolute(0.5)).params
    chex.assert_trees_all_close(got, task_arithmetic(pre, ft, alpha), rtol=1e-12)
    # The same through the CG path (identity as a matrix-free operator).
    eye = [MatrixFree(lambda v: v)] * 3
    res = gradient_matching(pre, ft, eye, alpha=alpha / alpha.sum(), rtol=1e-12)
    assert int(res.info.solver) == SOLVER_CG
    chex.assert_trees_all_close(
        res.params, task_arithmetic(pre, ft, alpha / alpha.sum()), rtol=1e-9
    )


def test_mats_identity_curvature_is_average():
    rng = np.random.default_rng(7)
    pre = _flax_params(rng)
    ft = [jax.tree_util.tree_map(lambda x: x + rng.normal(size=x.shape), pre) for _ in range(3)]
    w = np.array([1.0, 2.0, 3.0])
    got = mats(pre, ft, [1.0, 1.0, 1.0], weights=w, rtol=1e-12).params
    chex.assert_trees_all_close(got, average(ft, w), rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Null space, maxiter=0, jit.


@pytest.mark.parametrize(
    ("init", "preconditioner"), [("task_arithmetic", "jacobi"), ("average", None)]
)
def test_null_space_keeps_init(init, preconditioner):
    # No task's data touches b: every H_t has zero rows/columns there.
    tasks = _Tasks(seed=8, zero_b=True)
    with_diag = preconditioner == "jacobi"
    ops = tasks.operators(with_diag=with_diag)
    res = mats(
        tasks.pretrained, tasks.finetuned, ops, init=init, preconditioner=preconditioner, **SOLVE
    )
    assert bool(res.info["converged"])
    init_point = {
        "task_arithmetic": task_arithmetic(tasks.pretrained, tasks.finetuned, 1.0),
        "average": average(tasks.finetuned),
    }[init]
    np.testing.assert_allclose(res.params["b"], init_point["b"], rtol=1e-14)
    # w is the joint least-squares optimum over w alone.
    want_w = np.linalg.lstsq(np.concatenate(tasks.xw), np.concatenate(tasks.y), rcond=None)[0]
    _assert_rel(res.params["w"], want_w)
    # gradient matching: untouched parameters keep task arithmetic.
    ops = tasks.operators(with_diag=False)
    gm = gradient_matching(tasks.pretrained, tasks.finetuned, ops, alpha=0.5, **SOLVE)
    ta = task_arithmetic(tasks.pretrained, tasks.finetuned, 0.5)
    np.testing.assert_allclose(gm.params["b"], ta["b"], rtol=1e-14)


def test_null_space_diagonal_keeps_init():
    rng = np.random.default_rng(9)
    pre = {"a": jnp.asarray(rng.normal(size=6)), "c": jnp.asarray(rng.normal(size=(2, 3)))}
    ft = [jax.tree_util.tree_map(lambda x: x + rng.normal(size=x.shape), pre) for _ in range(2)]
    zero = np.array([1, 0, 1, 1, 0, 1.0])
    fish = [{"a": jnp.asarray(zero * rng.uniform(1, 2, 6)), "c": jnp.ones((2, 3))} for _ in ft]
    res = mats(pre, ft, fish, init="task_arithmetic", rtol=1e-12)
    ta = task_arithmetic(pre, ft, 1.0)
    np.testing.assert_array_equal(
        np.asarray(res.params["a"])[zero == 0], np.asarray(ta["a"])[zero == 0]
    )
    gm = gradient_matching(pre, ft, fish, alpha=0.7)
    ta = task_arithmetic(pre, ft, 0.7)
    np.testing.assert_array_equal(
        np.asarray(gm.params["a"])[zero == 0], np.asarray(ta["a"])[zero == 0]
    )
    assert bool(gm.info.converged)


@pytest.mark.parametrize("init", ["task_arithmetic", "average", "pretrained", "fisher", "pytree"])
def test_maxiter_zero_returns_init_exactly(init):
    tasks = _Tasks(seed=10)
    ops = tasks.operators(with_diag=True)
    pytree_init = _unflat(np.arange(7.0), tasks.d1)
    expected = {
        "task_arithmetic": task_arithmetic(tasks.pretrained, tasks.finetuned, 0.3),
        "average": average(tasks.finetuned),
        "pretrained": tasks.pretrained,
        "fisher": fisher_merge(tasks.finetuned, [op.diag_tree for op in ops]),
        "pytree": pytree_init,
    }[init]
    res = mats(
        tasks.pretrained,
        tasks.finetuned,
        ops,
        init=pytree_init if init == "pytree" else init,
        init_alpha=0.3,
        maxiter=0,
    )
    assert int(res.info["num_steps"]) == 0
    chex.assert_trees_all_close(res.params, expected, rtol=1e-14, atol=0)
    np.testing.assert_allclose(res.info["objective"], res.info["objective_init"], rtol=1e-15)


class JitTest(chex.TestCase):
    """Each merge jitted whole (operators, weights, α, δ traced) equals the eager call."""

    def _check(self, fn, *args):
        eager = fn(*args)
        jitted = self.variant(fn)(*args)
        chex.assert_trees_all_close(jitted.params, eager.params, rtol=1e-10, atol=1e-12)
        assert type(jitted.info) is type(eager.info)
        for k in eager.info._fields:
            if k in ("solver", "status", "converged", "num_steps"):
                assert int(jitted.info[k]) == int(eager.info[k]), k
            else:
                np.testing.assert_allclose(jitted.info[k], eager.info[k], rtol=1e-8, atol=1e-12)

    @chex.variants(with_jit=True)
    def test_mats_matrix_free(self):
        tasks = _Tasks(seed=11)
        fn = lambda p, f, c, w: mats(p, f, c, weights=w, init="pretrained", **SOLVE)
        self._check(fn, tasks.pretrained, tasks.finetuned, tasks.operators(True), jnp.ones(3))

    @chex.variants(with_jit=True)
    def test_gradient_matching_cg(self):
        tasks = _Tasks(seed=13)
        fn = lambda p, f, c, a, d, n: gradient_matching(
            p, f, c, alpha=a, prior=d, dataset_sizes=n, **SOLVE
        )
        alpha, sizes = jnp.array([0.3, 0.5, 0.9]), jnp.array([1.0, 2.0, 3.0])
        self._check(fn, tasks.pretrained, tasks.finetuned, tasks.operators(), alpha, 0.2, sizes)

    @chex.variants(with_jit=True)
    def test_gradient_matching_closed_form(self):
        tasks = _Tasks(seed=13)
        fn = lambda p, f, c, a, d: gradient_matching(p, f, c, alpha=a, prior=d, dataset_sizes=2.0)
        diags = [_unflat(np.diag(h), tasks.d1) for h in tasks.hessians]
        self._check(fn, tasks.pretrained, tasks.finetuned, diags, jnp.array([0.3, 0.5, 0.9]), 0.2)


# ---------------------------------------------------------------------------------------------
# A real Flax MLP, matrix-free Fisher / GGN curvature.


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(6)(x)))


def _xent(logits, batch):
    y = batch[1]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1))


def test_flax_mlp_end_to_end_fisher_and_ggn():
    model = _MLP()
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.normal(size=(16, 4))) for _ in range(2)]
    ys = [jnp.asarray(rng.integers(0, 3, size=16)) for _ in range(2)]
    params = jax.jit(model.init)(jax.random.PRNGKey(0), xs[0])  # linen's float32 params
    pre = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float64)), params)
    ft = [
        jax.tree_util.tree_map(
            lambda a: jnp.asarray(np.asarray(a) + 0.3 * rng.normal(size=a.shape)), pre
        )
        for _ in range(2)
    ]
    logits_fn = model.apply
    fisher = [fisher_operator(logits_fn, p, x) for p, x in zip(ft, xs, strict=True)]
    model_fn = lambda p, b: model.apply(p, b[0])
    ggn = [ggn_operator(model_fn, _xent, p, (x, y)) for p, x, y in zip(ft, xs, ys, strict=True)]

    damping = 1e-3
    res = mats(pre, ft, fisher, damping=damping, maxiter=500, rtol=1e-10)
    # Converged: the true residual ‖b − (Σ_t F_t + δI) θ‖ (recomputed by cg) is below tolerance.
    assert bool(res.info["converged"])
    assert int(res.info["num_steps"]) > 0
    chex.assert_tree_all_finite(res.params)
    assert float(res.info["objective"]) < float(res.info["objective_init"])
    gm = gradient_matching(
        pre, ft, ggn, alpha=0.5, prior=1e-2, dataset_sizes=16, maxiter=500, rtol=1e-10
    )
    assert int(gm.info.solver) == SOLVER_CG and bool(gm.info["converged"])
    chex.assert_trees_all_equal_shapes_and_dtypes(gm.params, pre)


# ---------------------------------------------------------------------------------------------
# Bad inputs.


def test_bad_inputs_raise_clear_errors():
    tasks = _Tasks(seed=14)
    pre, ft = tasks.pretrained, tasks.finetuned
    ops = tasks.operators()
    with pytest.raises(ValueError, match=r"Got 2 curvatures for 3"):
        mats(pre, ft, ops[:2])
    with pytest.raises(ValueError, match=r"Got 2 curvatures for 3"):
        gradient_matching(pre, ft, ops[:2])
    bad = [_unflat(np.ones(7), tasks.d1) for _ in range(3)]
    bad[1] = {"w": jnp.ones(4), "b": jnp.ones(2)}
    with pytest.raises(TreeMismatchError, match=r"curvatures\[1\]\['b'\]"):
        mats(pre, ft, bad)
    with pytest.raises(TreeMismatchError, match=r"curvatures\[1\]\['b'\]"):
        gradient_matching(pre, ft, bad)
    with pytest.raises(ValueError, match=r"Unknown init 'tsk_arithmetic'"):
        mats(pre, ft, ops, init="tsk_arithmetic")
    with pytest.raises(ValueError, match=r"init='fisher' needs the diagonal.*curvatures\[0\]"):
        mats(pre, ft, ops, init="fisher")
