"""hvp / ggn_vp / fisher_vp against dense references (jax.hessian, explicit JᵀHJ)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

from jmerge.curvature.hvp import fisher_vp, ggn_vp, hvp
from jmerge.tree import TreeMismatchError

RTOL = 1e-5


class _MLP(nn.Module):
    hidden: int = 5
    out: int = 3

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(self.hidden)(x))
        return nn.Dense(self.out)(x)


def _model(seed=0, d_in=4, hidden=5, out=3, n=6):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(k1, (n, d_in), dtype=jnp.float64)
    m = _MLP(hidden, out)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), m.init(k2, x))
    return m, params, x


def _xent(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1))


def _dense_columns(op, params):
    """The dense matrix of a linear map on pytrees, one jitted vmap over the basis vectors."""
    flat, unravel = ravel_pytree(params)
    column = lambda e: ravel_pytree(op(unravel(e)))[0]
    return jax.jit(jax.vmap(column, out_axes=1))(jnp.eye(flat.size, dtype=flat.dtype))


class HvpTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_hvp_matches_dense_hessian(self):
        m, params, x = _model()
        y = jnp.array([0, 1, 2, 0, 1, 2])
        loss = lambda p, b: _xent(m.apply(p, b[0]), b[1])
        flat, unravel = ravel_pytree(params)
        h = jax.hessian(lambda f: loss(unravel(f), (x, y)))(flat)
        v = jax.random.normal(jax.random.PRNGKey(3), flat.shape, dtype=flat.dtype)
        got = self.variant(hvp, static_argnums=0)(loss, params, (x, y), unravel(v))
        np.testing.assert_allclose(ravel_pytree(got)[0], h @ v, rtol=RTOL, atol=1e-12)

    @chex.variants(with_jit=True, without_jit=True)
    def test_ggn_matches_explicit_jt_h_j(self):
        m, params, x = _model(seed=1)
        y = jnp.array([2, 1, 0, 0, 1, 2])
        flat, unravel = ravel_pytree(params)
        z_fn = lambda f: m.apply(unravel(f), x)
        j = jax.jacobian(lambda f: z_fn(f).reshape(-1))(flat)  # (N*K, P)
        z = z_fn(flat)
        h_out = jax.hessian(lambda zz: _xent(zz.reshape(z.shape), y))(z.reshape(-1))
        ggn = j.T @ h_out @ j
        v = jax.random.normal(jax.random.PRNGKey(4), flat.shape, dtype=flat.dtype)
        fn = lambda p, vv: ggn_vp(lambda q, b: m.apply(q, b), lambda zz, b: _xent(zz, y), p, x, vv)
        got = self.variant(fn)(params, unravel(v))
        np.testing.assert_allclose(ravel_pytree(got)[0], ggn @ v, rtol=RTOL, atol=1e-12)

    @chex.variants(with_jit=True, without_jit=True)
    def test_fisher_vp_equals_ggn_of_cross_entropy(self):
        # For softmax cross-entropy the Fisher is the GGN, whatever the labels.
        m, params, x = _model(seed=2)
        y = jnp.zeros((x.shape[0],), jnp.int32)
        flat, unravel = ravel_pytree(params)
        v = unravel(jax.random.normal(jax.random.PRNGKey(5), flat.shape, dtype=flat.dtype))
        want = ggn_vp(lambda q, b: m.apply(q, b), lambda zz, b: _xent(zz, y), params, x, v)
        got = self.variant(lambda p, vv: fisher_vp(m.apply, p, x, vv))(params, v)
        chex.assert_trees_all_close(got, want, rtol=RTOL, atol=1e-12)


def test_fisher_vp_sequence_is_sum_over_tokens():
    # Logits (N, T, K): per-token output curvature, tokens summed, examples averaged.
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    w = {"a": jax.random.normal(k[0], (3, 4), dtype=jnp.float64), "b": jnp.zeros((4,))}
    x = jax.random.normal(k[1], (2, 5, 3), dtype=jnp.float64)
    fn = lambda p, xx: jnp.tanh(xx @ p["a"]) + p["b"]
    flat, unravel = ravel_pytree(w)
    z = fn(w, x)
    p = jax.nn.softmax(z, -1)
    j = jax.jacobian(lambda f: fn(unravel(f), x))(flat)  # (N, T, K, P)
    dense = jnp.zeros((flat.size, flat.size))
    for n in range(2):
        for t in range(5):
            m = jnp.diag(p[n, t]) - jnp.outer(p[n, t], p[n, t])
            dense += j[n, t].T @ m @ j[n, t] / 2
    got = _dense_columns(lambda v: fisher_vp(fn, w, x, v), w)
    np.testing.assert_allclose(got, dense, rtol=RTOL, atol=1e-12)


@settings(max_examples=5, deadline=None)
@given(d_in=st.integers(1, 4), hidden=st.integers(1, 5), out=st.integers(2, 4), n=st.integers(1, 5))
def test_hvp_shapes_vary(d_in, hidden, out, n):
    m, params, x = _model(seed=d_in + hidden, d_in=d_in, hidden=hidden, out=out, n=n)
    loss = lambda p, b: jnp.sum(m.apply(p, b) ** 2)
    flat, unravel = ravel_pytree(params)
    h = jax.hessian(lambda f: loss(unravel(f), x))(flat)
    got = _dense_columns(lambda v: hvp(loss, params, x, v), params)
    np.testing.assert_allclose(got, h, rtol=RTOL, atol=1e-10)


def test_hvp_rejects_mismatched_vector():
    m, params, x = _model()
    loss = lambda p, b: jnp.sum(m.apply(p, b))
    bad = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape + (1,)), params)
    with pytest.raises(TreeMismatchError, match=r"v\['params'\]\['Dense_0'\]\['bias'\] has shape"):
        hvp(loss, params, x, bad)
