"""orbax save/restore: a params tree sharded over a 2x4 mesh of host CPU devices, restored
onto a different target sharding, as saved, and with bf16 leaves kept bf16."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jmerge.io as jio


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("data", "model"))


def _params(mesh, scale=1.0):
    rng = np.random.default_rng(0)
    k = rng.normal(size=(8, 16)).astype(np.float32) * scale
    e = rng.normal(size=(4, 8)).astype(jnp.bfloat16)
    return {
        "params": {
            "dense": {"kernel": jax.device_put(k, NamedSharding(mesh, P("data", "model")))},
            "embed": jax.device_put(e, NamedSharding(mesh, P(None, "model"))),
            "bias": jnp.zeros(16, jnp.float32),
        }
    }


def _host(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def test_restore_onto_another_sharding(tmp_path, mesh):
    params = _params(mesh)
    path = jio.save_orbax(params, tmp_path / "ckpt")
    assert os.listdir(tmp_path) == ["ckpt"]  # orbax's tmp directory was renamed in
    target_specs = {
        "params": {"dense": {"kernel": P("model", None)}, "embed": P("data", None), "bias": P()}
    }
    target = jax.tree_util.tree_map(
        lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec)),
        params,
        target_specs,
    )
    restored = jio.restore_orbax(path, target)
    for r, t, x in zip(
        jax.tree_util.tree_leaves(restored),
        jax.tree_util.tree_leaves(target),
        jax.tree_util.tree_leaves(params),
        strict=True,
    ):
        assert r.sharding == t.sharding
        assert r.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(r), np.asarray(x))
    assert restored["params"]["embed"].dtype == jnp.bfloat16


def test_restore_as_saved_and_overwrite(tmp_path, mesh):
    params = _params(mesh)
    path = jio.save_orbax(params, tmp_path / "ckpt")
    restored = jio.restore_orbax(path)
    kernel = restored["params"]["dense"]["kernel"]
    assert kernel.sharding.spec == P("data", "model")
    assert restored["params"]["embed"].dtype == jnp.bfloat16
    jax.tree_util.tree_map(np.testing.assert_array_equal, _host(restored), _host(params))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        jio.save_orbax(params, path)
    new = _params(mesh, scale=2.0)
    jio.save_orbax(new, path, overwrite=True)
    assert os.listdir(tmp_path) == ["ckpt"]
    back = jio.restore_orbax(path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, _host(back), _host(new))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no orbax checkpoint"):
        jio.restore_orbax(tmp_path / "nope")
