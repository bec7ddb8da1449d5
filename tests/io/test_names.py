"""flatten / unflatten: Hugging Face flat names <-> nested parameter trees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import FrozenDict
from hypothesis import given, settings
from hypothesis import strategies as st

import jmerge.io as jio

_KEYS = st.text(alphabet="abcxyz_0123456789", min_size=1, max_size=4)
_TREES = st.recursive(
    st.integers(0, 3).map(lambda n: np.arange(n, dtype=np.float32)),
    lambda children: st.dictionaries(_KEYS, children, min_size=1, max_size=3),
    max_leaves=12,
).filter(lambda t: isinstance(t, dict))


@jax.tree_util.register_pytree_with_keys_class
class _TwoX:
    """A pytree node whose two children have the same key (a name collision)."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def tree_flatten_with_keys(self):
        key = jax.tree_util.DictKey("x")
        return [(key, self.a), (key, self.b)], None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


def test_hf_names():
    params = {
        "model": {
            "embed_tokens": {"weight": np.zeros((5, 2))},
            "layers": [{"mlp": {"up_proj": {"weight": np.ones((2, 3))}}} for _ in range(2)],
        }
    }
    flat = jio.flatten(params)
    assert list(flat) == [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    ]
    assert flat["model.layers.1.mlp.up_proj.weight"] is params["model"]["layers"][1]["mlp"][
        "up_proj"
    ]["weight"]
    nested = jio.unflatten(flat)
    assert set(nested["model"]["layers"]) == {"0", "1"}  # list indices come back as str keys
    # with `like`, the original structure (a list) comes back
    back = jio.unflatten(flat, like=params)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)


def test_flax_params_round_trip():
    params = {"params": {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}}
    flat = jio.flatten(params)
    assert list(flat) == ["params.Dense_0.bias", "params.Dense_0.kernel"]
    back = jio.unflatten(flat)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    frozen = FrozenDict(params)
    back = jio.unflatten(jio.flatten(frozen), like=frozen)
    assert isinstance(back, FrozenDict)


@settings(max_examples=40, deadline=None)
@given(_TREES, st.sampled_from([".", "/"]))
def test_round_trip_property(tree, sep):
    flat = jio.flatten(tree, sep)
    assert len(flat) == len(jax.tree_util.tree_leaves(tree))
    back = jio.unflatten(flat, sep)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree), strict=True):
        assert a is b


def test_errors_name_the_keys():
    with pytest.raises(ValueError, match=r"\['a'\]\['b\.c'\].*separator"):
        jio.flatten({"a": {"b.c": 1.0}})
    with pytest.raises(ValueError, match=r"params\['t'\]\['x'\] and .* both flatten to 't.x'"):
        jio.flatten({"t": _TwoX(1.0, 2.0)})
    with pytest.raises(ValueError, match="'a.b.c' needs 'a.b' to be a subtree.*'a.b' is a tensor"):
        jio.unflatten({"a.b": 1, "a.b.c": 2})
    with pytest.raises(ValueError, match="'a.b' is a tensor, but 'a.b.c' needs it"):
        jio.unflatten({"a.b.c": 2, "a.b": 1})
    with pytest.raises(ValueError, match="empty part"):
        jio.unflatten({"a..b": 1})
    like = {"a": np.zeros(2), "b": np.zeros(3)}
    with pytest.raises(ValueError, match="missing 'b'.*not in `like`: 'c'"):
        jio.unflatten({"a": np.zeros(2), "c": np.zeros(3)}, like=like)
    with pytest.raises(ValueError, match=r"'b' has shape \(4,\), `like` has \(3,\)"):
        jio.unflatten({"a": np.zeros(2), "b": np.zeros(4)}, like=like)
