"""Tests of jmerge.curvature.fisher.fisher_diag: fast path == generic path == brute force."""

import functools
import itertools
import warnings

import chex
import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

from jmerge.curvature.fisher import fisher_diag
from jmerge.tree import NonFiniteError

F64 = jnp.float64
KINDS = ("empirical", "sampled", "exact")


# ----------------------------------------------------------------------------- models
# Each factory returns (logits_fn, params, inputs, labels); all tiny, float64. Parameters are
# drawn with numpy from the shapes of `init` (no compilation), and factories are cached.


def _fill(shapes, seed):
    rng = np.random.default_rng(seed)

    def draw(s):
        scale = 1.0 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.5
        return jnp.asarray(rng.normal(size=s.shape) * scale, s.dtype)

    return jax.tree_util.tree_map(draw, shapes)


def _data(seed, shape, classes, label_shape):
    rng = np.random.default_rng(seed + 100)
    x = jnp.asarray(rng.normal(size=shape))
    return x, jnp.asarray(rng.integers(0, classes, size=label_shape))


def _linen(m, x, seed):
    return _fill(jax.eval_shape(m.init, jax.random.key(0), x), seed)


class _MLP(nn.Module):
    widths: tuple = (5, 4)
    classes: int = 3

    @nn.compact
    def __call__(self, x):
        for w in self.widths:
            x = nn.tanh(nn.Dense(w, param_dtype=F64)(x))
        return nn.Dense(self.classes, param_dtype=F64)(x)


@functools.cache
def mlp(n=5, d=4, widths=(5, 4), classes=3, seed=0):
    m = _MLP(widths, classes)
    x, y = _data(seed, (n, d), classes, (n,))
    return m.apply, _linen(m, x, seed), x, y


class _CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3), strides=(2, 2), padding="SAME", param_dtype=F64)(x))
        x = jnp.tanh(nn.Conv(2, (2, 2), padding="VALID", param_dtype=F64)(x))
        return nn.Dense(3, param_dtype=F64)(x.reshape(x.shape[0], -1))


@functools.cache
def cnn(n=5, seed=0):
    m = _CNN()
    x, y = _data(seed, (n, 6, 5, 2), 3, (n,))
    return m.apply, _linen(m, x, seed), x, y


class _Transformer(nn.Module):
    """Embed + sliced position embeddings, pre-LN causal q/k/v attention, per-token head."""

    vocab: int = 7
    dim: int = 8

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(self.vocab, self.dim, param_dtype=F64)(ids)
        pos = self.param("pos", nn.initializers.normal(0.5), (6, self.dim), F64)
        h = h + pos[: ids.shape[-1]]
        y = nn.LayerNorm(param_dtype=F64)(h)
        q, k, v = (nn.Dense(self.dim, param_dtype=F64)(y) for _ in range(3))
        scores = jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(self.dim)
        causal = jnp.tril(jnp.ones((ids.shape[-1],) * 2, bool))
        att = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        h = h + nn.Dense(self.dim, param_dtype=F64)(att @ v)
        return nn.Dense(self.vocab, param_dtype=F64)(nn.gelu(h))


class _Tied(nn.Module):
    """Tied input/output embeddings: the table is used by a gather and by a dot."""

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(7, 6, param_dtype=F64)
        h = emb(ids)
        h = h + nn.Dense(6, param_dtype=F64)(jnp.tanh(jnp.cumsum(h, axis=1)))
        return emb.attend(h)


def _token_model(m, n, t, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 7, size=(n, t))
    ids[:, 1] = ids[:, 0]  # repeated tokens within a row
    ids, labels = jnp.asarray(ids), jnp.asarray(rng.integers(0, 7, size=(n, t)))
    return m.apply, _linen(m, ids, seed), ids, labels


@functools.cache
def transformer(n=5, t=4, seed=0):
    return _token_model(_Transformer(), n, t, seed)


@functools.cache
def tied(n=5, t=3, seed=0):
    return _token_model(_Tied(), n, t, seed)


class _NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 6, param_dtype=F64, rngs=rngs)
        self.norm = nnx.LayerNorm(6, param_dtype=F64, rngs=rngs)
        self.l2 = nnx.Linear(6, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.norm(self.l1(x))))


