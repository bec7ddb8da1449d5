"""Curvature on a 2-D mesh of 8 host CPU devices keeps the parameters' shardings and gathers
nothing parameter- or input-sized (issue 10, item 2), asserted on the compiled program.

Layout: ``make_mesh((2, 4), ("data", "model"))``; an MLP whose kernels are sharded on their
output axis over "model" (``kernel -> P(None, "model")``), the first bias and a gain sharded
by rules, the second bias and the head bias replicated; 64 examples sharded over "data".

What may be communicated: evaluating a model whose kernels are sharded over "model" is
tensor-parallel, so a plain ``jax.grad`` of its loss on this mesh already all-gathers
activations over "model" before each column-sharded matmul (one data shard's examples:
shape ``(32, ...)``) and all-reduces partial sums; the curvature sums over examples are
all-reduced over "data"; a replicated leaf whose layer runs model-sharded has its own
curvature all-gathered (its size: what every device already holds). So for each function,
jitted on the sharded arguments: (a) the outputs are placed like the parameters (Gram / K-FAC
factors like their kernel's axes: a replicated Gram and A, B's rows over "model"); (b) the
compiled HLO runs no collective over "data" but all-reduces / reduce-scatters (no input or
example is gathered), no all-to-all or collective-permute, and no all-gather over "model"
other than of activations or of a replicated leaf's size (so none of a sharded parameter, a
per-example gradient or a Gram); (c) the values equal the same function on one device.

Eager calls on sharded parameters pin their outputs to the parameters' shardings; under an
outer ``jit`` the user passes ``out_shardings`` (what (b) compiles).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jmerge
from jmerge import curvature
from jmerge import sharding as shd
from tests.helpers import collectives

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (host) devices")

N, D_IN, K = 64, 40, 8
EXAMPLES_PER_SHARD = N // 2
WIDEST = 256
SMALL = 8  # scalars, flags, the head bias
RULES = [
    (r"kernel", P(None, "model")),
    (r"\['l1'\]\['bias'\]", P("model")),
    (r"gain", P("model")),
]
REDUCTIONS = ("all-reduce", "reduce-scatter")


def _init(seed):
    r = np.random.default_rng(seed)

    def n(*s):
        return (r.normal(size=s) / np.sqrt(s[0])).astype(np.float32)

    return {
        "l1": {"kernel": n(D_IN, 256), "bias": n(256)},
        "gain": (1 + 0.1 * r.normal(size=256)).astype(np.float32),
        "l2": {"kernel": n(256, 96), "bias": n(96)},
        "head": {"kernel": n(96, K), "bias": n(K)},
    }


def logits_fn(p, x):
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"]) * p["gain"]
    h = jnp.tanh(h @ p["l2"]["kernel"] + p["l2"]["bias"])
    return h @ p["head"]["kernel"] + p["head"]["bias"]


@functools.cache
def host_problem():
    r = np.random.default_rng(7)
    x = r.normal(size=(N, D_IN)).astype(np.float32)
    y = r.integers(0, K, N)
    return _init(0), [_init(1), _init(2)], x, y


@functools.cache
def mesh():
    return shd.make_mesh((2, 4), ("data", "model"))


@functools.cache
def sharded_problem():
    pre, ft, x, y = host_problem()
    place = lambda t: shd.shard_params(t, mesh(), RULES)  # noqa: E731
    x, y = shd.shard_batch((x, y), mesh())
    return place(pre), [place(f) for f in ft], x, y


KEY = jax.random.key(3)


def _fisher(kind, fast):
    def fn(p, ft, x, y):
        return curvature.fisher_diag(logits_fn, p, x, y, kind=kind, key=KEY, fast=fast)

    return fn


def _fisher_mv(p, ft, x, y):
    return curvature.fisher_operator(logits_fn, p, x).mv(ft[0])


def _mats_matrix_free(p, ft, x, y):
    ops = [curvature.fisher_operator(logits_fn, f, x) for f in ft]
    return jmerge.mats(p, ft, ops, maxiter=3, damping=0.1).params


def _gm_matrix_free(p, ft, x, y):
    ops = [curvature.fisher_operator(logits_fn, f, x) for f in ft]
    return jmerge.gradient_matching(p, ft, ops, alpha=0.5, prior=0.1, maxiter=3).params


# name -> function of (params, [finetuned], x, y); its output is shaped like params unless
# named in FACTORS.
CASES = {
    "fisher_empirical_fast": _fisher("empirical", True),
    "fisher_empirical_generic": _fisher("empirical", False),
    "fisher_exact_fast": _fisher("exact", True),
    "fisher_sampled_fast": _fisher("sampled", True),
    "gram": lambda p, ft, x, y: curvature.gram(logits_fn, p, x).grams,
    "kfac_factors": lambda p, ft, x, y: (
        curvature.kfac_factors(logits_fn, p, x, y, kind="empirical").factors
    ),
    "fisher_operator_mv": _fisher_mv,
    "mats_matrix_free": _mats_matrix_free,
    "gradient_matching_matrix_free": _gm_matrix_free,
}
KERNELS = ("['l1']['kernel']", "['l2']['kernel']", "['head']['kernel']")
FACTORS = {
    "gram": {k: P() for k in KERNELS},
    "kfac_factors": {k: (P(), P("model", None)) for k in KERNELS},
}


@functools.cache
def eager(name):
    pre, ft, x, y = sharded_problem()
    return CASES[name](pre, ft, x, y)


@functools.cache
def compiled(name):
    """The function jitted as a user would on the sharded arguments: ``out_shardings`` those
    of the eager call, under ``jax.set_mesh``."""
    out = eager(name)
    with jax.set_mesh(mesh()):
        return (
            jax.jit(CASES[name], out_shardings=shd.shardings_of(out))
            .lower(*sharded_problem())
            .compile()
        )


def expected_shardings(name):
    pre = sharded_problem()[0]
    if name in FACTORS:
        return jax.tree.map(lambda s: NamedSharding(mesh(), s), FACTORS[name])
    return shd.shardings_of(pre)


def offending(hlo):
    """The collectives of ``hlo`` that (b) of the module docstring forbids."""
    pre = host_problem()[0]
    replicated = {
        np.shape(x)
        for x, s in zip(
            jax.tree.leaves(pre), jax.tree.leaves(shd.param_specs(pre, mesh(), RULES)), strict=True
        )
        if s == P()
    }

    def allowed(c):
        size = int(np.prod(c.shape))
        if size <= SMALL or (c.axes is not None and c.op in REDUCTIONS):
            return True
        if c.axes != ("model",) or c.op != "all-gather":
            return False
        activation = c.shape[0] == EXAMPLES_PER_SHARD and size // c.shape[0] <= K * WIDEST
        return activation or c.shape in replicated

    return [c for c in collectives(hlo, dict(mesh().shape)) if not allowed(c)]


GENERIC_UNDER_JIT = (
    "under an outer jit (traced params, Auto mesh) the generic path cannot read the params' "
    "layout to constrain the per-example gradients to it; XLA then all-to-alls blocks of "
    "them over 'model' (f32[64,1,24], f32[24,1,2]) in the sum over examples. The eager call "
    "constrains them (its kernel compiles with no all-to-all)"
)


def _marked(xfail):
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=xfail[n])) if n in xfail else n
        for n in CASES
    ]


@pytest.mark.parametrize(
    "name",
    _marked({}),
)
def test_outputs_keep_the_params_shardings(name):
    out, want = eager(name), expected_shardings(name)
    for (path, o), s in zip(
        jax.tree_util.tree_leaves_with_path(out), jax.tree.leaves(want), strict=True
    ):
        assert o.sharding.is_equivalent_to(s, o.ndim), (
            f"{name}: output{jax.tree_util.keystr(path)} has {o.sharding.spec}, expected {s.spec}"
        )


@pytest.mark.parametrize(
    "name",
    _marked(
        {
            "fisher_empirical_generic": GENERIC_UNDER_JIT,
        }
    ),
)
def test_gathers_nothing_and_matches_one_device(name):
    bad = offending(compiled(name).as_text())
    assert not bad, f"{name}: parameter- or input-sized collectives:\n" + "\n".join(map(str, bad))
    pre, ft, x, y = host_problem()
    ref = CASES[name](pre, ft, x, y)
    chex.assert_trees_all_close(
        jax.tree.map(np.asarray, eager(name)),
        jax.tree.map(np.asarray, ref),
        rtol=2e-4,
        atol=2e-6,
    )


@functools.cache
def explicit_mesh():
    return shd.make_mesh((2, 4), ("data", "model"), axis_types="explicit")


@functools.cache
def explicit_compiled(name):
    """``name`` jitted under an Explicit mesh (``AxisType.Explicit``), with no ``out_shardings``:
    the values' types carry their shardings, so the traced functions know the parameters'
    layout (the curvature kernels run with the axes switched to Auto inside,
    ``jmerge.sharding.on_auto_axes``) and the outputs' layouts come from the types."""
    mesh = explicit_mesh()
    pre, ft, x, y = host_problem()
    place = lambda t: shd.shard_params(t, mesh, RULES)  # noqa: E731
    x, y = shd.shard_batch((x, y), mesh)
    args = (place(pre), [place(f) for f in ft], x, y)
    with jax.set_mesh(mesh):
        program = jax.jit(CASES[name]).lower(*args).compile()
        return program, program(*args)


@pytest.mark.parametrize("name", list(CASES))
def test_explicit_mesh_keeps_shardings_gathers_nothing_and_matches(name):
    program, out = explicit_compiled(name)
    if name in FACTORS:
        want = jax.tree.map(lambda s: NamedSharding(explicit_mesh(), s), FACTORS[name])
    else:
        want = shd.shardings_of(shd.shard_params(host_problem()[0], explicit_mesh(), RULES))
    for (path, o), s in zip(
        jax.tree_util.tree_leaves_with_path(out), jax.tree.leaves(want), strict=True
    ):
        assert o.sharding.is_equivalent_to(s, o.ndim), (
            f"{name}: output{jax.tree_util.keystr(path)} has {o.sharding.spec}, expected {s.spec}"
        )
    bad = offending(program.as_text())
    assert not bad, f"{name}: parameter- or input-sized collectives:\n" + "\n".join(map(str, bad))
    chex.assert_trees_all_close(
        jax.tree.map(np.asarray, out),
        jax.tree.map(np.asarray, CASES[name](*host_problem())),
        rtol=2e-4,
        atol=2e-6,
    )
