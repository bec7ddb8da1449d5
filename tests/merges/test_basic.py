"""average / task_arithmetic / negation / task_vectors against numpy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jmerge.merges.basic import average, negation, task_arithmetic, task_vectors
from jmerge.tree import TreeMismatchError

SHAPES = {
    "params": {
        "Dense_0": {"kernel": (16, 32), "bias": (32,)},
        "Conv_0": {"kernel": (3, 3, 4)},
        "scale": (),
    },
    "head": {"kernel": (32, 2)},
}
T = 3


def _tree(seed, shapes=SHAPES, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(size=s), dtype),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _models(shapes=SHAPES, num=T, dtype=np.float64):
    return _tree(100, shapes, dtype), [_tree(i, shapes, dtype) for i in range(num)]


def _np_leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]


def _np_average(models, w):
    per = [_np_leaves(m) for m in models]
    out = []
    for j in range(len(per[0])):
        acc = np.zeros_like(per[0][j])
        for t in range(len(models)):
            acc += w[t] * per[t][j]
        out.append(acc / np.sum(w))
    return out


def _np_task_arithmetic(pre, models, alpha):
    p = _np_leaves(pre)
    per = [_np_leaves(m) for m in models]
    out = []
    for j in range(len(p)):
        acc = p[j].copy()
        for t in range(len(models)):
            acc += alpha[t] * (per[t][j] - p[j])
        out.append(acc)
    return out


def _assert_leaves_close(tree, ref_leaves, rtol=1e-10, atol=1e-12):
    got = _np_leaves(tree)
    assert len(got) == len(ref_leaves)
    for g, r in zip(got, ref_leaves, strict=True):
        np.testing.assert_allclose(g, r, rtol=rtol, atol=atol)


class BasicTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_average_uniform_and_weighted(self):
        _, ft = _models()
        avg = self.variant(average)
        _assert_leaves_close(avg(ft), _np_average(ft, np.ones(T)))
        w = np.array([1.0, 2.0, 0.5])
        _assert_leaves_close(avg(ft, w), _np_average(ft, w))

    @chex.variants(with_jit=True, without_jit=True)
    def test_task_arithmetic_per_model_alpha(self):
        pre, ft = _models()
        alpha = np.array([0.3, -0.7, 1.2])
        got = self.variant(task_arithmetic)(pre, ft, alpha)
        _assert_leaves_close(got, _np_task_arithmetic(pre, ft, alpha))
        got = self.variant(task_arithmetic)(pre, ft, 0.4)
        _assert_leaves_close(got, _np_task_arithmetic(pre, ft, np.full(T, 0.4)))

    @chex.variants(with_jit=True, without_jit=True)
    def test_negation_forgets(self):
        pre, ft = _models()
        # Forgetting one task: θ0 − (θ_f − θ0) = 2θ0 − θ_f.
        got = self.variant(task_arithmetic)(pre, [ft[0]], -1.0)
        ref = [2 * p - f for p, f in zip(_np_leaves(pre), _np_leaves(ft[0]), strict=True)]
        _assert_leaves_close(got, ref)
        alpha = np.array([0.5, 1.0, 2.0])
        _assert_leaves_close(
            self.variant(negation)(pre, ft, alpha), _np_task_arithmetic(pre, ft, -alpha)
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_leaf_filter_keeps_heads(self):
        pre, ft = _models()
        got = self.variant(task_arithmetic, static_argnames=("exclude",))(
            pre, ft, 0.5, exclude=r"\['head'\]"
        )
        np.testing.assert_array_equal(got["head"]["kernel"], pre["head"]["kernel"])
        ref = jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(pre), _np_task_arithmetic(pre, ft, np.full(T, 0.5))
        )
        np.testing.assert_allclose(
            got["params"]["Dense_0"]["kernel"], ref["params"]["Dense_0"]["kernel"], rtol=1e-12
        )
        # average: excluded leaves from pretrained if given, else from finetuned[0].
        avg = self.variant(average, static_argnames=("include",))
        only_dense = lambda path, leaf: "Dense_0" in path
        got = avg(ft, include=only_dense)
        np.testing.assert_array_equal(got["head"]["kernel"], ft[0]["head"]["kernel"])
        np.testing.assert_array_equal(got["params"]["scale"], ft[0]["params"]["scale"])
        got = avg(ft, pretrained=pre, include=only_dense)
        np.testing.assert_array_equal(got["head"]["kernel"], pre["head"]["kernel"])
        np.testing.assert_allclose(
            got["params"]["Dense_0"]["bias"],
            np.mean([m["params"]["Dense_0"]["bias"] for m in ft], 0),
        )


def test_stacked_equals_list():
    pre, ft = _models()
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *ft)
    chex.assert_trees_all_close(average(stacked), average(ft), rtol=0, atol=0)
    chex.assert_trees_all_close(
        task_arithmetic(pre, stacked, [0.1, 0.2, 0.3]), task_arithmetic(pre, ft, [0.1, 0.2, 0.3])
    )
    tv = task_vectors(pre, ft)
    chex.assert_trees_all_close(tv, task_vectors(pre, stacked))
    chex.assert_trees_all_close(
        tv["head"]["kernel"], np.stack([m["head"]["kernel"] - pre["head"]["kernel"] for m in ft])
    )


def test_bf16_merged_in_f32_and_cast_back():
    pre, ft = _models({"w": (3, 4), "b": (4,)}, dtype=jnp.bfloat16)
    got = task_arithmetic(pre, ft, [0.3, 0.3, 0.3])
    f32 = lambda t: jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), t)
    want = task_arithmetic(f32(pre), [f32(m) for m in ft], jnp.array([0.3, 0.3, 0.3], jnp.float32))
    chex.assert_trees_all_equal_dtypes(got, pre)
    chex.assert_trees_all_equal(got, jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), want))
    got = average(ft)
    want = average([f32(m) for m in ft])
    chex.assert_trees_all_equal_dtypes(got, pre)
    chex.assert_trees_all_equal(got, jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), want))


def test_bad_inputs_name_model_and_path():
    pre, ft = _models()
    missing = [ft[0], {"params": ft[1]["params"]}, ft[2]]
    with pytest.raises(TreeMismatchError, match=r"finetuned\[1\].*\['head'\]\['kernel'\]"):
        task_arithmetic(pre, missing)
    extra = [ft[0], {**ft[1], "extra": jnp.zeros(2)}, ft[2]]
    with pytest.raises(TreeMismatchError, match=r"finetuned\[1\].*\['extra'\]"):
        task_arithmetic(pre, extra)
    wrong = [ft[0], jax.tree_util.tree_map(lambda x: x, ft[1]), ft[2]]
    wrong[1]["params"]["Dense_0"]["kernel"] = jnp.zeros((5, 4))
    with pytest.raises(
        TreeMismatchError, match=r"finetuned\[1\]\['params'\]\['Dense_0'\]\['kernel'\] has shape"
    ):
        task_arithmetic(pre, wrong)
    with pytest.raises(TreeMismatchError, match=r"finetuned\[1\]\['params'\]\['Dense_0'\]"):
        average(wrong)
    with pytest.raises(ValueError, match="alpha must be a scalar or have one entry per model"):
        task_arithmetic(pre, ft, [1.0, 2.0])
    with pytest.raises(ValueError, match="sum to zero"):
        average(ft, [1.0, -1.0, 0.0])
    with pytest.raises(TreeMismatchError, match="empty"):
        average([])


_shape = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


@settings(deadline=None, max_examples=5)
@given(
    shapes=st.lists(_shape, min_size=1, max_size=4), num=st.integers(1, 4), seed=st.integers(0, 99)
)
def test_task_arithmetic_random_shapes(shapes, num, seed):
    tree_shapes = {f"leaf{i}": s for i, s in enumerate(shapes)}
    rng = np.random.default_rng(seed)
    alpha = rng.normal(size=num)
    pre = _tree(seed + 1000, tree_shapes)
    ft = [_tree(seed + i, tree_shapes) for i in range(num)]
    _assert_leaves_close(task_arithmetic(pre, ft, alpha), _np_task_arithmetic(pre, ft, alpha))
    _assert_leaves_close(average(ft, np.abs(alpha) + 0.1), _np_average(ft, np.abs(alpha) + 0.1))
