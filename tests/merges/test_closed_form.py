"""fisher_merge and regmean against numpy references (loops, numpy.linalg.solve)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jmerge
from jmerge.merges.closed_form import fisher_merge, regmean
from jmerge.tree import NonFiniteError, TreeMismatchError

T = 3
K0, K1 = "['params']['Dense_0']['kernel']", "['params']['Dense_1']['kernel']"


def _flax_params(rng, d_in=4, hidden=5, d_out=3, dtype=np.float64):
    def dense(i, o):
        return {
            "kernel": jnp.asarray(rng.normal(size=(i, o)), dtype),
            "bias": jnp.asarray(rng.normal(size=o), dtype),
        }

    return {"params": {"Dense_0": dense(d_in, hidden), "Dense_1": dense(hidden, d_out)}}


def _leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]


def _close(tree, ref_leaves, rtol=1e-9, atol=1e-12):
    for g, r in zip(_leaves(tree), ref_leaves, strict=True):
        np.testing.assert_allclose(g, r, rtol=rtol, atol=atol)


# ---- Fisher merging ----


def _fisher_setup(seed=0, shapes=None):
    rng = np.random.default_rng(seed)
    shapes = shapes or {"a": (4, 5), "b": (5,), "head": (5, 2)}
    tree = lambda f: {k: jnp.asarray(f(s)) for k, s in shapes.items()}
    models = [tree(lambda s: rng.normal(size=s)) for _ in range(T)]
    fishers = [tree(lambda s: rng.uniform(0.0, 2.0, size=s) ** 2) for _ in range(T)]
    return models, fishers


def _np_fisher(models, fishers, w, eps=1e-12, relative=True):
    """Loops; a relative eps is eps · (mean of Σ_t w_t F_t over every entry)."""
    w = np.asarray(w, np.float64) / np.sum(w)
    if relative:
        per = [_leaves(f) for f in fishers]
        tot = [sum(w[t] * p[j] for t, p in enumerate(per)).ravel() for j in range(len(per[0]))]
        eps = eps * np.mean(np.concatenate(tot))
    out = []
    for j in range(len(_leaves(models[0]))):
        xs = [_leaves(m)[j] for m in models]
        fs = [_leaves(f)[j] for f in fishers]
        res = np.zeros_like(xs[0])
        for idx in np.ndindex(*xs[0].shape):
            den = sum(w[t] * fs[t][idx] for t in range(len(xs)))
            if den > eps:
                res[idx] = sum(w[t] * fs[t][idx] * xs[t][idx] for t in range(len(xs))) / den
            else:
                res[idx] = sum(w[t] * xs[t][idx] for t in range(len(xs)))
        out.append(res)
    return out


# ---- RegMean ----


def _regmean_setup(seed=0, n=20):
    rng = np.random.default_rng(seed)
    pre = _flax_params(rng)
    models = [_flax_params(rng) for _ in range(T)]
    grams = []
    for _ in range(T):
        x0, x1 = rng.normal(size=(n, 4)), rng.normal(size=(n, 5))
        grams.append({K0: jnp.asarray(x0.T @ x0), K1: jnp.asarray(x1.T @ x1)})
    return pre, models, grams


def _np_regmean(models, grams, alpha, w, ridge, relative=True):
    """Kernels: (Σ w G̃ + λI)⁻¹ (Σ w G̃ W + λ W̄), λ = ridge · tr/d (relative) or ridge;
    other leaves: weighted average."""
    w = np.asarray(w, np.float64) / np.sum(w)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(models[0])]
    out = []
    for j, path in enumerate(paths):
        ws = [_leaves(m)[j] for m in models]
        avg = sum(w[t] * ws[t] for t in range(len(ws)))
        if path not in grams[0]:
            out.append(avg)
            continue
        d = np.shape(grams[0][path])[0]
        a, b = np.zeros((d, d)), np.zeros((d, ws[0].size // d))
        for t in range(len(ws)):
            g = np.asarray(grams[t][path], np.float64)
            gt = alpha * g + (1 - alpha) * np.diag(np.diag(g))
            a += w[t] * gt
            b += w[t] * gt @ ws[t].reshape(d, -1)
        lam = ridge * np.trace(a) / d if relative else ridge
        out.append(
            np.linalg.solve(a + lam * np.eye(d), b + lam * avg.reshape(d, -1)).reshape(ws[0].shape)
        )
    return out


class ClosedFormTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_fisher_merge_with_eps_fallback(self):
        models, fishers = _fisher_setup()
        fa = np.array(fishers[0]["a"])
        for t, f in enumerate(fishers):  # entries no model informs: the weighted average
            f["a"] = f["a"].at[0, :2].set(0.0).at[1, 1].set(1e-10 * (t + 1) ** 2)
        assert not np.array_equal(fa, fishers[0]["a"])
        w = np.array([1.0, 2.0, 0.5])
        # eps was an absolute cut-off; it is relative to the mean Fisher now, absolute on request.
        got = self.variant(fisher_merge)(models, fishers, weights=w, eps=jmerge.absolute(1e-8))
        ref = _np_fisher(models, fishers, w, 1e-8, relative=False)
        _close(got, ref)
        avg = sum(w[t] * np.asarray(models[t]["a"]) for t in range(T)) / w.sum()
        np.testing.assert_allclose(got["a"][0, :2], avg[0, :2], rtol=1e-12)
        np.testing.assert_allclose(got["a"][1, 1], avg[1, 1], rtol=1e-12)
        _close(
            self.variant(fisher_merge)(models, fishers, weights=w, eps=1e-8),
            _np_fisher(models, fishers, w, 1e-8),
        )
        # The default (relative 1e-12) averages the exact zeros only here.
        got = self.variant(fisher_merge)(models, fishers)
        _close(got, _np_fisher(models, fishers, [1] * T))
        assert not np.allclose(got["a"][1, 1], np.mean([m["a"][1, 1] for m in models]))

    @chex.variants(with_jit=True, without_jit=True)
    def test_regmean_matches_numpy_solve(self):
        pre, models, grams = _regmean_setup()
        fn = self.variant(regmean)
        for alpha, w in ((1.0, [1.0, 1.0, 1.0]), (0.6, [1.0, 2.0, 0.5])):
            got = fn(models, grams, alpha=alpha, weights=np.array(w), pretrained=pre)
            _close(got, _np_regmean(models, grams, alpha, w, 1e-6), rtol=1e-8)
        # ridge=0 is exactly RegMean's closed form.
        got = fn(models, grams, alpha=0.6, ridge=0.0)
        _close(got, _np_regmean(models, grams, 0.6, [1.0] * T, 0.0), rtol=1e-8)


def test_fisher_filter_stacked_bf16():
    models, fishers = _fisher_setup()
    pre = jax.tree_util.tree_map(lambda x: x + 1.0, models[0])
    got = fisher_merge(models, fishers, pretrained=pre, exclude="head")
    np.testing.assert_array_equal(got["head"], pre["head"])
    got0 = fisher_merge(models, fishers, exclude="head")
    np.testing.assert_array_equal(got0["head"], models[0]["head"])
    np.testing.assert_allclose(got["a"], got0["a"])
    stack = lambda ts: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *ts)
    chex.assert_trees_all_close(
        fisher_merge(stack(models), stack(fishers)), fisher_merge(models, fishers), rtol=1e-14
    )
    m16 = [jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), m) for m in models]
    m32 = [jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), m) for m in m16]
    f32 = [jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), f) for f in fishers]
    got = fisher_merge(m16, f32)
    chex.assert_trees_all_equal_dtypes(got, m16[0])
    want = fisher_merge(m32, f32)
    chex.assert_trees_all_equal(got, jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), want))


def test_fisher_bad_inputs():
    models, fishers = _fisher_setup()
    neg = [fishers[0], dict(fishers[1], b=fishers[1]["b"].at[2].set(-1.0)), fishers[2]]
    with pytest.raises(ValueError, match=r"fishers\[1\]\['b'\] has negative entries"):
        fisher_merge(models, neg)
    nan = [fishers[0], fishers[1], dict(fishers[2], a=fishers[2]["a"].at[0, 0].set(np.nan))]
    with pytest.raises(NonFiniteError, match=r"fishers\[2\]\['a'\] is not finite"):
        fisher_merge(models, nan)
    wrong = [fishers[0], dict(fishers[1], a=jnp.ones((5, 4))), fishers[2]]
    with pytest.raises(TreeMismatchError, match=r"fishers\[1\]\['a'\] has shape"):
        fisher_merge(models, wrong)
    with pytest.raises(ValueError, match="fishers has 2 models but finetuned has 3"):
        fisher_merge(models, fishers[:2])
    bad = [models[0], {"a": models[1]["a"], "b": models[1]["b"]}, models[2]]
    with pytest.raises(TreeMismatchError, match=r"finetuned\[1\].*\['head'\]"):
        fisher_merge(bad, fishers)
    with pytest.raises(ValueError, match="non-negative"):
        fisher_merge(models, fishers, weights=[1.0, -1.0, 1.0])


def test_regmean_dead_inputs_blockgram_filter():
    pre, models, grams = _regmean_setup(seed=1)
    dead = [dict(g) for g in grams]
    for g in dead:  # input 2 of Dense_0 is zero on every example of every task
        g[K0] = g[K0].at[2, :].set(0.0).at[:, 2].set(0.0)
    got = regmean(models, dead, alpha=0.9)
    chex.assert_tree_all_finite(got)
    avg = np.mean([np.asarray(m["params"]["Dense_0"]["kernel"]) for m in models], axis=0)
    np.testing.assert_allclose(got["params"]["Dense_0"]["kernel"][2], avg[2], rtol=1e-8)
    _close(got, _np_regmean(models, dead, 0.9, [1.0] * T, 1e-6), rtol=1e-8)
    # BlockGram objects are read through their `.grams`.
    from jmerge.curvature.operators import BlockGram

    chex.assert_trees_all_close(
        regmean(models, [BlockGram(g) for g in grams], alpha=0.5), regmean(models, grams, alpha=0.5)
    )
    # Excluded leaves come from pretrained (or finetuned[0]); their Gram is ignored.
    got = regmean(models, grams, pretrained=pre, exclude="Dense_1")
    chex.assert_trees_all_equal(got["params"]["Dense_1"], pre["params"]["Dense_1"])
    got0 = regmean(models, grams, exclude="Dense_1")
    chex.assert_trees_all_equal(got0["params"]["Dense_1"], models[0]["params"]["Dense_1"])
    ref = _np_regmean(models, grams, 1.0, [1.0] * T, 1e-6)
    np.testing.assert_allclose(got["params"]["Dense_0"]["kernel"], ref[1], rtol=1e-8)
    # Stacked models give the same merge; bf16 models are solved in float32 and cast back.
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *models)
    chex.assert_trees_all_close(regmean(stacked, grams), regmean(models, grams), rtol=1e-12)
    m16 = [jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), m) for m in models]
    m32 = [jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), m) for m in m16]
    g32 = [{k: v.astype(jnp.float32) for k, v in g.items()} for g in grams]
    got = regmean(m16, g32, alpha=0.8)
    chex.assert_trees_all_equal_dtypes(got, m16[0])
    want = regmean(m32, g32, alpha=0.8)
    chex.assert_trees_all_equal(got, jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), want))


def test_regmean_bad_inputs():
    pre, models, grams = _regmean_setup()
    unknown = [grams[0], {**grams[1], "['params']['Dense_2']['kernel']": jnp.eye(4)}, grams[2]]
    with pytest.raises(TreeMismatchError, match=r"grams\[1\] has Grams for other leaves"):
        regmean(models, unknown)
    unknown = [{**g, "['params']['Dense_2']['kernel']": jnp.eye(4)} for g in grams]
    with pytest.raises(TreeMismatchError, match=r"\['Dense_2'\]\['kernel'\], which names no leaf"):
        regmean(models, unknown)
    misfit = [grams[0], {**grams[1], K0: jnp.eye(3)}, grams[2]]
    with pytest.raises(
        ValueError, match=r"grams\[1\]\['params'\]\['Dense_0'\]\['kernel'\] has d_in"
    ):
        regmean(models, misfit)
    with pytest.raises(ValueError, match="must be square"):
        regmean(models, [grams[0], {**grams[1], K0: jnp.ones((4, 5))}, grams[2]])
    with pytest.raises(ValueError, match="grams has 2 entries but finetuned has 3"):
        regmean(models, grams[:2])
    with pytest.raises(TypeError, match="one BlockGram or"):
        regmean(models, grams[0])
    wrong = [models[0], jax.tree_util.tree_map(lambda x: x, models[1]), models[2]]
    wrong[1]["params"]["Dense_1"]["kernel"] = jnp.zeros((3, 5))
    with pytest.raises(
        TreeMismatchError, match=r"finetuned\[1\]\['params'\]\['Dense_1'\]\['kernel'\] has shape"
    ):
        regmean(wrong, grams, pretrained=pre)
    with pytest.raises(ValueError, match="not finite"):
        regmean(models, [grams[0], {**grams[1], K1: grams[1][K1].at[0, 0].set(np.inf)}, grams[2]])


@settings(deadline=None, max_examples=4)
@given(
    in_dims=st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple),
    out_dims=st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple),
    num=st.integers(1, 3),
    alpha=st.floats(0.0, 1.0),
    seed=st.integers(0, 99),
)
def test_regmean_and_fisher_random_shapes(in_dims, out_dims, num, alpha, seed):
    rng = np.random.default_rng(seed)
    shape, d = in_dims + out_dims, int(np.prod(in_dims))
    models = [
        {"k": jnp.asarray(rng.normal(size=shape)), "b": jnp.asarray(rng.normal(size=out_dims))}
        for _ in range(num)
    ]
    grams = []
    for _ in range(num):
        x = rng.normal(size=(d + 3, d))
        grams.append({"['k']": jnp.asarray(x.T @ x)})
    w = rng.uniform(0.5, 2.0, size=num)
    _close(
        regmean(models, grams, alpha=alpha, weights=w), _np_regmean(models, grams, alpha, w, 1e-6)
    )
    fishers = [jax.tree_util.tree_map(lambda x: jnp.abs(x) * rng.uniform(), m) for m in models]
    _close(fisher_merge(models, fishers, weights=w), _np_fisher(models, fishers, w))


# ---- scale: relative eps / ridge, absolute on request, power-of-two rescaling ----


def test_fisher_eps_is_relative_to_the_mean_fisher():
    models = [{"x": jnp.array([0.0], jnp.float32)}, {"x": jnp.array([4.0], jnp.float32)}]
    fishers = [{"x": jnp.array([1e-9], jnp.float32)}, {"x": jnp.array([3e-9], jnp.float32)}]
    np.testing.assert_allclose(fisher_merge(models, fishers)["x"], [3.0], rtol=1e-6)
    # An absolute cut-off above the Fishers averages instead (the former default, 1e-8).
    got = fisher_merge(models, fishers, eps=jmerge.absolute(1e-8))
    np.testing.assert_allclose(got["x"], [2.0], rtol=1e-6)
    got = fisher_merge(models, fishers, eps=jmerge.absolute(1e-10))
    np.testing.assert_allclose(got["x"], [3.0], rtol=1e-6)
    # Relative: entries below eps · mean(Σ_t w_t F_t) fall back, over all merged leaves.
    m2 = [dict(m, y=jnp.array([1.0, 2.0], jnp.float32) * (t + 1)) for t, m in enumerate(models)]
    f2 = [dict(f, y=jnp.array([1.0, 1.0], jnp.float32)) for f in fishers]
    got = fisher_merge(m2, f2, eps=1e-6)  # mean ≈ 2/3: the x entry (2e-9) is uninformed
    np.testing.assert_allclose(got["x"], [2.0], rtol=1e-6)
    np.testing.assert_allclose(got["y"], [1.5, 3.0], rtol=1e-6)
    got = fisher_merge(m2, f2, eps=1e-6, exclude="y")  # now x alone sets the mean
    np.testing.assert_allclose(got["x"], [3.0], rtol=1e-6)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        fisher_merge(models, fishers, eps=-1.0)


@settings(deadline=None, max_examples=6)
@given(seed=st.integers(0, 2**16), decades=st.floats(-3.0, 3.0))
def test_fisher_merge_invariant_to_the_fishers_scale_float32(seed, decades):
    rng = np.random.default_rng(seed)
    shapes = {"a": (4, 5), "b": (5,)}
    tree = lambda f: {k: np.asarray(f(s), np.float32) for k, s in shapes.items()}
    models = [tree(lambda s: rng.normal(size=s)) for _ in range(T)]
    fishers = [
        tree(lambda s: rng.uniform(0, 2, size=s) ** 2 * 10 ** (decades + rng.uniform(-2, 2, s)))
        for _ in range(T)
    ]
    fishers[0]["a"][0] = 0.0  # entry [0, 0]: no model informs it; [0, 1:]: model 2 alone
    fishers[1]["a"][0] = 0.0
    fishers[2]["a"][0, 0] = 0.0
    w = rng.uniform(0.5, 2.0, size=T)
    want = fisher_merge(models, fishers, weights=w)
    np.testing.assert_allclose(
        want["a"][0, 0], np.sum(w * [m["a"][0, 0] for m in models]) / w.sum(), rtol=1e-5
    )
    np.testing.assert_allclose(want["a"][0, 1:], models[2]["a"][0, 1:], rtol=1e-6)
    for c in (1e-20, 1e-10, 1e10, 1e20):
        scaled = [
            {k: (np.float32(c) * v).astype(np.float32) for k, v in f.items()} for f in fishers
        ]
        chex.assert_trees_all_close(
            fisher_merge(models, scaled, weights=w), want, rtol=2e-5, atol=1e-6
        )


def test_fisher_merge_rescales_products_into_float32_range():
    """F · θ would overflow float32 (1e35 · 1e4); the power-of-two rescaling avoids it."""
    models = [{"x": jnp.array([1e4, -3e4], jnp.float32)}, {"x": jnp.array([3e4, 1e4], jnp.float32)}]
    fishers = [
        {"x": jnp.array([1e35, 3e35], jnp.float32)},
        {"x": jnp.array([3e35, 1e35], jnp.float32)},
    ]
    np.testing.assert_allclose(fisher_merge(models, fishers)["x"], [2.5e4, -2e4], rtol=1e-6)
    # F · θ would underflow (1e-30 · 1e-10 = 1e-40, flushed to 0 on CPU and GPU).
    small = [jax.tree_util.tree_map(lambda x: x * 1e-14, m) for m in models]
    tiny = [
        {"x": jnp.array([1e-30, 3e-30], jnp.float32)},
        {"x": jnp.array([3e-30, 1e-30], jnp.float32)},
    ]
    np.testing.assert_allclose(fisher_merge(small, tiny)["x"], [2.5e-10, -2e-10], rtol=1e-6)


def test_regmean_ridge_relative_absolute_and_scale_invariant():
    pre, models, grams = _regmean_setup(seed=2, n=3)  # n < d_in of Dense_1: singular Grams
    lam = 0.5
    got = regmean(models, grams, ridge=jmerge.absolute(lam), alpha=0.8)
    _close(got, _np_regmean(models, grams, 0.8, [1.0] * T, lam, relative=False), rtol=1e-8)
    got = regmean(models, grams, ridge=lam, alpha=0.8)
    _close(got, _np_regmean(models, grams, 0.8, [1.0] * T, lam), rtol=1e-8)
    # Relative ridge: the same merge for Grams scaled by any c (float32).
    m32 = [jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), m) for m in models]
    g32 = [{k: v.astype(jnp.float32) for k, v in g.items()} for g in grams]
    want = regmean(m32, g32, alpha=0.8, ridge=1e-3)
    for c in (1e-20, 1e-10, 1e10, 1e20):
        scaled = [{k: v * np.float32(c) for k, v in g.items()} for g in g32]
        chex.assert_trees_all_close(
            regmean(m32, scaled, alpha=0.8, ridge=1e-3), want, rtol=1e-4, atol=1e-5
        )
