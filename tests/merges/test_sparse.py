"""TIES / DARE transforms and merges against loop-based numpy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jmerge.merges.basic import task_arithmetic, task_vectors
from jmerge.merges.sparse import (
    dare,
    dare_ties,
    disjoint_mean,
    drop_and_rescale,
    elect_sign,
    ties,
    trim_topk,
)
from jmerge.tree import TreeMismatchError

SHAPES = {
    "params": {
        "Dense_0": {"kernel": (16, 32), "bias": (32,)},
        "Conv_0": {"kernel": (3, 3, 4)},
        "scale": (),
    },
    "head": {"kernel": (32, 2)},
}
T = 3


def _tree(seed, shapes=SHAPES, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(size=s), dtype),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _models(shapes=SHAPES, num=T, dtype=np.float64):
    return _tree(100, shapes, dtype), [_tree(i, shapes, dtype) for i in range(num)]


def _leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]


def _unflatten(like, leaves):
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)


# ---- numpy references (loops over models and entries) ----


def _np_k(density, n):
    return min(n, max(1, int(np.floor(density * n + 0.5))))


def _np_trim(tvs, density, scope):
    """tvs: list of (T, *s) arrays. Keep |τ| >= k-th largest magnitude, per tensor or global."""
    out = [x.copy() for x in tvs]
    num = tvs[0].shape[0]
    for t in range(num):
        if scope == "tensor":
            groups = [[j] for j in range(len(tvs))]
        else:
            groups = [list(range(len(tvs)))]
        for g in groups:
            mags = np.concatenate([np.abs(tvs[j][t]).ravel() for j in g])
            thr = np.sort(mags)[::-1][_np_k(density, mags.size) - 1]
            for j in g:
                out[j][t] = np.where(np.abs(tvs[j][t]) >= thr, tvs[j][t], 0.0)
    return out


def _np_elect(tvs):
    return [np.sign(np.sum(x, axis=0)) for x in tvs]


def _np_disjoint(tvs, signs):
    out = []
    for x, s in zip(tvs, signs, strict=True):
        m = np.zeros(x.shape[1:])
        for idx in np.ndindex(*x.shape[1:]):
            vals = [x[(t, *idx)] for t in range(x.shape[0])]
            agree = [v for v in vals if v != 0 and np.sign(v) == s[idx]]
            m[idx] = np.mean(agree) if agree else 0.0
        out.append(m)
    return out


def _np_tvs(pre, ft):
    p = _leaves(pre)
    per = [_leaves(m) for m in ft]
    return [np.stack([per[t][j] - p[j] for t in range(len(ft))]) for j in range(len(p))]


def _np_ties(pre, ft, density, alpha, scope):
    trimmed = _np_trim(_np_tvs(pre, ft), density, scope)
    merged = _np_disjoint(trimmed, _np_elect(trimmed))
    return [p + alpha * m for p, m in zip(_leaves(pre), merged, strict=True)]


def _close(tree, ref_leaves, rtol=1e-10, atol=1e-12):
    for g, r in zip(_leaves(tree), ref_leaves, strict=True):
        np.testing.assert_allclose(g, r, rtol=rtol, atol=atol)


class SparseTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_ties_tensor_and_global_scope(self):
        pre, ft = _models()
        fn = self.variant(ties, static_argnames=("density", "scope"))
        for scope in ("tensor", "global"):
            got = fn(pre, ft, density=0.3, alpha=0.7, scope=scope)
            _close(got, _np_ties(pre, ft, 0.3, 0.7, scope))

    @chex.variants(with_jit=True, without_jit=True)
    def test_ties_filter_excludes_head_from_global_threshold(self):
        pre, ft = _models()
        fn = self.variant(ties, static_argnames=("density", "scope", "exclude"))
        got = fn(pre, ft, density=0.25, scope="global", exclude="head")
        np.testing.assert_array_equal(got["head"]["kernel"], pre["head"]["kernel"])
        body = lambda t: {"params": t["params"]}
        ref = _np_ties(body(pre), [body(m) for m in ft], 0.25, 1.0, "global")
        _close(body(got), ref)

    @chex.variants(with_jit=True, without_jit=True)
    def test_dare_and_dare_ties(self):
        pre, ft = _models()
        key = jax.random.key(7)
        dropped = _leaves(drop_and_rescale(task_vectors(pre, ft), 0.6, key))
        alpha = np.array([0.5, 1.0, -0.3])
        got = self.variant(dare)(pre, ft, density=0.6, key=key, alpha=alpha)
        ref = [p + np.tensordot(alpha, d, 1) for p, d in zip(_leaves(pre), dropped, strict=True)]
        _close(got, ref)
        got = self.variant(dare_ties)(pre, ft, density=0.6, key=key, alpha=0.8)
        merged = _np_disjoint(dropped, _np_elect(dropped))
        _close(got, [p + 0.8 * m for p, m in zip(_leaves(pre), merged, strict=True)])


def test_trim_keeps_ties_at_threshold():
    tvs = {"a": jnp.array([[3.0, 1.0, -1.0, 1.0, 0.0], [0.5, -4.0, 2.0, 0.1, 0.2]])}
    got = trim_topk(tvs, 0.4)  # k = 2
    np.testing.assert_array_equal(
        got["a"], [[3.0, 1.0, -1.0, 1.0, 0.0], [0.0, -4.0, 2.0, 0.0, 0.0]]
    )


def test_elect_sign_and_disjoint_mean_by_hand():
    tvs = {"a": jnp.array([[1.0, -2.0, 0.0, 3.0], [2.0, 1.0, 0.0, -3.0], [-1.0, 4.0, 0.0, 0.0]])}
    sign = elect_sign(tvs)
    np.testing.assert_array_equal(sign["a"], [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(disjoint_mean(tvs, sign)["a"], [1.5, 2.5, 0.0, 0.0])


def test_dare_kept_fraction_and_rescale():
    tvs = {"w": jnp.ones((4, 3000)), "b": jnp.ones((4, 3000)) * 2.0}
    for density in (0.1, 0.5, 0.9):
        out = drop_and_rescale(tvs, density, jax.random.key(0))
        for name, val in (("w", 1.0), ("b", 2.0)):
            x = np.asarray(out[name])
            kept = x != 0
            assert abs(kept.mean() - density) < 0.01, (name, density, kept.mean())
            np.testing.assert_allclose(x[kept], val / density)
            for t in range(4):  # every model keeps about `density`
                assert abs(kept[t].mean() - density) < 0.04
    out = drop_and_rescale(tvs, 0.5, jax.random.key(0))
    m = np.asarray(out["w"]) != 0
    assert 0.4 < (m[0] == m[1]).mean() < 0.6  # independent across models
    assert 0.4 < (m == (np.asarray(out["b"]) != 0)).mean() < 0.6  # and across leaves
    # A leaf's draw depends on its path only: removing another leaf does not change it.
    alone = drop_and_rescale({"w": tvs["w"]}, 0.5, jax.random.key(0))
    np.testing.assert_array_equal(alone["w"], out["w"])


def test_dare_mean_over_keys_converges_to_task_arithmetic():
    pre, ft = _models()
    alpha, p, n_keys = np.array([0.7, -0.4, 1.1]), 0.3, 400
    keys = jax.random.split(jax.random.key(3), n_keys)
    draws = jax.vmap(lambda k: dare(pre, ft, density=p, key=k, alpha=alpha))(keys)
    ta = _leaves(task_arithmetic(pre, ft, alpha))
    tvs = _np_tvs(pre, ft)
    sq_err, expected = 0.0, 0.0
    for d, r, tv in zip(_leaves(draws), ta, tvs, strict=True):
        sq_err += np.sum((d.mean(0) - r) ** 2)
        # Var of Σ_t α_t m_t τ_t / p with m_t ~ Bernoulli(p) i.i.d. is Σ_t α_t² τ_t² (1 − p)/p.
        expected += np.sum(np.tensordot(alpha**2, tv**2, 1) * (1 - p) / p) / n_keys
    # ~600 entries: the ratio is 1 ± 0.08; no rescaling (or correlated masks) fails by far.
    assert 0.7 < sq_err / expected < 1.3, sq_err / expected
    one = np.concatenate(
        [d[0].ravel() - r.ravel() for d, r in zip(_leaves(draws), ta, strict=True)]
    )
    assert np.sum(one**2) > 100 * sq_err  # a single draw is far off
    _close(dare(pre, ft, density=1.0, key=keys[0], alpha=alpha), ta)


def test_stacked_equals_list_and_bf16():
    pre, ft = _models()
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *ft)
    key = jax.random.key(1)
    chex.assert_trees_all_equal(ties(pre, stacked, density=0.3), ties(pre, ft, density=0.3))
    chex.assert_trees_all_equal(
        dare(pre, stacked, density=0.5, key=key), dare(pre, ft, density=0.5, key=key)
    )
    pre16, ft16 = _models({"w": (6, 5), "b": (5,)}, dtype=jnp.bfloat16)
    f32 = lambda t: jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), t)
    to16 = lambda t: jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), t)
    got = ties(pre16, ft16, density=0.4, alpha=jnp.float32(0.9))
    chex.assert_trees_all_equal_dtypes(got, pre16)
    want = ties(f32(pre16), [f32(m) for m in ft16], density=0.4, alpha=jnp.float32(0.9))
    chex.assert_trees_all_equal(got, to16(want))


def test_bad_inputs():
    pre, ft = _models()
    key = jax.random.key(0)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            ties(pre, ft, density=bad)
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            dare(pre, ft, density=bad, key=key)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        dare_ties(pre, ft, density=2.0, key=key)
    with pytest.raises(ValueError, match="scope"):
        ties(pre, ft, density=0.5, scope="layer")
    with pytest.raises(ValueError, match="alpha must be a scalar or have one entry per model"):
        dare(pre, ft, density=0.5, key=key, alpha=[1.0, 2.0])
    with pytest.raises(ValueError, match="alpha .* must be a scalar"):
        ties(pre, ft, density=0.5, alpha=[1.0, 2.0, 3.0])
    wrong = [ft[0], jax.tree_util.tree_map(lambda x: x, ft[1]), ft[2]]
    wrong[1]["params"]["Conv_0"]["kernel"] = jnp.zeros((3, 3, 2))
    with pytest.raises(
        TreeMismatchError, match=r"finetuned\[1\]\['params'\]\['Conv_0'\]\['kernel'\]"
    ):
        ties(pre, wrong, density=0.5)
    missing = [ft[0], {"params": ft[1]["params"]}, ft[2]]
    with pytest.raises(TreeMismatchError, match=r"finetuned\[1\].*\['head'\]\['kernel'\]"):
        dare(pre, missing, density=0.5, key=key)


_shape = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)


@settings(deadline=None, max_examples=3)
@given(
    shapes=st.lists(_shape, min_size=1, max_size=3),
    num=st.integers(1, 4),
    density=st.floats(0.05, 1.0),
    scope=st.sampled_from(["tensor", "global"]),
    seed=st.integers(0, 99),
)
def test_ties_random_shapes(shapes, num, density, scope, seed):
    tree_shapes = {f"leaf{i}": s for i, s in enumerate(shapes)}
    pre = _tree(seed + 1000, tree_shapes)
    ft = [_tree(seed + i, tree_shapes) for i in range(num)]
    _close(ties(pre, ft, density=density, scope=scope), _np_ties(pre, ft, density, 1.0, scope))
