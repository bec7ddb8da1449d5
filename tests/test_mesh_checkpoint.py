"""Checkpoint round trip on a mesh of 8 host devices (issue 10, item 4).

Models are saved with ``jmerge.io.save_orbax``, restored with ``restore_orbax`` directly onto
their target shardings (``jmerge.sharding.abstract_like`` targets: each device reads only its
slice, no whole-model host copy), merged on the mesh, and the merge saved sharded and restored
again. Checked: every restored and merged leaf has the target sharding and holds only its
shard per device, and the values equal NumPy float64 closed forms of the merges.
"""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jmerge
from jmerge.io import restore_orbax, save_orbax
from jmerge.sharding import abstract_like, make_mesh, param_specs, shard_params

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (host) devices")

SHAPES = {
    "dense": {"kernel": (16, 24), "bias": (24,)},
    "conv": {"kernel": (3, 3, 4, 8)},
    "scale": (3,),  # indivisible by 8: replicated
}
T = 3


def _host_models(seed=0):
    rng = np.random.default_rng(seed)
    leaf = lambda s: rng.normal(size=s).astype(np.float32)
    is_shape = lambda s: isinstance(s, tuple)
    theta0 = jax.tree.map(leaf, SHAPES, is_leaf=is_shape)
    finetuned = [jax.tree.map(lambda a: a + 0.1 * leaf(a.shape), theta0) for _ in range(T)]
    fishers = [
        jax.tree.map(lambda a: (0.1 + leaf(a.shape) ** 2).astype(np.float32), theta0)
        for _ in range(T)
    ]
    return theta0, finetuned, fishers


def _check_placed(tree, shardings):
    """Every leaf has its target sharding, and each device holds only its shard."""
    for (path, x), s in zip(
        jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(shardings), strict=True
    ):
        where = jax.tree_util.keystr(path)
        assert isinstance(x, jax.Array), f"{where}: {type(x)}"
        assert x.sharding.is_equivalent_to(s, x.ndim), f"{where}: {x.sharding} != {s}"
        for shard in x.addressable_shards:
            assert shard.data.shape == s.shard_shape(x.shape), where


def _assert_values(tree, expected, rtol=1e-6):
    for (path, x), e in zip(
        jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(expected), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(x, np.float64), e, rtol=rtol, atol=rtol, err_msg=jax.tree_util.keystr(path)
        )


@pytest.fixture(scope="module")
def mesh():
    return make_mesh()  # ("data": 1, "model": 8)


def test_restore_merge_save_on_mesh(tmp_path, mesh):
    theta0, finetuned, fishers = _host_models()
    # Saved from host values (as a checkpoint written elsewhere would be).
    save_orbax(theta0, tmp_path / "theta0")
    for t in range(T):
        save_orbax(finetuned[t], tmp_path / f"ft{t}")
        save_orbax(fishers[t], tmp_path / f"fisher{t}")

    specs = param_specs(theta0, mesh, min_size=0)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    assert specs["dense"]["kernel"] == P(None, "model") and specs["scale"] == P()
    target = abstract_like(theta0, shardings)
    restore = lambda name: restore_orbax(tmp_path / name, target)
    th0 = restore("theta0")
    fts = [restore(f"ft{t}") for t in range(T)]
    fis = [restore(f"fisher{t}") for t in range(T)]
    for tree in (th0, *fts, *fis):
        _check_placed(tree, shardings)
    _assert_values(fts[1], finetuned[1], rtol=0)

    # Merges on the mesh keep the shardings.
    f64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
    ta = jax.jit(lambda p, f: jmerge.task_arithmetic(p, f, 0.3))(th0, fts)
    mats = jmerge.mats(th0, fts, fis, init="task_arithmetic", init_alpha=0.3, rtol=1e-7)
    _check_placed(ta, shardings)
    _check_placed(mats.params, shardings)
    ta_ref = jax.tree.map(
        lambda a, *b: a + 0.3 * sum(x - a for x in b), f64(theta0), *map(f64, finetuned)
    )
    # MaTS with diagonal curvatures: θ = Σ_t F_t θ_t / Σ_t F_t (elementwise).
    fisher_ref = jax.tree.map(
        lambda *fx: sum(f * x for f, x in zip(fx[:T], fx[T:], strict=True)) / sum(fx[:T]),
        *map(f64, fishers),
        *map(f64, finetuned),
    )
    _assert_values(ta, ta_ref, rtol=1e-5)
    _assert_values(mats.params, fisher_ref, rtol=1e-5)

    # Saved sharded; restored as saved, and onto another layout (replicated).
    save_orbax(mats.params, tmp_path / "merged")
    again = restore_orbax(tmp_path / "merged", abstract_like(mats.params))
    _check_placed(again, shardings)
    _assert_values(again, f64(mats.params), rtol=0)
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), shardings)
    full = restore_orbax(tmp_path / "merged", abstract_like(theta0, replicated))
    _check_placed(full, replicated)
    _assert_values(full, f64(mats.params), rtol=0)


def test_restore_with_wrong_shape_names_the_problem(tmp_path, mesh):
    theta0, _, _ = _host_models()
    save_orbax(theta0, tmp_path / "theta0")
    shapes = dict(SHAPES, dense={"kernel": (16, 32), "bias": (24,)})
    bad = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, np.float32, sharding=NamedSharding(mesh, P())),
        shapes,
        is_leaf=lambda s: isinstance(s, tuple),
    )
    with pytest.raises(ValueError):
        restore_orbax(tmp_path / "theta0", bad)


def test_shard_params_then_save_restore_keeps_layout(tmp_path, mesh):
    theta0, _, _ = _host_models(1)
    placed = shard_params(theta0, mesh, min_size=0)
    save_orbax(placed, tmp_path / "placed")
    back = restore_orbax(tmp_path / "placed", abstract_like(placed))
    _check_placed(back, jax.tree.map(lambda x: x.sharding, placed))
    _assert_values(back, jax.tree.map(lambda a: np.asarray(a, np.float64), theta0), rtol=0)
