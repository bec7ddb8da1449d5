"""output_matching against independent references.

* Softmax regression (logits = x W + b): L is convex, so its minimiser is unique; the
  reference is SciPy's L-BFGS on a NumPy float64 implementation of L and its gradient
  (no JAX), and the Gauss-Newton merge must reach the same parameters and objective.
* A two-layer model with per-task heads (``exclude``): the objective equals a NumPy
  computation where task t's term uses θ_t's head; Levenberg-Marquardt never raises L.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from jmerge.merges import output_matching
from jmerge.merges.output_matching import kl_objective
from jmerge.tree import NonFiniteError, TreeMismatchError, leaf_mask


def _linear(params, x):
    return x @ params["w"] + params["b"]


def _softmax_np(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _problem(seed, d, c, t, n, spread=1.0):
    rng = np.random.default_rng(seed)
    base = {"w": rng.normal(size=(d, c)), "b": rng.normal(size=(c,)) * 0.1}
    models = [
        {k: v + spread * rng.normal(size=v.shape) for k, v in base.items()} for _ in range(t)
    ]
    inputs = [rng.normal(size=(n, d)) for _ in range(t)]
    return base, models, inputs


def _reference_softmax_regression(models, inputs, weights):
    """argmin_θ Σ_t w_t mean_n KL(p_t ‖ p_θ) by L-BFGS, float64 NumPy (gradient by hand)."""
    d, c = models[0]["w"].shape
    targets = [_softmax_np(x @ m["w"] + m["b"]) for m, x in zip(models, inputs, strict=True)]

    def f(flat):
        w, b = flat[: d * c].reshape(d, c), flat[d * c :]
        val, gw, gb = 0.0, np.zeros_like(w), np.zeros_like(b)
        for wt, x, p in zip(weights, inputs, targets, strict=True):
            q = _softmax_np(x @ w + b)
            val += wt * np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))
            r = wt * (q - p) / x.shape[0]  # d/dz of the mean KL
            gw += x.T @ r
            gb += r.sum(0)
        return val, np.concatenate([gw.ravel(), gb])

    x0 = np.concatenate([np.mean([m["w"] for m in models], 0).ravel(),
                         np.mean([m["b"] for m in models], 0)])
    res = minimize(f, x0, jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15,
                                                                "maxiter": 5000})
    return {"w": res.x[: d * c].reshape(d, c), "b": res.x[d * c :]}, res.fun


@settings(max_examples=6, deadline=None)
@given(
    d=st.integers(2, 6),
    c=st.integers(2, 5),
    t=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_gauss_newton_reaches_the_convex_minimiser(d, c, t, seed):
    base, models, inputs = _problem(seed, d, c, t, n=24)
    weights = np.random.default_rng(seed + 1).uniform(0.5, 2.0, t)
    ref, ref_value = _reference_softmax_regression(models, inputs, weights)
    res = output_matching(_linear, base, models, inputs, weights=weights, steps=40,
                          cg_maxiter=50, cg_rtol=1e-8)
    assert float(res.info.objective) <= ref_value + 1e-9
    assert float(res.info.objective) <= float(res.info.objective_init)
    # The minimiser is unique up to a shift of all logits by the same amount per class
    # direction: compare the predictions, then the parameters' class-centred values.
    for x in inputs:
        chex.assert_trees_all_close(
            _softmax_np(np.asarray(_linear(res.params, x))), _softmax_np(_linear(ref, x)),
            atol=2e-5,
        )
    centre = lambda a: a - a.mean(-1, keepdims=True)  # noqa: E731
    chex.assert_trees_all_close(
        jax.tree.map(centre, res.params), jax.tree.map(centre, ref), atol=2e-3, rtol=2e-3
    )


def test_ggn_product_equals_dense_numpy_ggn():
    """Σ_t w_t G_t(θ) v of the Gauss-Newton steps against G built from the analytic Jacobian of
    softmax regression in NumPy: J_n[c, (i, c')] = x_ni δ_cc', J_n[c, b_c'] = δ_cc'."""
    from jmerge.merges.output_matching import _ggn_mv, _Problem

    d, c, t, n = 4, 3, 2, 9
    base, models, inputs = _problem(5, d, c, t, n)
    theta = jax.tree.map(lambda *a: np.mean(a, 0), *models)
    v = {"w": np.random.default_rng(1).normal(size=(d, c)),
         "b": np.random.default_rng(2).normal(size=(c,))}
    weights = np.array([0.3, 1.7])
    mask = leaf_mask(base)
    prob = _Problem(tuple(models), tuple(inputs), (None,) * t, jnp.asarray(weights))
    got = _ggn_mv(_linear, mask, prob, theta, v)
    g = np.zeros((d * c + c, d * c + c))
    for wt, x in zip(weights, inputs, strict=True):
        p = _softmax_np(np.asarray(_linear(theta, x)))
        for xn, pn in zip(x, p, strict=True):
            dw = np.einsum("i,cd->cid", xn, np.eye(c)).reshape(c, d * c)  # W row-major
            jac = np.concatenate([dw, np.eye(c)], axis=1)
            h = np.diag(pn) - np.outer(pn, pn)
            g += wt * jac.T @ h @ jac / n
    want = g @ np.concatenate([v["w"].ravel(), v["b"]])
    np.testing.assert_allclose(
        np.concatenate([np.asarray(got["w"]).ravel(), np.asarray(got["b"])]), want, rtol=1e-10,
        atol=1e-12,
    )


def test_identical_models_are_a_fixed_point():
    base, models, inputs = _problem(0, 4, 3, 1, n=16)
    models = models * 3
    res = output_matching(_linear, base, models, [inputs[0]] * 3, steps=5)
    chex.assert_trees_all_close(res.params, models[0], atol=1e-12)
    assert float(res.info.objective) == pytest.approx(0.0, abs=1e-12)


def _two_layer(params, x):
    h = jnp.tanh(x @ params["body"]["w"] + params["body"]["b"])
    return h @ params["head"]["w"]


def _two_layer_models(seed=0, t=3, d=5, hdim=7, c=4):
    rng = np.random.default_rng(seed)
    base = {
        "body": {"w": rng.normal(size=(d, hdim)) / np.sqrt(d), "b": np.zeros(hdim)},
        "head": {"w": rng.normal(size=(hdim, c)) / np.sqrt(hdim)},
    }
    models = [jax.tree.map(lambda a: a + 0.5 * rng.normal(size=a.shape), base) for _ in range(t)]
    inputs = [rng.normal(size=(20, d)) for _ in range(t)]
    return base, models, inputs


def test_objective_uses_each_tasks_own_excluded_leaves():
    base, models, inputs = _two_layer_models()
    theta = jax.tree.map(lambda *a: np.mean(a, 0), *models)
    mask = leaf_mask(base, exclude=r"head")
    got = float(kl_objective(_two_layer, theta, models, inputs, weights=[1.0, 2.0, 0.5],
                             mask=mask))

    def np_logits(p, x):
        return np.tanh(x @ p["body"]["w"] + p["body"]["b"]) @ p["head"]["w"]

    want = 0.0
    for wt, m, x in zip([1.0, 2.0, 0.5], models, inputs, strict=True):
        p = _softmax_np(np_logits(m, x))
        q = _softmax_np(np_logits({"body": theta["body"], "head": m["head"]}, x))
        want += wt * np.mean(np.sum(p * np.log(p / q), -1))
    assert got == pytest.approx(want, rel=1e-10)


def test_levenberg_marquardt_never_raises_the_objective_and_keeps_heads():
    base, models, inputs = _two_layer_models(seed=1)
    res = output_matching(_two_layer, base, models, inputs, exclude=r"head", steps=15)
    hist = np.asarray(res.info.history)
    assert hist.shape == (15,)
    assert np.all(np.diff(hist) <= 1e-12) and hist[0] <= float(res.info.objective_init)
    assert float(res.info.objective) < 0.5 * float(res.info.objective_init)
    assert int(res.info.num_accepted) >= 1 and int(res.info.cg_steps) > 0
    chex.assert_trees_all_equal(res.params["head"], base["head"])
    # The reported objective is the objective of the returned parameters.
    mask = leaf_mask(base, exclude=r"head")
    assert float(res.info.objective) == pytest.approx(
        float(kl_objective(_two_layer, res.params, models, inputs, mask=mask)), rel=1e-9
    )


def test_optax_solver_and_jit_agree_with_eager():
    base, models, inputs = _two_layer_models(seed=2)
    res = output_matching(_two_layer, base, models, inputs, exclude="head", steps=50,
                          solver=optax.adam(1e-2))
    assert float(res.info.objective) < float(res.info.objective_init)
    assert int(res.info.num_accepted) == 50

    @jax.jit
    def merged(base, models, inputs):
        return output_matching(_two_layer, base, models, inputs, exclude="head", steps=6)

    eager = output_matching(_two_layer, base, models, inputs, exclude="head", steps=6)
    jitted = merged(base, models, inputs)
    # Two compiled programs (XLA may order the sums differently); CG at rtol 1e-3 carries
    # the rounding differences into the steps, so agreement is to ~1e-6, not to the ulp.
    chex.assert_trees_all_close(jitted.params, eager.params, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(jitted.info.history, eager.info.history, rtol=1e-6)


def test_tasks_scanned_or_unrolled_give_the_same_merge():
    """Inputs of one shape and dtype run the tasks in a lax.scan; mixed ones unroll them.
    The same data both ways (float32-exact inputs, one task's given as float32) must agree."""
    base, models, inputs = _two_layer_models(seed=4)
    inputs = [np.asarray(np.float32(x), np.float64) for x in inputs]
    mixed = [inputs[0].astype(np.float32), *inputs[1:]]
    scanned = output_matching(_two_layer, base, models, inputs, exclude="head", steps=5)
    unrolled = output_matching(_two_layer, base, models, mixed, exclude="head", steps=5)
    chex.assert_trees_all_close(unrolled.params, scanned.params, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(unrolled.info.history, scanned.info.history, rtol=1e-6)
    assert float(scanned.info.objective) < float(scanned.info.objective_init)


def test_warm_start_continues_where_it_stopped():
    base, models, inputs = _two_layer_models(seed=3)
    first = output_matching(_two_layer, base, models, inputs, steps=4)
    more = output_matching(_two_layer, base, models, inputs, init=first.params, steps=4,
                           damping=float(first.info.damping))
    assert float(more.info.objective_init) == pytest.approx(float(first.info.objective))
    assert float(more.info.objective) <= float(first.info.objective)


def test_bad_input_is_named():
    base, models, inputs = _two_layer_models()
    with pytest.raises(ValueError, match="one batch per model"):
        output_matching(_two_layer, base, models, inputs[:2])
    with pytest.raises(ValueError, match=r"one batch per model \(3\); got 2"):
        kl_objective(_two_layer, base, models, inputs[:2])
    with pytest.raises(ValueError, match="one entry per model"):
        output_matching(_two_layer, base, models, inputs, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="steps"):
        output_matching(_two_layer, base, models, inputs, steps=-1)
    with pytest.raises(ValueError, match="damping"):
        output_matching(_two_layer, base, models, inputs, damping=0.0)
    with pytest.raises(ValueError, match="solver"):
        output_matching(_two_layer, base, models, inputs, solver="newton")
    bad = [dict(m) for m in models]
    bad[1] = {"body": bad[1]["body"], "head": {"w": np.zeros((3, 4))}}
    with pytest.raises(TreeMismatchError, match=r"finetuned\[1\].*head.*w"):
        output_matching(_two_layer, base, bad, inputs)
    with pytest.raises(TreeMismatchError, match=r"\['head'\]\['w'\]"):
        output_matching(_two_layer, base, models, inputs, init={**base, "head": {"w": np.ones(2)}})
    nan_inputs = list(inputs)
    nan_inputs[2] = np.where(np.arange(nan_inputs[2].size).reshape(nan_inputs[2].shape) == 3,
                             np.nan, nan_inputs[2])
    with pytest.raises(NonFiniteError, match=r"inputs\[2\]"):
        output_matching(_two_layer, base, models, nan_inputs)
