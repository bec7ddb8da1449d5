"""mergekit 0.1.5's methods (jmerge.merges.mergekit) against an independent NumPy transcription
of mergekit's source (tests/mergekit_reference.py) and, when mergekit and torch are importable,
against mergekit's own method functions."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jmerge.merges import mergekit as mk
from tests import mergekit_reference as ref

SHAPES = [(6, 7), (13,), (3, 4, 5)]
W = [1.0, 0.6, -0.3]
D = [0.5, 0.3, 0.8]
G = [0.1, 0.05, 0.2]
E = [0.1, 0.2, 0.15]
CASES = [((6, 7), np.float32), ((3, 4, 5), np.float32), ((13,), jnp.bfloat16)]
BF16_TOL = dict(rtol=1e-2, atol=2e-2)


def _inputs(shape, seed=0, dtype=np.float32, n=3):
    """(base, tensors) in ``dtype`` and their float64 values (what the reference gets).

    Redrawn until every model's |θ_t − θ0| has distinct entries, so that top-k selections
    (mergekit: exactly k; jmerge: everything at the threshold) coincide also in bfloat16.
    """
    rng = np.random.default_rng(seed)
    while True:
        base = jnp.asarray(rng.normal(size=shape), dtype)
        tensors = jnp.asarray(np.asarray(base, np.float64) + rng.normal(size=(n, *shape)), dtype)
        b, ts = np.asarray(base, np.float64), np.asarray(tensors, np.float64)
        mags = np.abs(ts - b).reshape(n, -1)
        if all(len(np.unique(m)) == m.size for m in mags):
            return base, tensors, b, ts


def _masks(shape, seed, probs):
    """Fixed Bernoulli masks (True = keep) with the given per-entry keep probabilities."""
    return np.random.default_rng(seed).uniform(size=(3, *shape)) < probs


def _close(ours, expected, dtype):
    assert ours.dtype == jnp.dtype(dtype), (ours.dtype, dtype)
    tol = BF16_TOL if dtype == jnp.bfloat16 else dict(rtol=2e-5, atol=2e-5)
    # the reference result rounded to the output dtype, as jmerge rounds its float32 result
    expected = np.asarray(jnp.asarray(expected, dtype), np.float64)
    chex.assert_trees_all_close(np.asarray(ours, np.float64), expected, **tol)


# merge_methods/registry.py: (consensus, normalize, rescale) defaults of each method
GTA_DEFAULTS = {
    "task_arithmetic": (None, False, False), "ties": ("sum", True, False),
    "dare_ties": ("sum", False, True), "dare_linear": (None, False, True),
    "breadcrumbs": (None, False, False), "breadcrumbs_ties": ("sum", False, False),
    "della": ("sum", True, True), "della_linear": (None, False, True),
}


def _gta_ref(name, b, ts, *, masks=None, **kw):
    """Reference for the generalized-task-arithmetic family with mergekit's defaults."""
    defaults = GTA_DEFAULTS
    consensus, normalize, rescale = defaults[name]
    consensus = kw.get("consensus", consensus)
    normalize = kw.get("normalize", normalize)
    rescale = kw.get("rescale", rescale)
    sparsify = {
        "task_arithmetic": lambda i, x: x,
        "ties": lambda i, x: ref.magnitude(x, D[i], rescale),
        "dare_ties": lambda i, x: ref.bernoulli(x, D[i], masks[i], rescale),
        "dare_linear": lambda i, x: ref.bernoulli(x, D[i], masks[i], rescale),
        "breadcrumbs": lambda i, x: ref.magnitude_outliers(x, D[i], G[i], rescale),
        "breadcrumbs_ties": lambda i, x: ref.magnitude_outliers(x, D[i], G[i], rescale),
        "della": lambda i, x: ref.della_magprune(x, D[i], E[i], masks[i], rescale),
        "della_linear": lambda i, x: ref.della_magprune(x, D[i], E[i], masks[i], rescale),
    }[name]
    return ref.gta(b, ts, W, sparsify, consensus=consensus, normalize=normalize,
                   lam=kw.get("lambda_", 1.0))