@functools.cache
def nnx_model(n=5, seed=0):
    graphdef, shapes = nnx.split(nnx.eval_shape(lambda: _NNXNet(nnx.Rngs(0))))
    x, y = _data(seed, (n, 4), 3, (n,))

    def logits_fn(s, x):
        return nnx.merge(graphdef, s)(x)

    return logits_fn, _fill(shapes, seed), x, y


def _plain_logits(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    h = jax.jit(lambda h, w: jnp.dot(h, w))(h, p["w2"]) * p["scale"]  # a layer inside a jit
    return jnp.einsum("bi,ki->bk", h, p["w3"])


@functools.cache
def plain(n=5, seed=0):
    shapes = {"w1": (4, 5), "b1": (5,), "w2": (5, 5), "scale": (5,), "w3": (3, 5), "unused": (2,)}
    p = _fill({k: jax.ShapeDtypeStruct(s, F64) for k, s in shapes.items()}, seed)
    x, y = _data(seed, (n, 4), 3, (n,))
    return _plain_logits, p, x, y


MODELS = {
    "mlp": mlp,
    "cnn": cnn,
    "transformer": transformer,
    "tied": tied,
    "nnx": nnx_model,
    "plain": plain,
}


# ----------------------------------------------------------------------------- fast == generic


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_fast_equals_generic(model, kind):
    fn, params, x, y = MODELS[model]()
    key = jax.random.key(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast path matches every leaf of these models
        # chunks of 2 (padded) for "sampled": the per-example keys must line up with generic's
        bs = 2 if kind == "sampled" else None
        fast = fisher_diag(fn, params, x, y, kind=kind, key=key, batch_size=bs)
    generic = fisher_diag(fn, params, x, y, kind=kind, key=key, fast=False, batch_size=3)
    chex.assert_trees_all_close(fast, generic, rtol=1e-5, atol=1e-12)
    chex.assert_trees_all_equal_shapes(fast, params)
    assert any(float(jnp.max(v)) > 0 for v in jax.tree_util.tree_leaves(fast))


def test_unused_leaf_is_zero():
    fn, params, x, y = plain()
    out = fisher_diag(fn, params, x, y, kind="empirical")
    chex.assert_trees_all_equal(out["unused"], jnp.zeros(2, F64))


# ----------------------------------------------------------------------------- brute force


def _brute_exact(fn, params, x, label_sets):
    """Σ_y p(y|x) g_y², an explicit loop over every label (sequence) with jax.grad."""

    def loglik(p, x_n, y_n):
        logp = jax.nn.log_softmax(fn(p, x_n[None])[0], axis=-1)
        return jnp.sum(jnp.take_along_axis(logp, y_n[..., None], axis=-1))

    value_and_grad = jax.jit(jax.value_and_grad(loglik))
    total = jax.tree_util.tree_map(jnp.zeros_like, params)
    for n in range(x.shape[0]):
        for y in label_sets:
            logp, g = value_and_grad(params, x[n], jnp.asarray(y))
            prob = jnp.exp(logp)
            total = jax.tree_util.tree_map(lambda t, g, w=prob: t + w * g**2, total, g)
    return jax.tree_util.tree_map(lambda t: t / x.shape[0], total)


@pytest.mark.parametrize("fast", [True, False])
def test_exact_equals_brute_force_classifier(fast):
    fn, params, x, _ = mlp()
    want = _brute_exact(fn, params, x, range(3))
    got = fisher_diag(fn, params, x, kind="exact", fast=fast, batch_size=None if fast else 3)
    chex.assert_trees_all_close(got, want, rtol=1e-8, atol=1e-14)


class _TinySeq(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(4, 5, param_dtype=F64)(ids)
        h = h + nn.Dense(5, param_dtype=F64)(jnp.cumsum(h, axis=1))  # token 2 sees token 1
        return nn.Dense(3, param_dtype=F64)(jnp.tanh(h))


@pytest.mark.parametrize("fast", [True, False])
def test_exact_equals_brute_force_sequence(fast):
    m = _TinySeq()
    ids = jnp.array([[0, 3], [2, 2], [1, 0]])
    params = _linen(m, ids, 0)
    seqs = list(itertools.product(range(3), repeat=2))  # all K**T = 9 label sequences
    want = _brute_exact(m.apply, params, ids, seqs)
    got = fisher_diag(m.apply, params, ids, kind="exact", fast=fast)
    chex.assert_trees_all_close(got, want, rtol=1e-8, atol=1e-14)


def test_sampled_converges_to_exact():
    fn, params, x, _ = mlp()
    flat = lambda t: np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(t)])  # noqa: E731
    exact = flat(fisher_diag(fn, params, x, kind="exact"))
    errors = []
    for reps in (4, 64, 1024):  # reps samples per example = inputs repeated reps times
        xr = jnp.asarray(np.tile(np.asarray(x), (reps, 1)))
        sampled = flat(fisher_diag(fn, params, xr, kind="sampled", key=jax.random.key(reps)))
        errors.append(np.linalg.norm(sampled - exact) / np.linalg.norm(exact))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.1, errors


def test_empirical_matches_mean_of_squared_grads():
    fn, params, x, y = mlp()

    def loglik(p, x_n, y_n):
        return jax.nn.log_softmax(fn(p, x_n[None])[0])[y_n]

    grads = jax.jit(jax.vmap(jax.grad(loglik), in_axes=(None, 0, 0)))(params, x, y)
    want = jax.tree_util.tree_map(lambda g: jnp.mean(g**2, axis=0), grads)
    chex.assert_trees_all_close(fisher_diag(fn, params, x, y, kind="empirical"), want, rtol=1e-10)


def test_pytree_inputs():
    fn, params, x, y = plain()

    def two_inputs(p, xs):
        return fn(p, xs["a"] + 0.5 * xs["b"][:, :4])

    xs = {"a": x, "b": jnp.concatenate([x[:, ::-1], x[:, :1]], axis=1)}
    fast = fisher_diag(two_inputs, params, xs, y, kind="empirical")
    generic = fisher_diag(two_inputs, params, xs, y, kind="empirical", fast=False)
    chex.assert_trees_all_close(fast, generic, rtol=1e-5, atol=1e-12)


# ----------------------------------------------------------------------------- properties


@hypothesis.settings(max_examples=3, deadline=None, derandomize=True)
@hypothesis.given(
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=2).map(tuple),
    n=st.integers(1, 6),
    batch_size=st.one_of(st.none(), st.integers(1, 4)),
    kind=st.sampled_from(KINDS),
)
def test_mlp_shapes_property(widths, n, batch_size, kind):
    fn, params, x, y = mlp(n=n, widths=widths)
    key = jax.random.key(1)
    fast = fisher_diag(fn, params, x, y, kind=kind, key=key, batch_size=batch_size)
    generic = fisher_diag(fn, params, x, y, kind=kind, key=key, fast=False)
    chex.assert_trees_all_close(fast, generic, rtol=1e-5, atol=1e-12)
    chex.assert_tree_all_finite(fast)


class JitTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("sampled", "exact")
    def test_jit_and_eager_agree(self, kind):
        # the arguments of test_fast_equals_generic: eager and reference calls hit its cache
        fn, params, x, y = plain()
        bs = 2 if kind == "sampled" else None
        f = self.variant(
            lambda p, x, y, k: fisher_diag(fn, p, x, y, kind=kind, key=k, batch_size=bs)
        )
        got = f(params, x, y, jax.random.key(7))
        want = fisher_diag(
            fn, params, x, y, kind=kind, key=jax.random.key(7), fast=False, batch_size=3
        )
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-12)


def test_dtypes():
    m = _MLP()
    x = jnp.ones((3, 4), jnp.float32)
    p32 = jax.tree_util.tree_map(lambda v: v.astype(jnp.float32), _linen(m, x, 0))
    fn = lambda p, x: m.apply(p, x.astype(jax.tree_util.tree_leaves(p)[0].dtype))  # noqa: E731
    out = fisher_diag(fn, p32, x, kind="exact")
    assert {v.dtype for v in jax.tree_util.tree_leaves(out)} == {jnp.dtype(jnp.float32)}
    pbf = jax.tree_util.tree_map(lambda v: v.astype(jnp.bfloat16), p32)
    out_bf = fisher_diag(fn, pbf, x, kind="exact")
    assert {v.dtype for v in jax.tree_util.tree_leaves(out_bf)} == {jnp.dtype(jnp.float32)}
    chex.assert_trees_all_close(out_bf, out, rtol=0.1, atol=1e-3)


# ----------------------------------------------------------------------------- fallback


def _sin_logits(p, x):
    return x @ p["w"] + jnp.sin(p["b"])  # `sin` is not a matched use of b


