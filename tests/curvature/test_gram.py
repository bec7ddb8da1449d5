"""Tests of jmerge.curvature.gram: Gram matrices and K-FAC factors against hand computations."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jmerge.curvature.gram import gram, kfac_factors, layer_report
from jmerge.curvature.operators import KFAC, BlockGram
from jmerge.merges.closed_form import regmean
from jmerge.tree import NonFiniteError

F64 = jnp.float64
K1, K2 = "['params']['Dense_0']['kernel']", "['params']['Dense_1']['kernel']"


def _close(a, b, tol=1e-10):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def _randn(seed, *shape):  # numpy draws: no per-shape compilation of jax.random ops
    return np.random.default_rng(seed).standard_normal(shape)


def _init(module, *x):
    return jax.jit(module.init)(jax.random.key(0), *x)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- models


class _MLP(nn.Module):
    hidden: int = 5
    out: int = 3

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(self.hidden, param_dtype=F64)(x))
        return nn.Dense(self.out, param_dtype=F64)(h)


def _mlp(n=7, d=4, seed=0):
    m = _MLP()
    x = _randn(seed, n, d)
    return m, _init(m, x), x


def _hidden(p, x):
    d = jax.tree_util.tree_map(np.asarray, p["params"]["Dense_0"])
    return np.tanh(x @ d["kernel"] + d["bias"])


class _Seq(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (B, T, 2, 3)
        h = nn.DenseGeneral((3, 2), axis=(-2, -1), param_dtype=F64)(x)
        h = jnp.tanh(h.reshape(*h.shape[:-2], 6))
        return nn.Dense(4, param_dtype=F64)(h)


class _CNN(nn.Module):
    @nn.compact
    def __call__(self, ids, img):
        e = nn.Embed(5, 3, param_dtype=F64)(ids).reshape(ids.shape[0], -1)
        c = nn.Conv(2, (2, 2), param_dtype=F64)(img).reshape(img.shape[0], -1)
        return nn.Dense(3, param_dtype=F64)(jnp.concatenate([e, c], -1))


class _NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 6, param_dtype=F64, rngs=rngs)
        self.norm = nnx.LayerNorm(6, param_dtype=F64, rngs=rngs)
        self.l2 = nnx.Linear(6, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.norm(self.l1(x))))


def _tied_fn(p, x):  # the same kernel applied twice
    return jnp.tanh(x @ p["w"]) @ p["w"] + p["b"]


def _mlp_logits(p, x):  # plain jnp; the second kernel sits on the left of dot_general
    z1 = x @ p["w1"] + p["b1"]
    z2 = jax.lax.dot_general(p["w2"], jnp.tanh(z1), (((0,), (1,)), ((), ()))).T
    return z2 + p["b2"]


def _mlp_params(seed=0, d=4, h=5, k=3):
    return {
        "w1": _randn(seed, d, h),
        "b1": _randn(seed + 1, h),
        "w2": _randn(seed + 2, h, k),
        "b2": _randn(seed + 3, k),
    }


# ----------------------------------------------------------------------------- gram


def test_gram_linen_mlp_equals_xtx():
    m, p, x = _mlp()
    g = gram(m.apply, p, x)
    assert isinstance(g, BlockGram) and set(g.grams) == {K1, K2}
    h = _hidden(p, x)
    _close(g.grams[K1], x.T @ x)
    _close(g.grams[K2], h.T @ h)
    gm = gram(m.apply, p, x, normalize="mean", rest=0.5)
    _close(gm.grams[K2], h.T @ h / x.shape[0])
    assert gm.rest == 0.5


def test_gram_sequence_dense_general():
    m = _Seq()
    x = _randn(1, 3, 4, 2, 3)
    p = _init(m, x)
    g = gram(m.apply, p, x)
    kg = "['params']['DenseGeneral_0']['kernel']"
    assert set(g.grams) == {kg, K1}
    xf = x.reshape(-1, 6)  # rows over examples and tokens; in_dims (2, 3) row-major
    _close(g.grams[kg], xf.T @ xf)
    kern = jax.tree_util.tree_map(np.asarray, p["params"]["DenseGeneral_0"])
    h = np.tanh(xf @ kern["kernel"].reshape(6, 6) + kern["bias"].reshape(6))
    _close(g.grams[K1], h.T @ h)
    # BlockGram accepts it: G · W.reshape(d_in, -1)
    out = g.mv(p)
    _close(
        out["params"]["DenseGeneral_0"]["kernel"].reshape(6, 6),
        xf.T @ xf @ kern["kernel"].reshape(6, 6),
    )


def test_gram_nnx():
    graphdef, state = nnx.split(_NNXNet(nnx.Rngs(0)))
    x = _randn(3, 6, 4)
    fn = lambda s, x: nnx.merge(graphdef, s)(x)
    g = gram(fn, state, x)
    model = nnx.merge(graphdef, state)
    h = nnx.relu(model.norm(model.l1(x)))
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(state)]
    k1 = next(p for p in paths if "l1" in p and "kernel" in p)
    k2 = next(p for p in paths if "l2" in p and "kernel" in p)
    assert set(g.grams) == {k1, k2}
    _close(g.grams[k1], x.T @ x)
    _close(g.grams[k2], h.T @ h)
    g.mv(state)  # keys match the state's paths


def test_gram_skips_conv_embed_and_reports():
    m = _CNN()
    ids = np.random.default_rng(0).integers(0, 5, (4, 2))
    img = _randn(1, 4, 3, 3, 1)
    p = _init(m, ids, img)
    fn = lambda p, x: m.apply(p, *x)
    g = gram(fn, p, (ids, img))
    assert set(g.grams) == {K1}
    rep = layer_report(fn, p, (ids, img))
    assert rep[K1].startswith("dense: d_in=24")
    assert "convolution" in rep["['params']['Conv_0']['kernel']"]
    assert "gather" in rep["['params']['Embed_0']['embedding']"]
    assert rep["['params']['Dense_0']['bias']"].startswith("skipped")


def test_gram_tied():
    p = {"w": _randn(0, 3, 3), "b": np.zeros(3)}
    x = _randn(1, 5, 3)
    with pytest.raises(ValueError, match="tied"):
        gram(_tied_fn, p, x)
    h = np.tanh(x @ p["w"])
    _close(gram(_tied_fn, p, x, tied="sum").grams["['w']"], x.T @ x + h.T @ h)
    assert gram(_tied_fn, p, x, tied="skip").grams == {}
    assert "tied: 2 layers" in layer_report(_tied_fn, p, x)["['w']"]


def test_gram_chunking_and_single_compile():
    m, p, x = _mlp(n=7)
    traces = []

    def fn(p, x):
        traces.append(1)
        return m.apply(p, x)

    full = gram(fn, p, x)
    count = len(traces)
    again = gram(fn, p, x * 2.0)  # same function and shapes: no retrace, one compilation
    assert len(traces) == count
    _close(again.grams[K1], 4 * full.grams[K1])
    for bs in (3, 7, 100):  # 3 does not divide 7
        part = gram(fn, p, x, batch_size=bs)
        for k in full.grams:
            _close(part.grams[k], full.grams[k])


def test_gram_bad_inputs():
    m, p, x = _mlp()
    with pytest.raises(ValueError, match=r"apply_fn\(params, inputs\[:1\]\) failed"):
        gram(m.apply, p, x[:, :3])  # wrong feature size
    other = _init(_MLP(hidden=2), x)
    with pytest.raises(ValueError, match="same model"):
        gram(m.apply, other, np.ones((3, 7)))
    with pytest.raises(ValueError, match="leading"):
        gram(lambda p, xs: m.apply(p, xs[0]), p, (x, x[:3]))
    with pytest.raises(ValueError, match="normalize"):
        gram(m.apply, p, x, normalize="avg")
    with pytest.raises(ValueError, match="batch_size"):
        gram(m.apply, p, x, batch_size=0)


def test_gram_and_kfac_non_finite_and_label_range():
    m, p, x = _mlp()
    bad = x.copy()
    bad[1, 2] = np.nan
    with pytest.raises(NonFiniteError, match=r"gram\[.*Dense_0.*is not finite"):
        gram(m.apply, p, bad)
    with pytest.raises(NonFiniteError, match=r"kfac_factors\[.*Dense_0.*is not finite"):
        kfac_factors(m.apply, p, bad)
    y = np.array([0, 1, 2, 0, 1, 2, -1])
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 3\).*1 of 7"):
        kfac_factors(m.apply, p, x, y, kind="empirical")


def test_regmean_end_to_end_matches_numpy():
    m, p0, _ = _mlp()
    rng = np.random.default_rng(10)
    tasks = []
    for t in range(3):
        p = jax.tree_util.tree_map(lambda w: np.asarray(w) + 0.3 * rng.standard_normal(w.shape), p0)
        tasks.append((p, rng.standard_normal((8, 4)) + t))
    grams = [gram(m.apply, p, x) for p, x in tasks]
    merged = regmean([p for p, _ in tasks], grams, ridge=0.0)
    for name in ("Dense_0", "Dense_1"):
        gs, ws = [], []
        for p, x in tasks:
            a = x if name == "Dense_0" else _hidden(p, x)
            gs.append(a.T @ a)
            ws.append(p["params"][name]["kernel"])
        want = np.linalg.solve(sum(gs), sum(g @ w for g, w in zip(gs, ws, strict=True)))
        _close(merged["params"][name]["kernel"], want, 1e-8)
        bias = np.mean([p["params"][name]["bias"] for p, _ in tasks], axis=0)
        _close(merged["params"][name]["bias"], bias)


# ----------------------------------------------------------------------------- K-FAC


def _softmax_reg(n, d=3, k=4, seed=0):
    p = {"w": _randn(seed, d, k), "b": _randn(seed + 1, k)}
    return (lambda p, x: x @ p["w"] + p["b"]), p, _randn(seed + 2, n, d)


def test_kfac_exact_one_example_equals_fisher_block():
    fn, p, x = _softmax_reg(n=1)
    f = kfac_factors(fn, p, x, kind="exact")
    assert isinstance(f, KFAC) and set(f.factors) == {"['w']"}
    a, b = f.factors["['w']"]

    @jax.jit
    def fisher(w):  # brute force: E_y[vec ∇W vec ∇Wᵀ], row-major vec of W (d_in, d_out)
        logp = lambda w, y: jax.nn.log_softmax(fn({**p, "w": w}, x))[0, y]
        gw = jax.vmap(jax.grad(logp), in_axes=(None, 0))(w, jnp.arange(4)).reshape(4, -1)
        return jnp.einsum(
            "y,yi,yj->ij", jnp.exp(jax.vmap(lambda y: logp(w, y))(jnp.arange(4))), gw, gw
        )

    want = fisher(p["w"])
    _close(jnp.kron(a, b), want)
    v = _randn(5, 3, 4)
    _close(f.mv({"w": v, "b": np.ones(4)})["w"].ravel(), want @ v.ravel())


def _brute_factors(p, x, ys_fn):
    """A_l = mean a aᵀ; B_l = mean_n Σ_y w_y g gᵀ, g = ∂ log p(y|x)/∂z_l by hand (numpy)."""
    n = len(x)
    h = np.tanh(x @ p["w1"] + p["b1"])
    pr = _softmax(h @ p["w2"] + p["b2"])
    b1, b2 = 0.0, 0.0
    for i in range(n):
        for y, w in ys_fn(i, pr[i]):
            g2 = np.eye(len(pr[i]))[y] - pr[i]
            g1 = (p["w2"] @ g2) * (1 - h[i] ** 2)
            b1 = b1 + w * np.outer(g1, g1) / n
            b2 = b2 + w * np.outer(g2, g2) / n
    return {"['w1']": (x.T @ x / n, b1), "['w2']": (h.T @ h / n, b2)}


@pytest.mark.parametrize("kind", ["exact", "empirical", "sampled"])
def test_kfac_mlp_matches_definition(kind):
    p = _mlp_params()
    n = 5
    x = _randn(7, n, 4)
    labels = np.random.default_rng(8).integers(0, 3, n)
    key = jax.random.key(9)
    logits = np.asarray(jax.vmap(_mlp_logits, (None, 0))(p, x[:, None]))[:, 0]
    sampled = jax.vmap(lambda k, z: jax.random.categorical(k, jax.nn.log_softmax(z)))(
        jax.random.split(key, n), logits
    )

    def ys_fn(i, probs):
        if kind == "exact":
            return [(y, probs[y]) for y in range(3)]
        return [(int((labels if kind == "empirical" else sampled)[i]), 1.0)]

    want = _brute_factors(p, x, ys_fn)
    got = kfac_factors(_mlp_logits, p, x, labels, kind=kind, key=key, batch_size=2)
    assert set(got.factors) == set(want)
    for k, (a, b) in want.items():
        _close(got.factors[k][0], a)
        _close(got.factors[k][1], b)


def test_kfac_sequence_expand_convention():
    # Per-token softmax regression: A = mean over (n, t) of a aᵀ, B = mean_n Σ_t (diag p − p pᵀ).
    w, x = _randn(0, 3, 4), _randn(1, 2, 5, 3)
    fn = lambda p, x: x @ p["w"]
    a, b = kfac_factors(fn, {"w": w}, x, kind="exact").factors["['w']"]
    xf = x.reshape(-1, 3)
    _close(a, xf.T @ xf / 10)
    pr = _softmax(xf @ w)
    _close(b, sum(np.diag(q) - np.outer(q, q) for q in pr) / 2)


def test_kfac_chunking_and_errors():
    p = _mlp_params()
    x = _randn(7, 7, 4)
    full = kfac_factors(_mlp_logits, p, x)
    part = kfac_factors(_mlp_logits, p, x, batch_size=3)
    for k, (a, b) in full.factors.items():
        _close(part.factors[k][0], a)
        _close(part.factors[k][1], b)
    with pytest.raises(ValueError, match="labels"):
        kfac_factors(_mlp_logits, p, x, kind="empirical")
    with pytest.raises(ValueError, match="labels must have shape"):
        kfac_factors(_mlp_logits, p, x, np.zeros((6,), np.int32), kind="empirical")
    with pytest.raises(ValueError, match="key"):
        kfac_factors(_mlp_logits, p, x, kind="sampled")
    with pytest.raises(ValueError, match="logits_fn"):
        kfac_factors(_mlp_logits, p, x[:, :2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kfac_factors(_mlp_logits, p, x)  # no warnings on the happy path
