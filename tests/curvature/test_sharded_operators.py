"""The curvature operators by themselves on a 2-D mesh of 8 host CPU devices (issue 10, item 2):
``Diagonal``, ``BlockGram``, ``KFAC`` and their combinations (``Sum``, ``Scaled``, ``damped``),
``mv`` and ``diag``, jitted under an Auto and under an Explicit mesh.

Layout: ``make_mesh((2, 4), ("data", "model"))``; an MLP whose first and last kernels are
sharded on their output axis and whose middle kernel on its input axis (the two layouts of
tensor parallelism), one bias sharded, the others replicated. The Gram and K-FAC factors are
those ``gram`` / ``kfac_factors`` compute and place on the mesh from the sharded model and a
data-sharded batch (a Gram / A like the kernel's input axis, B's rows like its output axis).

For each operator and method: (a) the output leaves have the vector's shardings; (b) the
compiled program gathers nothing: no all-gather, all-to-all or collective-permute of more than
a few scalars, and the only larger collectives are sums over "model" of kernel-shaped partial
products, which the math needs when a factor couples entries that live on different devices
(G W with W's input axis sharded, W B with its output axis sharded); (c) the values equal a
float64 NumPy reference (``np.kron`` of the factors, ``G @ W``, ``d * v``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jmerge import curvature
from jmerge import sharding as shd
from tests.helpers import collectives

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (host) devices")

SMALL = 8
RULES = [
    (r"\['l1'\]\['kernel'\]", P(None, "model")),
    (r"\['l2'\]\['kernel'\]", P("model", None)),
    (r"\['head'\]\['kernel'\]", P(None, "model")),
    (r"\['l1'\]\['bias'\]", P("model")),
]


def _init(seed):
    r = np.random.default_rng(seed)

    def n(*s):
        return (r.normal(size=s) / np.sqrt(s[0])).astype(np.float32)

    return {
        "l1": {"kernel": n(48, 256), "bias": n(256)},
        "l2": {"kernel": n(256, 128), "bias": n(128)},
        "head": {"kernel": n(128, 8), "bias": n(8)},
    }


def logits_fn(p, x):
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    h = jnp.tanh(h @ p["l2"]["kernel"] + p["l2"]["bias"])
    return h @ p["head"]["kernel"] + p["head"]["bias"]


@functools.cache
def problem(axis_types):
    """(params, vector, diagonal, BlockGram, KFAC) on the mesh."""
    mesh = shd.make_mesh((2, 4), ("data", "model"), axis_types=axis_types)
    r = np.random.default_rng(5)
    x = r.normal(size=(64, 48)).astype(np.float32)
    y = r.integers(0, 8, 64)
    params = shd.shard_params(_init(0), mesh, RULES)
    v = shd.shard_params(_init(1), mesh, RULES)
    d = shd.shard_params(jax.tree.map(lambda a: np.abs(a) + 0.1, _init(2)), mesh, RULES)
    x, y = shd.shard_batch((x, y), mesh)
    with jax.set_mesh(mesh):
        grams = curvature.gram(logits_fn, params, x)
        kfac = curvature.kfac_factors(logits_fn, params, x, y, kind="empirical")
    return mesh, params, v, d, grams, kfac


def _ops(axis_types):
    _, _, _, d, grams, kfac = problem(axis_types)
    diag = curvature.Diagonal(d)
    return {
        "Diagonal": diag,
        "BlockGram": grams,
        "KFAC": kfac,
        "Sum": curvature.Sum((curvature.Scaled(kfac, 0.5), diag)),
        "damped_BlockGram": curvature.damped(grams, 0.1),
    }


# ------------------------------------------------------------------------ float64 reference


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _ref_mv(name, op, v):
    """The operator applied in NumPy float64 from its own arrays."""
    paths = lambda t: dict(jax.tree_util.tree_leaves_with_path(t))  # noqa: E731
    vv = {jax.tree_util.keystr(k): x for k, x in paths(_np(v)).items()}

    def diag(op):
        return {jax.tree_util.keystr(k): x for k, x in paths(_np(op.tree)).items()}

    def blocks(op, fn):
        out = {}
        for k, x in vv.items():
            if k in fn:
                out[k] = fn[k](x)
            else:
                out[k] = float(op.rest) * x
        return out

    if name == "Diagonal":
        dd = diag(op)
        return {k: dd[k] * x for k, x in vv.items()}
    if name in ("BlockGram", "damped_BlockGram"):
        g = op.op if name == "damped_BlockGram" else op
        mats = {k: np.asarray(m, np.float64) for k, m in g.grams.items()}
        fns = {k: (lambda x, m=m: m @ x) for k, m in mats.items()}
        out = blocks(g, fns)
        if name == "damped_BlockGram":
            out = {k: o + float(op.delta) * vv[k] for k, o in out.items()}
        return out
    if name in ("KFAC", "Sum"):
        kf = op if name == "KFAC" else op.ops[0].op
        fns = {}
        for k, (a, b) in kf.factors.items():
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            fns[k] = lambda x, a=a, b=b: (np.kron(a, b) @ x.ravel()).reshape(x.shape)
        out = blocks(kf, fns)
        if name == "Sum":
            dd = diag(op.ops[1])
            out = {k: 0.5 * o + dd[k] * vv[k] for k, o in out.items()}
        return out
    raise AssertionError(name)


# ------------------------------------------------------------------------------------ tests


def _kernel_partial_sum(c, params) -> bool:
    kernels = {np.shape(p) for p in jax.tree.leaves(params) if np.ndim(p) == 2}
    return c.op in ("all-reduce", "reduce-scatter") and c.axes == ("model",) and c.shape in kernels


def _factor_diagonal_sum(c, params) -> bool:
    """diag of a (d, d) factor whose columns are sharded (the Gram / A of a kernel sharded on
    its input axis), traced under an Auto mesh: the masked sum over columns
    (``operators._diagonal``) ends in an all-reduce of the (d,) partial sums, a vector of a
    kernel dimension, once per call (the Jacobi preconditioner's setup, not a CG step). On an
    Explicit mesh, or eagerly on placed factors, the layout is known and the sum runs over
    the unsharded axis instead (no collective)."""
    dims = {n for p in jax.tree.leaves(params) if np.ndim(p) == 2 for n in np.shape(p)}
    return (
        c.op == "all-reduce" and c.axes == ("model",) and len(c.shape) == 1 and c.shape[0] in dims
    )


@functools.cache
def _run(axis_types, name, method):
    mesh, params, v, *_ = problem(axis_types)
    op = _ops(axis_types)[name]
    fn = (lambda op, v: op.mv(v)) if method == "mv" else (lambda op, v: op.diag(v))
    # Under an Auto mesh XLA picks a jitted function's output layout; a user pins it with
    # out_shardings (as in test_sharded_curvature.py). Under an Explicit mesh the types do.
    out_shardings = shd.shardings_of(v) if axis_types == "auto" else None
    with jax.set_mesh(mesh):
        program = jax.jit(fn, out_shardings=out_shardings).lower(op, v).compile()
        return program, program(op, v)


@pytest.mark.parametrize("axis_types", ["auto", "explicit"])
@pytest.mark.parametrize("method", ["mv", "diag"])
@pytest.mark.parametrize("name", ["Diagonal", "BlockGram", "KFAC", "Sum", "damped_BlockGram"])
def test_operator_on_mesh(name, method, axis_types):
    mesh, params, v, *_ = problem(axis_types)
    program, out = _run(axis_types, name, method)
    # (a) the vector's layout
    for (path, o), w in zip(
        jax.tree_util.tree_leaves_with_path(out), jax.tree.leaves(v), strict=True
    ):
        assert o.sharding.is_equivalent_to(w.sharding, o.ndim), (
            f"{name}.{method}: output{jax.tree_util.keystr(path)} has {o.sharding.spec}, the "
            f"vector has {w.sharding.spec}"
        )
    # (b) no gathers; sums of kernel-shaped partial products over "model" only
    bad = [
        c
        for c in collectives(program.as_text(), dict(mesh.shape))
        if int(np.prod(c.shape)) > SMALL
        and not _kernel_partial_sum(c, params)
        and not (method == "diag" and axis_types == "auto" and _factor_diagonal_sum(c, params))
    ]
    assert not bad, f"{name}.{method}: collectives that gather:\n" + "\n".join(map(str, bad))
    # (c) values
    if method == "mv":
        want = _ref_mv(name, _ops(axis_types)[name], v)
    else:  # diag(C) = C applied to each unit vector, read off the NumPy reference's matrix
        want = _ref_diag(name, _ops(axis_types)[name], v)
    got = {
        jax.tree_util.keystr(k): np.asarray(x) for k, x in jax.tree_util.tree_leaves_with_path(out)
    }
    for k, w in want.items():
        atol = 1e-5 * float(np.max(np.abs(w)))  # float32 sums of up to 256 terms
        np.testing.assert_allclose(got[k], w, rtol=2e-5, atol=atol, err_msg=f"{name}.{method}{k}")


def _ref_diag(name, op, like):
    """diag(C) per leaf from the reference: ``diag(np.kron(A, B))``, ``diag(G)`` broadcast
    over the output axis, ``d``; plus the scalings of the combinations."""
    leaves = {
        jax.tree_util.keystr(k): np.shape(x) for k, x in jax.tree_util.tree_leaves_with_path(like)
    }
    if name == "Diagonal":
        return {
            jax.tree_util.keystr(k): np.asarray(x, np.float64)
            for k, x in jax.tree_util.tree_leaves_with_path(op.tree)
        }
    if name in ("BlockGram", "damped_BlockGram"):
        g = op.op if name == "damped_BlockGram" else op
        out = {}
        for k, s in leaves.items():
            if k in g.grams:
                dg = np.diag(np.asarray(g.grams[k], np.float64))
                out[k] = np.broadcast_to(dg[:, None], s)
            else:
                out[k] = np.full(s, float(g.rest))
            if name == "damped_BlockGram":
                out[k] = out[k] + float(op.delta)
        return out
    kf = op if name == "KFAC" else op.ops[0].op
    out = {}
    for k, s in leaves.items():
        if k in kf.factors:
            a, b = (np.asarray(m, np.float64) for m in kf.factors[k])
            out[k] = np.diag(np.kron(a, b)).reshape(s)
        else:
            out[k] = np.full(s, float(kf.rest))
    if name == "Sum":
        dd = _ref_diag("Diagonal", op.ops[1], like)
        out = {k: 0.5 * o + dd[k] for k, o in out.items()}
    return out
