"""The merges and transforms of basic.py, sparse.py and closed_form.py inside jit, vmap, grad.

Each function runs in three traced modes, compared with its eager result: jitted with every
array passed as an argument, jitted with the models closed over, and vmapped over a
hyperparameter (α, the weights, DARE's density, or a scale of the input). Gradients with
respect to α and the weights match central finite differences in float64. Checks that need
values run eagerly on concrete (also closed-over) inputs and at run time on traced ones: a
RuntimeWarning, and a checkify error under ``checkify.checkify``.

Compile counts dominate the time: one small pytree, one compiled program per case and mode.
"""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

import jmerge
from jmerge.merges import task_vectors
from jmerge.merges.sparse import disjoint_mean, drop_and_rescale, elect_sign, trim_topk

T = 3
SHAPES = {"k": (3, 4), "b": (4,)}
tmap = jax.tree_util.tree_map


def _tree(rng, shapes=SHAPES):
    return {n: jnp.asarray(rng.normal(size=s)) for n, s in shapes.items()}


def _data(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    p0 = _tree(rng, shapes)
    fts = [_tree(rng, shapes) for _ in range(T)]
    fishers = [tmap(lambda x: x**2 + 0.1, _tree(rng, shapes)) for _ in range(T)]
    d_in = shapes["k"][0]
    grams = []
    for _ in range(T):
        x = rng.normal(size=(d_in + 2, d_in))
        grams.append({"['k']": jnp.asarray(x.T @ x)})
    return {
        "p0": p0,
        "fts": fts,
        "fishers": fishers,
        "grams": grams,
        "key": jax.random.key(0),
        "tvs": task_vectors(p0, fts),
    }


D = _data()
W = np.array([[1.0, 2.0, 0.5], [0.2, 0.2, 1.0]])  # two weight vectors (T,)
A = np.array([0.3, -0.8])  # two values of a scalar hyperparameter
S = np.array([0.5, -2.0])  # two scales of an input

# name -> (f(h, data), values of h): h is the hyperparameter vmapped over.
CASES = {
    "average": (lambda w, d: jmerge.average(d["fts"], weights=w, pretrained=d["p0"]), W),
    "task_arithmetic": (lambda a, d: jmerge.task_arithmetic(d["p0"], d["fts"], alpha=a), A),
    "negation": (lambda a, d: jmerge.negation(d["p0"], d["fts"], alpha=a), A),
    "ties": (lambda a, d: jmerge.ties(d["p0"], d["fts"], density=0.5, alpha=a), A),
    "dare": (
        lambda a, d: jmerge.dare(d["p0"], d["fts"], density=0.7, key=d["key"], alpha=a),
        A,
    ),
    "dare_ties": (
        lambda a, d: jmerge.dare_ties(d["p0"], d["fts"], density=0.7, key=d["key"], alpha=a),
        A,
    ),
    "fisher_merge": (lambda w, d: jmerge.fisher_merge(d["fts"], d["fishers"], weights=w), W),
    "regmean": (
        lambda w, d: jmerge.regmean(d["fts"], d["grams"], weights=w, alpha=0.7),
        W,
    ),
    "task_vectors": (lambda s, d: task_vectors(tmap(lambda x: s * x, d["p0"]), d["fts"]), S),
    "trim_topk": (lambda s, d: trim_topk(tmap(lambda x: s * x, d["tvs"]), 0.5), S),
    "drop_and_rescale": (
        lambda p, d: drop_and_rescale(d["tvs"], p, d["key"]),
        np.array([0.5, 0.9]),
    ),
    "elect_sign": (lambda s, d: elect_sign(tmap(lambda x: s * x, d["tvs"])), S),
    "disjoint_mean": (
        lambda s, d: disjoint_mean(tmap(lambda x: s * x, d["tvs"]), elect_sign(d["tvs"])),
        S,
    ),
}


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("mode", ["jit_args", "jit_closed", "vmap"])
@pytest.mark.parametrize("name", list(CASES))
def test_traced_equals_eager(name, mode):
    f, hs = CASES[name]
    want = [f(h, D) for h in hs]
    if mode == "jit_args":  # models, curvatures, key and h all traced
        got = [jax.jit(f)(jnp.asarray(h), D) for h in hs]
    elif mode == "jit_closed":  # h traced; models, curvatures and key closed over (concrete)
        jf = jax.jit(lambda h: f(h, D))
        got = [jf(jnp.asarray(h)) for h in hs]
    else:  # h batched, the rest closed over
        got = jax.vmap(lambda h: f(h, D))(jnp.asarray(hs))
        want = tmap(lambda *xs: jnp.stack(xs), *want)
    chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-12)
    jax.effects_barrier()


def _fd_check(loss, x, h=1e-6, rtol=1e-6):
    """jax.grad(loss)(x), also jitted, against central differences, per entry of x."""
    x = jnp.asarray(x, jnp.float64)
    g = jax.grad(loss)(x)
    chex.assert_trees_all_close(jax.jit(jax.grad(loss))(x), g, rtol=1e-12)
    e = np.eye(x.size).reshape(x.size, *x.shape)
    fd = np.array([(loss(x + h * ei) - loss(x - h * ei)) / (2 * h) for ei in e]).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(g), fd, rtol=rtol, atol=1e-9)


