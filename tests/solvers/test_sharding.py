"""jmerge.cg on a mesh of 8 host CPU devices: output shardings kept, no parameter-sized gathers.

Recorded, not asserted (jax 0.10.2, this layout, Auto mesh): ``jax.scipy.sparse.linalg.cg`` on
the same operator and right-hand side compiles to 5 ``f32[64,256] all-gather`` ops (its
``jnp.vdot`` ravels the column-sharded kernel), and under an Explicit mesh it fails at trace time
with ``ShardingTypeError: Contracting dimensions are sharded ...``. jmerge's compiled loop has
only scalar all-reduces. ``benchmarks/bench_solvers.py`` does not re-measure this.
"""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jmerge.curvature.operators import BlockGram, Diagonal, MatrixFree
from jmerge.solvers import CONVERGED, cg
from jmerge.solvers.cg import _tree_vdot
from tests.helpers import assert_only_scalar_collectives, collectives

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (host) devices")

SHAPES = {"v": (1024,), "w": {"kernel": (64, 256), "bias": (3,)}, "m": (128, 16)}
SPECS = {"v": P("x"), "w": {"kernel": P(None, "x"), "bias": P()}, "m": P("x", None)}
KERNEL = "['w']['kernel']"
def sharded_tree(mesh, seed, transform=lambda x: x, dtype=np.float32):
    """Random leaves (numpy ``transform`` applied on the host) placed with SPECS on ``mesh``."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s, spec: jax.device_put(
            transform(rng.normal(size=s)).astype(dtype), NamedSharding(mesh, spec)
        ),
        SHAPES,
        SPECS,
        is_leaf=lambda s: isinstance(s, tuple),
    )


def make_operator(mesh):
    """diag(d) + u uᵀ + BlockGram on the column-sharded kernel (rest 0 elsewhere)."""
    d = sharded_tree(mesh, 1, lambda x: 1.0 + x * x)
    u = sharded_tree(mesh, 2, lambda x: 0.1 * x)
    low_rank = MatrixFree(
        lambda v, u: jax.tree.map(lambda ui: _tree_vdot(u, v) * ui, u), operands=(u,)
    )
    gram = BlockGram({KERNEL: 2.0 * np.eye(64, dtype=np.float32)}, rest=0.0)
    return Diagonal(d) + low_rank + gram


def check_mesh(mesh):
    b = sharded_tree(mesh, 0)
    op = make_operator(mesh)
    solve = jax.jit(lambda op, b: cg(op, b, rtol=1e-5)).lower(op, b).compile()
    assert_only_scalar_collectives(solve.as_text())
    res = solve(op, b)
    assert int(res.status) == CONVERGED
    for (path, x), ref in zip(
        jax.tree_util.tree_leaves_with_path(res.x), jax.tree.leaves(b), strict=True
    ):
        assert x.sharding.is_equivalent_to(ref.sharding, x.ndim), (
            f"{jax.tree_util.keystr(path)}: {x.sharding} != {ref.sharding}"
        )
    # the answer is right: ‖b − A x‖ ≤ 1e-4 ‖b‖, with A x in numpy float64
    host = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)
    diag_op, low_rank, _ = op.ops
    x, b64, d, u = host(res.x), host(b), host(diag_op.tree), host(low_rank.operands[0])
    ux = sum(np.vdot(a, c) for a, c in zip(jax.tree.leaves(u), jax.tree.leaves(x), strict=True))
    ax = jax.tree.map(lambda di, xi, ui: di * xi + ux * ui, d, x, u)
    ax["w"]["kernel"] = ax["w"]["kernel"] + 2.0 * x["w"]["kernel"]
    norm = lambda t: np.sqrt(sum(np.sum(q**2) for q in jax.tree.leaves(t)))
    assert norm(jax.tree.map(np.subtract, b64, ax)) <= 1e-4 * norm(b64)


def test_cg_keeps_sharding_auto_mesh():
    check_mesh(jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,)))


def test_cg_keeps_sharding_explicit_mesh():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        check_mesh(mesh)


def test_tree_vdot_on_sharded_leaves():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    x, y = sharded_tree(mesh, 3), sharded_tree(mesh, 4)
    f = jax.jit(_tree_vdot)
    expected = sum(
        np.vdot(np.asarray(a, np.float64), np.asarray(b, np.float64))
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)
    )
    np.testing.assert_allclose(float(f(x, y)), expected, rtol=1e-5)
    text = f.lower(x, y).compile().as_text()
    assert collectives(text), "expected a scalar all-reduce"
    assert_only_scalar_collectives(text)
