"""The curvature functions inside jit and vmap, against their eager results.

Each public curvature function runs on one small Flax linen MLP (4 -> 8 -> 3, six examples) in
three traced modes: jitted with every array passed as an argument, jitted with everything
closed over, and vmapped over two parameter sets (and two vectors v for the products).
Checks that need values run eagerly on concrete (also closed-over) arrays and at run time on
traced ones: a RuntimeWarning, and a checkify error under ``checkify.checkify``.

Compilation dominates the time: one model, one data set, one jitted program per case and
mode (the value-check tests reuse the programs of the equality tests).
"""

import functools
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from jmerge.curvature import (
    fisher_diag,
    fisher_operator,
    fisher_vp,
    ggn_operator,
    ggn_vp,
    gram,
    hessian_operator,
    hvp,
    kfac_factors,
)
from jmerge.tree import NonFiniteError

tmap = jax.tree_util.tree_map
DENSE_1 = r"\['params'\]\['Dense_1'\]\['kernel'\]"


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(8, param_dtype=jnp.float64)(x))  # Dense_0: 4 -> 8
        return nn.Dense(3, param_dtype=jnp.float64)(h)  # Dense_1: 8 -> 3


MODEL = _MLP()
APPLY = MODEL.apply  # equal (hashable) on every access: one compile per case and shape


def _data():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 4)))
    spec = jax.eval_shape(MODEL.init, jax.random.key(0), x)
    draw = lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(s.shape[0]), s.dtype)
    params = [tmap(draw, spec) for _ in range(2)]
    vs = [tmap(draw, spec) for _ in range(2)]
    return {"x": x, "y": jnp.asarray([0, 1, 2, 2, 1, 0]), "key": jax.random.key(3)}, params, vs


D, PARAMS, VS = _data()
P2, V2 = (tmap(lambda *a: jnp.stack(a), *t) for t in (PARAMS, VS))


def _xent(logits, batch):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch[1][:, None], -1))


def _model(p, batch):
    return APPLY(p, batch[0])


def _loss(p, batch):
    return _xent(_model(p, batch), batch)


def _xy(d):
    return d["x"], d["y"]


# name -> f(params, v, data) -> pytree
CASES = {
    "hvp": lambda p, v, d: hvp(_loss, p, _xy(d), v),
    "ggn_vp": lambda p, v, d: ggn_vp(_model, _xent, p, _xy(d), v),
    "fisher_vp": lambda p, v, d: fisher_vp(APPLY, p, d["x"], v),
    "hessian_operator": lambda p, v, d: hessian_operator(_loss, p, _xy(d)).mv(v),
    "ggn_operator": lambda p, v, d: ggn_operator(_model, _xent, p, _xy(d)).mv(v),
    "fisher_operator": lambda p, v, d: fisher_operator(APPLY, p, d["x"]).mv(v),
    **{
        f"fisher_diag_{kind}": functools.partial(
            lambda p, v, d, kind: fisher_diag(APPLY, p, d["x"], d["y"], kind=kind, key=d["key"]),
            kind=kind,
        )
        for kind in ("exact", "sampled", "empirical")
    },
    "gram": lambda p, v, d: gram(APPLY, p, d["x"]).grams,
    "kfac_empirical": lambda p, v, d: (
        kfac_factors(APPLY, p, d["x"], d["y"], kind="empirical").factors
    ),
    "kfac_sampled": lambda p, v, d: (
        kfac_factors(APPLY, p, d["x"], kind="sampled", key=d["key"], batch_size=4).factors
    ),  # two chunks, the second padded
}
JIT = {name: jax.jit(f) for name, f in CASES.items()}


@functools.cache
def _eager(name):
    return [CASES[name](p, v, D) for p, v in zip(PARAMS, VS, strict=True)]


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("mode", ["jit_args", "jit_closed", "vmap"])
@pytest.mark.parametrize("name", list(CASES))
def test_traced_equals_eager(name, mode):
    f = CASES[name]
    want = _eager(name)
    if mode == "jit_args":  # params, v, inputs, labels and key all traced
        got = [JIT[name](p, v, D) for p, v in zip(PARAMS, VS, strict=True)]
    elif mode == "jit_closed":  # everything closed over (concrete while jit traces)
        got = [jax.jit(lambda: f(PARAMS[0], VS[0], D))()]
        want = want[:1]
    else:  # two parameter sets (and vectors) batched, the data closed over
        got = jax.vmap(lambda p, v: f(p, v, D))(P2, V2)
        want = tmap(lambda *a: jnp.stack(a), *want)
    chex.assert_trees_all_close(got, want, rtol=1e-9, atol=1e-12)
    jax.effects_barrier()