def _loss(f):
    """A scalar of the merged tree: ⟨c, f(h)⟩ with a fixed random cotangent c."""
    rng = np.random.default_rng(7)
    c = tmap(lambda x: jnp.asarray(rng.normal(size=x.shape)), D["p0"])
    leaves = jax.tree_util.tree_leaves
    return lambda h: sum(jnp.vdot(a, b) for a, b in zip(leaves(c), leaves(f(h)), strict=True))


@pytest.mark.parametrize(
    "name, x",
    [
        ("task_arithmetic", 0.3),
        ("task_arithmetic", [0.3, -0.2, 1.1]),
        ("average", W[0]),
        ("fisher_merge", W[0]),
        ("regmean", W[0]),
    ],
)
def test_grad_matches_finite_differences(name, x):
    f, _ = CASES[name]
    _fd_check(_loss(lambda h: f(h, D)), x)


# ---- checks of values: eager when concrete, at run time when traced -------------------------

ZERO_SUM = {
    "average": np.array([1.0, -1.0, 0.0]),
    "fisher_merge": np.zeros(T),
    "regmean": np.zeros(T),
}


@pytest.mark.filterwarnings("ignore:.*result is not finite:RuntimeWarning")
@pytest.mark.parametrize("name", list(ZERO_SUM))
def test_zero_sum_weights(name):
    f, _ = CASES[name]
    w = ZERO_SUM[name]
    with pytest.raises(ValueError, match="sum to zero"):  # eager
        f(w, D)
    with pytest.raises(ValueError, match="sum to zero"):  # closed over inside jit
        jax.jit(lambda: f(w, D))()
    jf = jax.jit(f)
    with pytest.warns(RuntimeWarning, match="sum to zero"):
        out = jf(jnp.asarray(w), D)
        jax.effects_barrier()
    assert all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree_util.tree_leaves(out))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        err, _ = checkify.checkify(jf, errors=checkify.user_checks)(jnp.asarray(w), D)
        jax.effects_barrier()
    with pytest.raises(checkify.JaxRuntimeError, match="sum to zero"):
        err.throw()


def test_traced_nan_input_warns_with_leaf_path():
    p0 = dict(D["p0"], b=D["p0"]["b"].at[1].set(jnp.nan))
    ta = jax.jit(jmerge.task_arithmetic)
    with pytest.warns(RuntimeWarning, match=r"task_arithmetic result\['b'\]") as rec:
        ta(p0, D["fts"], 0.5)
        jax.effects_barrier()
    assert not any("['k']" in str(r.message) for r in rec)
    fishers = [D["fishers"][0], dict(D["fishers"][1], k=D["fishers"][1]["k"].at[0, 0].set(np.inf))]
    fishers.append(D["fishers"][2])
    fm = jax.jit(lambda f: jmerge.fisher_merge(D["fts"], f))
    with pytest.warns(RuntimeWarning, match=r"fisher_merge result\['k'\]"):
        fm(fishers)
        jax.effects_barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        err, _ = checkify.checkify(fm, errors=checkify.user_checks)(fishers)
        jax.effects_barrier()
    with pytest.raises(checkify.JaxRuntimeError, match="fisher_merge result has NaN or Inf"):
        err.throw()
    # Concrete (closed-over) inputs are still checked eagerly, naming the model and leaf.
    with pytest.raises(jmerge.tree.NonFiniteError, match=r"fishers\[1\]\['k'\] is not finite"):
        jax.jit(lambda a: jmerge.fisher_merge(D["fts"], fishers, weights=a))(np.ones(T))


def test_negative_fishers_weights_and_density():
    neg = [D["fishers"][0], dict(D["fishers"][1], b=-D["fishers"][1]["b"]), D["fishers"][2]]
    fm = lambda f, w: jmerge.fisher_merge(D["fts"], f, weights=w)
    with pytest.raises(ValueError, match=r"fishers\[1\]\['b'\] has negative entries"):
        jax.jit(lambda w: fm(neg, w))(np.ones(T))  # closed over: checked eagerly
    with pytest.warns(RuntimeWarning, match="fishers has negative entries"):
        jax.jit(fm)(neg, np.ones(T))
        jax.effects_barrier()
    with pytest.warns(RuntimeWarning, match="weights must be non-negative"):
        jax.jit(fm)(D["fishers"], jnp.array([1.0, -0.5, 1.0]))
        jax.effects_barrier()
    dare = jax.jit(lambda p: jmerge.dare(D["p0"], D["fts"], density=p, key=D["key"]))
    with pytest.warns(RuntimeWarning, match=r"density must be in \(0, 1\]"):
        dare(1.5)
        jax.effects_barrier()


@settings(deadline=None, max_examples=3)
@given(
    k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    seed=st.integers(0, 99),
    alpha=st.floats(-2.0, 2.0),
)
def test_random_shapes_jit_equals_eager(k, seed, alpha):
    d = _data(seed, {"k": k, "b": (k[1],)})
    for name, h in (("task_arithmetic", alpha), ("fisher_merge", W[1]), ("regmean", W[1])):
        f, _ = CASES[name]
        chex.assert_trees_all_close(jax.jit(f)(jnp.asarray(h), d), f(h, d), rtol=1e-12)