def test_fallback_warns_once_and_stays_exact():
    p = _fill({"w": jax.ShapeDtypeStruct((4, 3), F64), "b": jax.ShapeDtypeStruct((3,), F64)}, 3)
    x, _ = _data(3, (5, 4), 3, (5,))
    with pytest.warns(UserWarning, match=r"\['b'\].*sin") as record:
        got = fisher_diag(_sin_logits, p, x, kind="exact", batch_size=2)
    assert len([r for r in record if "fisher_diag" in str(r.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fisher_diag(_sin_logits, p, x, kind="exact")  # new compile, same function: no warning
    want = fisher_diag(_sin_logits, p, x, kind="exact", fast=False)
    chex.assert_trees_all_close(got, want, rtol=1e-10)


# ----------------------------------------------------------------------------- compilation


def test_one_compilation_for_repeated_calls():
    traces = []
    w = jnp.ones((4, 3), F64)

    def logits_fn(p, x):
        traces.append(1)
        return x @ p["w"]

    x, _ = _data(0, (6, 4), 3, (6,))
    fisher_diag(logits_fn, {"w": w}, x, kind="sampled", key=jax.random.key(0))
    first = len(traces)
    for i in range(3):
        fisher_diag(logits_fn, {"w": w * (i + 2)}, x + i, kind="sampled", key=jax.random.key(i))
    assert len(traces) == first


# ----------------------------------------------------------------------------- errors


def test_errors():
    fn, params, x, y = mlp()
    with pytest.raises(ValueError, match="empirical.*labels"):
        fisher_diag(fn, params, x, kind="empirical")
    with pytest.raises(ValueError, match="sampled.*key"):
        fisher_diag(fn, params, x, kind="sampled")
    with pytest.raises(ValueError, match="kind must be one of"):
        fisher_diag(fn, params, x, y, kind="true")
    with pytest.raises(ValueError, match=r"labels must have shape.*\(5,\)"):
        fisher_diag(fn, params, x, y[:3], kind="empirical")
    with pytest.raises(ValueError, match=r"labels must have shape"):
        fisher_diag(fn, params, x, y[:, None], kind="empirical")
    with pytest.raises(TypeError, match="integer"):
        fisher_diag(fn, params, x, y.astype(F64), kind="empirical")
    with pytest.raises(ValueError, match="leading example axis"):
        fisher_diag(lambda p, xs: fn(p, xs[0]), params, (x, x[:3]), kind="exact")
    with pytest.raises(ValueError, match="batch_size"):
        fisher_diag(fn, params, x, kind="exact", batch_size=0)


def test_labels_out_of_range():
    fn, params, x, y = mlp()
    for bad, detail in ((y.at[0].set(3), "max 3"), (y.at[4].set(-1), "min -1")):
        with pytest.raises(ValueError, match=rf"class ids in \[0, 3\).*1 of 5.*{detail}"):
            fisher_diag(fn, params, x, bad, kind="empirical")
    fisher_diag(fn, params, x, y.at[0].set(3), kind="exact")  # labels unused: no check


def test_logits_fn_failure_is_wrapped():
    fn, params, x, _ = mlp()
    with pytest.raises(ValueError, match=r"logits_fn\(params, inputs\[:1\]\) failed"):
        fisher_diag(fn, params, x[:, :3], kind="exact")
    with pytest.raises(ValueError, match=r"shape \(1, \*token_axes, K\)"):
        fisher_diag(lambda p, x: fn(p, x)[0], params, x, kind="exact")


def test_non_finite():
    fn, params, x, y = mlp()
    bad = jax.tree_util.tree_map(lambda v: v, params)
    bad["params"]["Dense_1"]["kernel"] = bad["params"]["Dense_1"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(NonFiniteError, match=r"params\['params'\]\['Dense_1'\]\['kernel'\]"):
        fisher_diag(fn, bad, x, y, kind="empirical")
    huge = lambda p, x: fn(p, x) * 1e300  # noqa: E731 - squared gradients overflow to inf
    with pytest.raises(NonFiniteError, match=r"fisher\['params'\]"):
        fisher_diag(huge, params, x, y, kind="empirical")


def test_integer_params_rejected():
    fn, params, x, _ = plain()
    params = dict(params, step=jnp.array(3))
    with pytest.raises(TypeError, match=r"params\['step'\].*floating"):
        fisher_diag(fn, params, x, kind="exact")


def test_validation_ignores_numpy_inputs():
    fn, params, x, y = mlp()
    got = fisher_diag(fn, params, np.asarray(x), np.asarray(y), kind="empirical")
    chex.assert_tree_all_finite(got)