# ---- checks of values: eager when concrete, at run time when traced -------------------------


def _with_nan(params):
    bad = tmap(lambda a: a, params)
    kernel = bad["params"]["Dense_1"]["kernel"]
    bad["params"]["Dense_1"]["kernel"] = kernel.at[0, 0].set(jnp.nan)
    return bad


def _checkify_error(f, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        err, _ = checkify.checkify(f, errors=checkify.user_checks)(*args)
        jax.effects_barrier()
    return err


@pytest.mark.filterwarnings("ignore:fisher is not finite:RuntimeWarning")
def test_fisher_diag_non_finite_params():
    bad = _with_nan(PARAMS[0])
    f = CASES["fisher_diag_empirical"]
    with pytest.raises(NonFiniteError, match="params" + DENSE_1):  # eager
        f(bad, None, D)
    with pytest.raises(NonFiniteError, match="params" + DENSE_1):  # closed over inside jit
        jax.jit(lambda d: f(bad, None, d))(D)
    with pytest.warns(RuntimeWarning, match="params" + DENSE_1):  # traced
        out = JIT["fisher_diag_empirical"](bad, VS[0], D)
        jax.effects_barrier()
    assert np.isnan(out["params"]["Dense_0"]["kernel"]).any()
    with pytest.warns(RuntimeWarning, match="params" + DENSE_1):  # batched
        out = jax.vmap(lambda p: f(p, None, D))(tmap(lambda *a: jnp.stack(a), PARAMS[1], bad))
        jax.effects_barrier()
    chex.assert_tree_all_finite(tmap(lambda a: a[0], out))
    err = _checkify_error(JIT["fisher_diag_empirical"], bad, VS[0], D)
    with pytest.raises(checkify.JaxRuntimeError, match="params has NaN or Inf"):
        err.throw()


def test_fisher_diag_overflow_under_jit():
    huge = lambda p, x: APPLY(p, x) * 1e300  # noqa: E731 - squared gradients overflow
    f = jax.jit(lambda p, d: fisher_diag(huge, p, d["x"], d["y"], kind="empirical"))
    with pytest.warns(RuntimeWarning, match="Fisher is not finite although params are") as rec:
        f(PARAMS[0], D)
        jax.effects_barrier()
    assert not any("params['params']" in str(r.message) for r in rec)


@pytest.mark.parametrize("name", ["fisher_diag_empirical", "kfac_empirical"])
def test_labels_out_of_range(name):
    d = dict(D, y=D["y"].at[2].set(3))
    message = r"labels must be class ids in \[0, 3\)"
    with pytest.raises(ValueError, match=message + ".*1 of 6 outside"):  # eager
        CASES[name](PARAMS[0], VS[0], d)
    with pytest.raises(ValueError, match=message):  # closed over inside jit
        jax.jit(lambda p: CASES[name](p, VS[0], d))(PARAMS[0])
    with pytest.warns(RuntimeWarning, match=message):  # traced
        JIT[name](PARAMS[0], VS[0], d)
        jax.effects_barrier()
    with pytest.raises(checkify.JaxRuntimeError, match=message):
        _checkify_error(JIT[name], PARAMS[0], VS[0], d).throw()


def test_gram_and_kfac_non_finite_inputs_warn_under_jit():
    d = dict(D, x=D["x"].at[1, 2].set(jnp.inf))
    with pytest.warns(RuntimeWarning, match=r"gram is not finite at gram\[.*Dense_0"):
        JIT["gram"](PARAMS[0], VS[0], d)
        jax.effects_barrier()
    with pytest.warns(RuntimeWarning, match=r"kfac_factors is not finite"):
        JIT["kfac_sampled"](PARAMS[0], VS[0], d)
        jax.effects_barrier()