def _gta_ours(name, base, tensors, *, masks=None, **kw):
    fn = getattr(mk, name)
    args = [base, tensors, W]
    if name != "task_arithmetic":
        args.append(D)
    if name.startswith("breadcrumbs"):
        args.append(G)
    if name.startswith("della"):
        args.append(E)
    if masks is not None:
        kw["masks"] = masks
    return fn(*args, **kw)


GTA = list(GTA_DEFAULTS)


def _options(name):
    """The defaults, and every option flipped (consensus "count" where there is one)."""
    consensus, normalize, rescale = GTA_DEFAULTS[name]
    flipped = {"normalize": not normalize, "lambda_": 0.7}
    if name != "task_arithmetic":
        flipped["rescale"] = not rescale
    if consensus is not None:
        flipped["consensus"] = "count"
    return [{}, flipped]


def _fixed_masks(name, shape, b, ts):
    if name.startswith("dare"):
        return _masks(shape, 1, np.asarray(D).reshape((3,) + (1,) * len(shape)))
    if name.startswith("della"):
        probs = np.stack([ref.della_probs(t - b, D[i], E[i]) for i, t in enumerate(ts)])
        return _masks(shape, 1, probs)
    return None


class TestAgainstReference:
    @pytest.mark.parametrize(("shape", "dtype"), CASES)
    @pytest.mark.parametrize("name", GTA)
    def test_task_arithmetic_family(self, name, shape, dtype):
        base, tensors, b, ts = _inputs(shape, dtype=dtype)
        masks = _fixed_masks(name, shape, b, ts)
        for kw in _options(name):
            ours = _gta_ours(name, base, tensors, masks=masks, **kw)
            _close(ours, _gta_ref(name, b, ts, masks=masks, **kw), dtype)

    @pytest.mark.parametrize(("shape", "dtype"), CASES)
    def test_other_methods(self, shape, dtype):
        base, tensors, b, ts = _inputs(shape, dtype=dtype)
        w4 = [1.0, 0.6, 0.3, 0.2]
        stacked4 = jnp.concatenate([base[None], tensors])
        _close(mk.linear(stacked4, w4), ref.linear(np.concatenate([b[None], ts]), w4), dtype)
        _close(mk.linear(tensors, W, normalize=False), ref.linear(ts, W, False), dtype)
        for t in (0.0, 0.3, 1.0):
            _close(mk.slerp(base, tensors[0], t), ref.slerp(t, b, ts[0]), dtype)
        for kw in ({}, {"flatten": False}, {"flatten": False, "row_wise": True}):
            rkw = dict(kw)
            _close(mk.nuslerp(base, tensors[:2], [0.3, 0.9], **kw),
                   ref.nuslerp(b, ts[:2], [0.3, 0.9], **rkw), dtype)
            _close(mk.nuslerp(None, tensors[:2], [0.3, 0.9], **kw),
                   ref.nuslerp(None, ts[:2], [0.3, 0.9], **rkw), dtype)
        for fw in (False, True):
            _close(mk.model_stock(base, tensors, filter_wise=fw),
                   ref.model_stock(b, ts, filter_wise=fw), dtype)
        for k in (1.0, 0.4, 0.0):
            _close(mk.sce(base, tensors, select_topk=k), ref.sce(b, ts, k), dtype)

    @settings(max_examples=4, deadline=None)
    @given(seed=st.integers(0, 2**16), n=st.integers(1, 4), rows=st.integers(1, 3),
           cols=st.integers(2, 6), density=st.floats(0.05, 1.0), gamma=st.floats(0.0, 0.5))
    def test_trimming_any_shape(self, seed, n, rows, cols, density, gamma):
        """ties/breadcrumbs keep counts for any size, density and gamma (distinct magnitudes)."""
        rng = np.random.default_rng(seed)
        b32 = rng.normal(size=(rows, cols)).astype(np.float32)
        ts32 = (b32 + rng.normal(size=(n, rows, cols))).astype(np.float32)
        b, ts = b32.astype(np.float64), ts32.astype(np.float64)
        w = rng.uniform(0.2, 1.5, size=n)
        ours = mk.ties(b32, ts32, w, [density] * n)
        expected = ref.gta(b, ts, w, lambda i, x: ref.magnitude(x, density, False),
                           consensus="sum", normalize=True, lam=1.0)
        chex.assert_trees_all_close(np.asarray(ours, np.float64), expected, rtol=1e-5,
                                    atol=1e-5)
        ours = mk.breadcrumbs(b32, ts32, w, [density] * n, [gamma] * n)
        expected = ref.gta(b, ts, w, lambda i, x: ref.magnitude_outliers(x, density, gamma, 0),
                           consensus=None, normalize=False, lam=1.0)
        chex.assert_trees_all_close(np.asarray(ours, np.float64), expected, rtol=1e-5,
                                    atol=1e-5)


