"""jmerge.tree: validation errors name the leaf path, the model and what was expected."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jmerge.tree import (
    NonFiniteError,
    TreeMismatchError,
    as_stacked,
    check_finite,
    check_same_shapes,
    check_same_structure,
    leaf_mask,
    stack,
    unstack,
)


def _params(scale=1.0):
    return {
        "params": {
            "Dense_0": {"kernel": scale * jnp.ones((3, 4)), "bias": jnp.zeros((4,))},
            "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros((2,))},
        }
    }


def test_missing_and_extra_leaves_are_named():
    ref = _params()
    other = _params()
    del other["params"]["head"]["bias"]
    other["params"]["head"]["scale"] = jnp.ones((2,))
    with pytest.raises(TreeMismatchError) as e:
        check_same_structure(ref, other, ref_name="pretrained", name="finetuned[1]")
    msg = str(e.value)
    assert "['params']['head']['bias']" in msg and "missing" in msg
    assert "['params']['head']['scale']" in msg and "finetuned[1]" in msg


def test_shape_and_dtype_mismatch_name_path_expected_and_got():
    ref = _params()
    bad = _params()
    bad["params"]["Dense_0"]["kernel"] = jnp.ones((3, 5))
    with pytest.raises(
        TreeMismatchError, match=r"\['Dense_0'\]\['kernel'\] has shape \(3, 5\), expected \(3, 4\)"
    ):
        check_same_shapes(ref, bad, name="finetuned[0]")
    bad = _params()
    bad["params"]["head"]["bias"] = jnp.zeros((2,), jnp.bfloat16)
    with pytest.raises(TreeMismatchError, match=r"\['head'\]\['bias'\] has dtype bfloat16"):
        check_same_shapes(ref, bad)
    check_same_shapes(ref, bad, check_dtypes=False)


def test_non_finite_names_leaf_and_counts():
    t = _params()
    t["params"]["head"]["kernel"] = t["params"]["head"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(
        NonFiniteError, match=re.escape("fisher['params']['head']['kernel']") + ".*1 NaN"
    ):
        check_finite(t, name="fisher")
    check_finite(_params())
    # Inside jit the values are unknown: no error, no crash.
    jax.jit(lambda x: (check_finite(x), x)[1])(t)


def test_as_stacked_accepts_list_and_stacked_and_checks_model_index():
    ref = _params()
    models = [_params(1.0), _params(2.0), _params(3.0)]
    s_list, t = as_stacked(ref, models)
    assert t == 3
    s_stacked, t2 = as_stacked(ref, stack(models))
    assert t2 == 3
    chex.assert_trees_all_equal(s_list, s_stacked)
    chex.assert_trees_all_equal(unstack(s_list)[2], models[2])
    models[2]["params"]["Dense_0"]["bias"] = jnp.zeros((5,))
    with pytest.raises(
        TreeMismatchError, match=r"finetuned\[2\]\['params'\]\['Dense_0'\]\['bias'\]"
    ):
        as_stacked(ref, models)
    bad_stack = stack([_params(), _params()])
    bad_stack["params"]["head"]["bias"] = jnp.zeros((3, 2))
    with pytest.raises(TreeMismatchError, match=r"leading model axis of 2"):
        as_stacked(ref, bad_stack)


def test_as_stacked_rejects_non_finite_model():
    models = [_params(), _params(jnp.inf)]
    with pytest.raises(
        NonFiniteError, match=r"finetuned\[1\]\['params'\]\['Dense_0'\]\['kernel'\]"
    ):
        as_stacked(_params(), models)


def test_leaf_mask_regex_and_predicate():
    ref = _params()
    m = leaf_mask(ref, exclude=r"head")
    assert m["params"]["Dense_0"]["kernel"] and not m["params"]["head"]["kernel"]
    m = leaf_mask(ref, include=lambda path, leaf: leaf.ndim == 2)
    assert m["params"]["head"]["kernel"] and not m["params"]["Dense_0"]["bias"]


@settings(max_examples=15, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=4),
    t=st.integers(1, 4),
)
def test_stack_unstack_roundtrip(shapes, t):
    rng = np.random.default_rng(0)
    models = [
        {f"l{i}": jnp.asarray(rng.normal(size=s)) for i, s in enumerate(shapes)} for _ in range(t)
    ]
    stacked, n = as_stacked(models[0], models)
    assert n == t
    for i, m in enumerate(unstack(stacked)):
        chex.assert_trees_all_equal(m, models[i])
