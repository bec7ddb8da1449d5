"""Tests of jmerge.sharding: meshes, placement rules and their errors, batches (8 host CPUs)."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jmerge import sharding as shd

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (host) devices")


def _mesh(types="auto"):
    return shd.make_mesh((2, 4), ("data", "model"), axis_types=types)


def test_make_mesh_sizes_and_types():
    assert dict(shd.make_mesh().shape) == {"data": 1, "model": 8}  # one process: (1, n)
    assert dict(shd.make_mesh((-1, 2)).shape) == {"data": 4, "model": 2}
    assert dict(shd.make_mesh(axis_names=("x",)).shape) == {"x": 8}
    assert shd.make_mesh().axis_types == (AxisType.Auto, AxisType.Auto)
    assert _mesh("explicit").axis_types == (AxisType.Explicit,) * 2
    mixed = shd.make_mesh((2, 4), axis_types=("explicit", AxisType.Auto))
    assert mixed.axis_types == (AxisType.Explicit, AxisType.Auto)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"axis_shapes": (3, 2)}, "multiply to 6, but there are 8 devices"),
        ({"axis_shapes": (-1, -1)}, "at most one -1"),
        ({"axis_shapes": (3, -1)}, "not divisible by 3"),
        ({"axis_shapes": (8,)}, "1 axis sizes"),
        ({"axis_names": ("a", "a")}, "distinct"),
        ({"axis_types": "manual"}, "unknown axis type"),
    ],
)
def test_make_mesh_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        shd.make_mesh(**kwargs)


PARAMS = {
    "dense": {"kernel": np.zeros((64, 256)), "bias": np.zeros((256,))},
    "square": np.zeros((128, 128)),
    "odd": np.zeros((129, 127)),
    "small": np.zeros((8, 4)),
}


def test_default_rule_largest_divisible_axis_last_of_equals():
    specs = shd.param_specs(PARAMS, _mesh(), min_size=16)
    assert specs == {
        "dense": {"kernel": P(None, "model"), "bias": P("model")},
        "square": P(None, "model"),  # equal sizes: the last axis
        "odd": P(),  # no axis divisible by 4
        "small": P("model"),  # both axes divisible by 4: the larger (8)
    }
    assert shd.param_specs(PARAMS, _mesh())["dense"]["bias"] == P()  # < min_size: replicated


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 24), min_size=0, max_size=3))
def test_default_rule_against_reference(shape):
    """The chosen axis is the last of the largest axes divisible by 4; else replicated."""
    shape = tuple(shape)
    spec = shd.param_specs({"w": np.zeros(shape)}, _mesh(), min_size=1)["w"]
    divisible = [d for d, s in enumerate(shape) if s % 4 == 0]
    if not divisible:
        assert spec == P()
    else:
        best = max(divisible, key=lambda d: (shape[d], d))
        assert spec == P(*[None] * best, "model")


def test_rules_first_match_wins_and_placement():
    mesh = _mesh()
    rules = [(r"kernel", P("data", "model")), (r"\['dense'\]", P()), (r"square", P("model"))]
    specs = shd.param_specs(PARAMS, mesh, rules)
    assert specs["dense"] == {"kernel": P("data", "model"), "bias": P()}
    assert specs["square"] == P("model")
    placed = shd.shard_params(PARAMS, mesh, rules)
    got = jax.tree.map(lambda s: s.spec, shd.shardings_of(placed))
    assert got == specs
    np.testing.assert_array_equal(np.asarray(placed["odd"]), PARAMS["odd"])
    abstract = shd.abstract_like(placed)
    assert abstract["dense"]["kernel"].sharding == placed["dense"]["kernel"].sharding
    assert abstract["dense"]["kernel"].shape == (64, 256)


@pytest.mark.parametrize(
    "spec, match",
    [
        (P(None, None, "model"), r"has 3 entries for an array of rank 2"),
        (P("nope"), r"names 'nope', which is not a mesh axis"),
        (P(None, ("model", "model")), r"uses mesh axis 'model' twice"),
        (P(None, ("data", "model")), r"axis 1 of size 127 over \('data', 'model'\) of size 8"),
    ],
)
def test_rule_errors_name_leaf_shape_spec_mesh(spec, match):
    with pytest.raises(ValueError, match=match) as err:
        shd.param_specs(PARAMS, _mesh(), [(r"odd", spec)])
    msg = str(err.value)
    assert "['odd']" in msg and "(129, 127)" in msg and "{'data': 2, 'model': 4}" in msg


def test_batches():
    mesh = _mesh()
    batch = {"x": np.arange(64 * 3.0).reshape(64, 3), "y": np.arange(64)}
    assert shd.batch_specs(batch, mesh) == {"x": P("data"), "y": P("data")}
    for local in (False, True):  # one process: its share is the whole batch
        placed = shd.shard_batch(batch, mesh, process_local=local)
        assert placed["x"].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)
        np.testing.assert_array_equal(np.asarray(placed["x"]), batch["x"])
    assert shd.batch_specs(batch, mesh, axis=("data", "model"))["y"] == P(("data", "model"))
    with pytest.raises(ValueError, match=r"\['x'\] of shape \(63, 3\) has 63 examples"):
        shd.shard_batch({"x": np.zeros((63, 3))}, mesh)
    with pytest.raises(ValueError, match=r"\['s'\] is a scalar"):
        shd.batch_specs({"s": np.zeros(())}, mesh)


def test_explicit_mesh_jit_keeps_shardings():
    mesh = _mesh("explicit")
    params = shd.shard_params(PARAMS, mesh, min_size=16)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda p: jax.tree.map(lambda a: 2 * a + 1, p))(params)
    for o, p in zip(jax.tree.leaves(out), jax.tree.leaves(params), strict=True):
        assert o.sharding.is_equivalent_to(p.sharding, o.ndim)