class TestEdgeCases:
    @pytest.mark.parametrize("name", GTA)
    def test_zero_task_vectors_return_base(self, name):
        base, _, b, _ = _inputs((4, 5))
        tensors = jnp.stack([base] * 3)
        masks = np.ones((3, 4, 5), bool)
        ours = _gta_ours(name, base, tensors, masks=masks if "da" in name[:3] or
                         name.startswith("della") else None)
        chex.assert_trees_all_equal(ours, base)

    def test_density_one_is_task_arithmetic_with_consensus(self):
        base, tensors, b, ts = _inputs((6, 7))
        ours = mk.ties(base, tensors, W, 1.0, normalize=False)
        expected = ref.gta(b, ts, W, lambda i, x: x, consensus="sum", normalize=False, lam=1.0)
        _close(ours, expected, np.float32)
        # density >= 1 ignores the masks entirely (mergekit returns the tensor unchanged)
        ours = mk.dare_linear(base, tensors, W, 1.0, masks=np.zeros((3, 6, 7), bool))
        _close(ours, ref.gta(b, ts, W, lambda i, x: x, consensus=None, normalize=False,
                             lam=1.0), np.float32)

    def test_weights_summing_to_zero(self):
        base, tensors, b, ts = _inputs((5,))
        w = [1.0, -1.0, 0.0]
        # generalized task arithmetic: |Σ w| < 1e-8 -> divisor 1 (the unnormalised sum)
        ours = mk.task_arithmetic(base, tensors, w, normalize=True)
        _close(ours, b + (ts[0] - b) - (ts[1] - b), np.float32)
        # linear: mergekit divides by zero; jmerge refuses concrete weights
        with pytest.raises(ValueError, match="sum to 0"):
            mk.linear(tensors, w)
        traced = jax.jit(lambda w: mk.linear(tensors, w))(jnp.asarray(w))
        assert not np.any(np.isfinite(np.asarray(traced)))

    def test_slerp_colinear_is_linear(self):
        a = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
        for b in (2.5 * a, -a):
            chex.assert_trees_all_close(mk.slerp(a, b, 0.25), 0.75 * a + 0.25 * b, rtol=1e-6)
        # a zero tensor is not colinear for mergekit (its norm is replaced by 1, the dot is 0):
        # the spherical formula with θ = π/2 gives sin(3π/8) a
        chex.assert_trees_all_close(mk.slerp(a, jnp.zeros_like(a), 0.25),
                                    np.sin(3 * np.pi / 8) * np.asarray(a), rtol=1e-6)

    def test_nuslerp_zero_weights_use_half(self):
        base, tensors, b, ts = _inputs((3, 4))
        _close(mk.nuslerp(base, tensors[:2], [0.0, 0.0]), ref.nuslerp(b, ts[:2], [1.0, 1.0]),
               np.float32)

    def test_model_stock_singular_keeps_base(self):
        base, tensors, _, _ = _inputs((8,), n=2)
        opposite = jnp.stack([tensors[0], 2 * base - tensors[0]])  # cos = -1, 1 + cos = 0
        chex.assert_trees_all_close(mk.model_stock(base, opposite), base, atol=1e-6)

    def test_sce_tiny_task_vectors_get_uniform_weights(self):
        # Σ mean(τ²) < 1e-6: mergekit switches to uniform weights 1/N
        base, tensors, b, ts = _inputs((4, 4))
        small = base + 1e-4 * (tensors - base)
        expected = ref.sce(b, np.asarray(small, np.float64))
        _close(mk.sce(base, small), expected, np.float32)

    def test_della_epsilon_out_of_range(self):
        base, tensors, _, _ = _inputs((3, 4))
        with pytest.raises(ValueError, match="density ± epsilon"):
            mk.della(base, tensors, W, 0.5, 0.6, key=jax.random.key(0))

    def test_random_methods_need_key_or_masks(self):
        base, tensors, _, _ = _inputs((3, 4))
        with pytest.raises(ValueError, match="exactly one of key"):
            mk.dare_ties(base, tensors, W, D)
        with pytest.raises(ValueError, match=r"masks must have shape \(3, 3, 4\)"):
            mk.dare_ties(base, tensors, W, D, masks=np.ones((3, 4), bool))

    def test_shape_errors(self):
        base, tensors, _, _ = _inputs((3, 4))
        with pytest.raises(ValueError, match=r"base has shape \(4, 3\), expected \(3, 4\)"):
            mk.ties(base.T, tensors, W, D)
        with pytest.raises(ValueError, match=r"weights must have shape \(3,\)"):
            mk.ties(base, tensors, [1.0, 2.0], D)
        with pytest.raises(TypeError, match="densities must be concrete"):
            jax.jit(lambda d: mk.ties(base, tensors, W, d))(jnp.asarray(D))


class TestRandomDraws:
    def test_dare_keep_frequency_and_l1_rescale(self):
        shape = (200, 100)
        base = jnp.zeros(shape, jnp.float32)
        tensors = jnp.ones((3, *shape), jnp.float32)
        out = mk.dare_linear(base, tensors, [1.0, 0.0, 0.0], [0.3, 1.0, 1.0],
                             key=jax.random.key(0), rescale=False)
        kept = float(np.mean(np.asarray(out) != 0))
        assert abs(kept - 0.3) < 0.01, kept
        out = mk.dare_linear(base, tensors, [1.0, 0.0, 0.0], [0.3, 1.0, 1.0],
                             key=jax.random.key(0))
        # mergekit's rescale restores the L1 norm exactly (not 1/density in expectation)
        np.testing.assert_allclose(np.abs(np.asarray(out, np.float64)).sum(), 200 * 100,
                                   rtol=1e-5)

    def test_della_keep_probability_follows_rank(self):
        rows, cols = 4000, 5
        base = jnp.zeros((rows, cols), jnp.float32)
        mags = np.tile(np.arange(1, cols + 1, dtype=np.float32), (rows, 1))
        tensors = jnp.asarray(mags)[None]
        out = mk.della_linear(base, tensors, [1.0], [0.5], [0.2], key=jax.random.key(1),
                              rescale=False)
        freq = np.mean(np.asarray(out) != 0, axis=0)
        np.testing.assert_allclose(freq, [0.3, 0.4, 0.5, 0.6, 0.7], atol=0.03)


class TestTracing(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_matches_eager(self):
        base, tensors, b, ts = _inputs((6, 7))
        masks = _fixed_masks("della", (6, 7), b, ts)

        def merged(base, tensors, w, masks):
            return [
                mk.ties(base, tensors, w, D),
                mk.breadcrumbs_ties(base, tensors, w, D, G),
                mk.della(base, tensors, w, D, E, masks=masks),
                mk.slerp(base, tensors[0], w[1]),
                mk.nuslerp(base, tensors[:2], w[:2]),
                mk.model_stock(base, tensors),
                mk.sce(base, tensors, select_topk=0.5),
            ]

        got = self.variant(merged)(base, tensors, jnp.asarray(W), masks)
        want = [
            _gta_ref("ties", b, ts),
            _gta_ref("breadcrumbs_ties", b, ts),
            _gta_ref("della", b, ts, masks=masks),
            ref.slerp(W[1], b, ts[0]),
            ref.nuslerp(b, ts[:2], W[:2]),
            ref.model_stock(b, ts),
            ref.sce(b, ts, 0.5),
        ]
        for g, w in zip(got, want, strict=True):
            _close(g, w, np.float32)

    def test_grad_of_lambda(self):
        base, tensors, b, ts = _inputs((5,))
        g = jax.grad(lambda lam: jnp.sum(mk.ties(base, tensors, W, D, lambda_=lam)))(1.0)
        merged_tv = _gta_ref("ties", b, ts) - b
        np.testing.assert_allclose(g, merged_tv.sum(), rtol=1e-5)


class TestRegistry:
    # (needs_base, per-model defaults, global defaults) from mergekit 0.1.5:
    # registry.py + generalized_task_arithmetic.py spec, linear.py, slerp.py, nuslerp.py,
    # model_stock.py, sce.py
    EXPECTED = {
        "linear": (False, {"weight": mk.REQUIRED}, {"normalize": True}),
        "task_arithmetic": (True, {"weight": mk.REQUIRED, "density": 1.0},
                            {"int8_mask": False, "normalize": False, "rescale": False,
                             "lambda": 1.0}),
        "ties": (True, {"weight": mk.REQUIRED, "density": 1.0},
                 {"int8_mask": False, "normalize": True, "rescale": False, "lambda": 1.0}),
        "dare_ties": (True, {"weight": mk.REQUIRED, "density": 1.0},
                      {"int8_mask": False, "normalize": False, "rescale": True, "lambda": 1.0}),
        "dare_linear": (True, {"weight": mk.REQUIRED, "density": 1.0},
                        {"int8_mask": False, "normalize": False, "rescale": True,
                         "lambda": 1.0}),
        "breadcrumbs": (True, {"weight": mk.REQUIRED, "density": 1.0, "gamma": 0.01},
                        {"int8_mask": False, "normalize": False, "rescale": False,
                         "lambda": 1.0}),
        "breadcrumbs_ties": (True, {"weight": mk.REQUIRED, "density": 1.0, "gamma": 0.01},
                             {"int8_mask": False, "normalize": False, "rescale": False,
                              "lambda": 1.0}),
        "della": (True, {"weight": mk.REQUIRED, "density": 1.0, "epsilon": 0.15},
                  {"int8_mask": False, "normalize": True, "rescale": True, "lambda": 1.0}),
        "della_linear": (True, {"weight": mk.REQUIRED, "density": 1.0, "epsilon": 0.15},
                         {"int8_mask": False, "normalize": False, "rescale": True,
                          "lambda": 1.0}),
        "slerp": (True, {}, {"t": mk.REQUIRED}),
        "nuslerp": (False, {"weight": mk.REQUIRED},
                    {"nuslerp_row_wise": False, "nuslerp_flatten": True}),
        "model_stock": (True, {}, {"filter_wise": False}),
        "sce": (True, {}, {"int8_mask": False, "select_topk": 1.0}),
    }

    def test_methods_and_defaults_match_mergekit(self):
        assert set(mk.METHODS) == set(self.EXPECTED)
        for name, (needs_base, per_model, global_) in self.EXPECTED.items():
            spec = mk.METHODS[name]
            assert spec.needs_base == needs_base, name
            assert {k: p.default for k, p in spec.per_model.items()} == per_model, name
            assert {k: p.default for k, p in spec.global_.items()} == global_, name
            assert spec.random == (name.startswith(("dare", "della"))), name

    def test_merge_tensor_dispatch(self):
        base, tensors, b, ts = _inputs((6, 7))
        got = mk.merge_tensor("ties", base, tensors, {"weight": np.asarray(W),
                                                      "density": np.asarray(D)},
                              {"lambda": 0.7})
        _close(got, _gta_ref("ties", b, ts, lambda_=0.7), np.float32)

    @pytest.mark.parametrize("name", sorted(EXPECTED))
    def test_merge_tensor_every_method_with_defaults(self, name):
        base, tensors, _, _ = _inputs((4, 5))
        spec = mk.METHODS[name]
        n = {"slerp": 1, "nuslerp": 2}.get(name, 3)
        stack = jnp.concatenate([base[None], tensors])[:n] if spec.base == "input" else \
            tensors[:n]
        per_model = {k: np.full(n, 0.5) for k, p in spec.per_model.items()
                     if p.default is mk.REQUIRED}
        global_ = {"t": 0.5} if name == "slerp" else {}
        key = jax.random.key(0) if spec.random else None
        out = mk.merge_tensor(name, base, stack, per_model, global_, key=key)
        assert out.shape == (4, 5) and out.dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(out)))

    def test_merge_tensor_errors_name_and_list(self):
        base, tensors, _, _ = _inputs((3,))
        with pytest.raises(ValueError, match="unknown merge method 'tie'; allowed: linear, "):
            mk.merge_tensor("tie", base, tensors, {}, {})
        with pytest.raises(ValueError, match=r"unknown global parameter\(s\) \['lamda'\]; "
                                             r"allowed: \['int8_mask', 'lambda'"):
            mk.merge_tensor("ties", base, tensors, {"weight": W}, {"lamda": 1.0})
        with pytest.raises(ValueError, match="missing required per-model parameter 'weight'"):
            mk.merge_tensor("ties", base, tensors, {}, {})


# ---------------------------------------------------------------------------------------------
# mergekit itself (skipped where mergekit 0.1.5 and torch are not installed)


def _mergekit():
    torch = pytest.importorskip("torch")
    pytest.importorskip("pydantic")
    try:
        from mergekit import sparsify
        from mergekit.merge_methods import registry
        from mergekit.merge_methods.base import TensorGroup
    except Exception as e:  # mergekit installed without the parts these modules need
        pytest.skip(f"mergekit not importable: {e}")
    import importlib.metadata

    if importlib.metadata.version("mergekit") != "0.1.5":
        pytest.skip("the comparison is pinned to mergekit 0.1.5")
    return torch, sparsify, registry, TensorGroup


class TestAgainstMergekit:
    @pytest.mark.parametrize("shape", [(6, 7), (13,)])
    def test_all_methods(self, shape):
        torch, sparsify, registry, TensorGroup = _mergekit()
        base, tensors, _, _ = _inputs(shape, seed=3)
        bn, tn = np.asarray(base), np.asarray(tensors)

        def run(name, params, inputs, with_base=True, seed=None):
            group = TensorGroup.from_tensors([torch.tensor(x) for x in inputs],
                                             base_index=0 if with_base else None)
            if seed is not None:
                torch.manual_seed(seed)
            (out,) = registry.get(name)([group], parameters=params)
            return out.numpy()

        def mask_of(kind, seed):
            # mergekit's own masks: the same sparsify calls in the same order and seed
            torch.manual_seed(seed)
            rows = []
            for i in range(3):
                delta = torch.tensor(tn[i]) - torch.tensor(bn)
                if kind == "random":
                    r = sparsify.bernoulli(delta, D[i], None)
                else:
                    r = sparsify.della_magprune(delta, D[i], E[i], None)
                rows.append(r.numpy() != 0)
            return np.stack(rows)

        cases = [
            ("linear", {"weight": [1.0, 0.6, 0.3, 0.2]}, [bn, *tn], False,
             lambda: mk.linear(jnp.concatenate([base[None], tensors]), [1.0, 0.6, 0.3, 0.2])),
            ("task_arithmetic", {"weight": W, "lambda": 0.7}, [bn, *tn], True,
             lambda: mk.task_arithmetic(base, tensors, W, lambda_=0.7)),
            ("ties", {"weight": W, "density": D}, [bn, *tn], True,
             lambda: mk.ties(base, tensors, W, D)),
            ("ties", {"weight": W, "density": D, "rescale": True}, [bn, *tn], True,
             lambda: mk.ties(base, tensors, W, D, rescale=True)),
            ("breadcrumbs", {"weight": W, "density": D, "gamma": G}, [bn, *tn], True,
             lambda: mk.breadcrumbs(base, tensors, W, D, G)),
            ("breadcrumbs_ties", {"weight": W, "density": D, "gamma": G}, [bn, *tn], True,
             lambda: mk.breadcrumbs_ties(base, tensors, W, D, G)),
            ("slerp", {"t": 0.3}, [bn, tn[0]], True, lambda: mk.slerp(base, tensors[0], 0.3)),
            ("nuslerp", {"weight": [0.3, 0.9]}, [bn, *tn[:2]], True,
             lambda: mk.nuslerp(base, tensors[:2], [0.3, 0.9])),
            ("nuslerp", {"weight": [0.3, 0.9], "nuslerp_flatten": False,
                         "nuslerp_row_wise": True}, [bn, *tn[:2]], True,
             lambda: mk.nuslerp(base, tensors[:2], [0.3, 0.9], flatten=False, row_wise=True)),
            ("model_stock", {"filter_wise": True}, [bn, *tn], True,
             lambda: mk.model_stock(base, tensors, filter_wise=True)),
            ("model_stock", {}, [bn, *tn], True, lambda: mk.model_stock(base, tensors)),
            ("sce", {"select_topk": 0.4}, [bn, *tn], True,
             lambda: mk.sce(base, tensors, select_topk=0.4)),
        ]
        for name, kind in (("dare_ties", "random"), ("dare_linear", "random"),
                           ("della", "della"), ("della_linear", "della")):
            masks = mask_of(kind, 7)
            params = {"weight": W, "density": D}
            extra = []
            if kind == "della":
                params["epsilon"] = E
                extra = [E]
            fn = getattr(mk, name)
            cases.append((name, params, [bn, *tn], True, 7,
                          lambda fn=fn, extra=extra, masks=masks: fn(base, tensors, W, D,
                                                                     *extra, masks=masks)))
        worst = {}
        for case in cases:
            name, params, inputs, with_base = case[:4]
            seed = case[4] if len(case) == 6 else None
            theirs = run(name, params, inputs, with_base, seed)
            ours = np.asarray(case[-1]())
            worst[name] = max(worst.get(name, 0.0), float(np.max(np.abs(ours - theirs))))
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5, err_msg=name)
        print("max |jmerge - mergekit| per method:", worst)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "dare_ties", "della"])
def test_masks_and_scales_from_sparsify_task_vector_reproduce_the_merge(method):
    """One model at a time, sparsify_task_vector gives each keep mask and L1 factor; with them
    the merge is elementwise, so it equals the whole merge on any piece of the tensor."""
    from jmerge.merges.mergekit import METHODS, merge_tensor, sparsify_task_vector

    rng = np.random.default_rng(7)
    base = jnp.asarray(rng.normal(size=(24, 20)), jnp.float32)
    ts = base[None] + jnp.asarray(0.1 * rng.normal(size=(3, 24, 20)), jnp.float32)
    spec = METHODS[method]
    values = {"weight": [0.5, 0.3, 0.9], "density": [0.3, 0.6, 0.5], "gamma": [0.05, 0.05, 0.1],
              "epsilon": [0.1, 0.1, 0.1]}
    pm = {k: np.asarray(v) for k, v in values.items() if k in spec.per_model}
    g = {"rescale": True}  # the L1 factors in play (1 without rescale)
    keeps, scales = zip(*(
        sparsify_task_vector(method, base, ts[t], {k: v[t] for k, v in pm.items()}, g,
                             key=jax.random.key(t) if spec.random else None)
        for t in range(3)), strict=True)
    masks, scales = jnp.stack(keeps), jnp.stack(scales)
    whole = merge_tensor(method, base, ts, pm, g, masks=masks)  # factors from the masks
    if not spec.random:
        chex.assert_trees_all_close(whole, merge_tensor(method, base, ts, pm, g), atol=0)
    given = merge_tensor(method, base, ts, pm, g, masks=masks, scales=scales)
    chex.assert_trees_all_close(given, whole, atol=1e-7)
    rows = slice(5, 17)  # a piece of the tensor merged alone, with the whole tensor's factors
    piece = merge_tensor(method, base[rows], ts[:, rows], pm, g, masks=masks[:, rows],
                         scales=scales)
    chex.assert_trees_all_close(piece, whole[rows], atol=1e-7)


def test_selection_ranks_and_uniforms_reject_bad_input():
    from jmerge.merges.mergekit import selection_ranks, uniforms

    with pytest.raises(ValueError, match="kind must be"):
        selection_ranks("random", 10, [0.5])
    with pytest.raises(ValueError, match="one gamma per density"):
        selection_ranks("outliers", 10, [0.5, 0.5], [0.1])
    with pytest.raises(ValueError, match="2\\^32"):
        uniforms(jax.random.key(0), (1, 2**16, 2**16))


def test_uniforms_of_a_piece_are_the_whole_tensors_draws():
    """Chunks starting at entry s draw exactly the whole tensor's numbers there (what the
    streaming DARE merge relies on), in [0, 1), and look uniform (mean, keep rate)."""
    from jmerge.merges.mergekit import uniforms

    key = jax.random.key(3)
    whole = np.asarray(uniforms(key, (3, 40, 50)))
    flat = whole.reshape(3, -1)
    for start, size in [(0, 700), (700, 1300)]:
        piece = np.asarray(uniforms(key, (3, size), start))
        np.testing.assert_array_equal(piece, flat[:, start : start + size])
    assert whole.min() >= 0 and whole.max() < 1
    assert abs(whole.mean() - 0.5) < 0.02 and abs((whole < 0.3).mean() - 0.3) < 0.02
    assert not np.array_equal(flat[0], flat[1])  # models draw independently


def test_keep_within_equals_top_k_selection_and_rejects_bad_shapes():
    """keep_within with the k-th largest |δ| as ``lo`` keeps exactly TIES's top-k mask."""
    from jmerge.merges.mergekit import keep_within

    r = np.random.default_rng(1)
    base = jnp.asarray(r.normal(size=(6, 7)), jnp.float32)
    tensors = base + jnp.asarray(r.normal(size=(2, 6, 7)), jnp.float32)
    mag = np.abs(np.asarray(tensors - base)).reshape(2, -1)
    k = 10
    lo = np.sort(mag, axis=1)[:, -k]
    keep = np.asarray(keep_within(base, tensors, lo, np.full(2, np.inf, np.float32)))
    np.testing.assert_array_equal(keep.reshape(2, -1), mag >= lo[:, None])
    assert (keep.reshape(2, -1).sum(1) == k).all()
    with pytest.raises(ValueError, match="base must have shape"):
        keep_within(base[0], tensors, lo, lo)
    with pytest.raises(ValueError, match="one value per model"):
        keep_within(base, tensors, lo[:1], lo)
