"""Curvature files next to a model: save -> load gives the same merge as in memory, on the
digits MLP (a real Flax model)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
import jmerge.io as jio
from jmerge.examples import digits


@pytest.fixture(scope="module")
def models():
    model = digits.make_model("mlp")
    params = [digits.init_params(model, seed) for seed in (0, 1)]
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(24, 64)), jnp.float32)
    return digits.LogitsFn(model), params, x


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_fisher_round_trip_and_merge(tmp_path, models):
    logits_fn, params, x = models
    saved = []
    for i, p in enumerate(params):
        jio.save_safetensors(p, tmp_path / f"m{i}")  # the model ...
        saved.append(jio.compute_and_save_curvature(logits_fn, p, x, tmp_path / f"m{i}"))
        assert saved[-1].path == tmp_path / f"m{i}" / "fisher.safetensors"
    # ... and its Fisher, under the same flat names
    ckpt = jio.SafetensorsCheckpoint(saved[0].path)
    assert set(ckpt.names) == set(jio.SafetensorsCheckpoint(tmp_path / "m0").names)
    assert all(ckpt.dtype(n) == np.float32 for n in ckpt.names)
    assert jio.SafetensorsCheckpoint(tmp_path / "m0").names == tuple(
        jio.flatten(params[0])
    )  # the model dir still reads as the model (the Fisher file is not part of it)
    loaded = [jio.load_curvature(tmp_path / f"m{i}", "fisher") for i in range(2)]
    for s, f in zip(saved, loaded, strict=True):
        _assert_trees_equal(s.curvature, f)
    models_back = [jio.load_safetensors(tmp_path / f"m{i}") for i in range(2)]
    _assert_trees_equal(
        jmerge.fisher_merge(params, [s.curvature for s in saved]),
        jmerge.fisher_merge([jax.tree.map(jnp.asarray, m) for m in models_back], loaded),
    )
    with pytest.raises(ValueError, match="holds a 'fisher' curvature, not 'gram'"):
        jio.load_curvature(saved[0].path, "gram")


def test_gram_round_trip_and_regmean(tmp_path, models):
    logits_fn, params, x = models
    saved = [
        jio.compute_and_save_curvature(logits_fn, p, x, tmp_path / f"m{i}", kind="gram", rest=0.5)
        for i, p in enumerate(params)
    ]
    loaded = [jio.load_curvature(s.path) for s in saved]
    for s, g in zip(saved, loaded, strict=True):
        assert isinstance(g, jmerge.curvature.BlockGram)
        assert list(g.grams) == list(s.curvature.grams) and g.rest == 0.5
        for k in g.grams:
            np.testing.assert_array_equal(np.asarray(g.grams[k]), np.asarray(s.curvature.grams[k]))
    names = jio.SafetensorsCheckpoint(saved[0].path).names
    assert "params.backbone.dense0.kernel.gram" in names
    _assert_trees_equal(
        jmerge.regmean(params, [s.curvature for s in saved]), jmerge.regmean(params, loaded)
    )


def test_kfac_round_trip(tmp_path, models):
    logits_fn, params, x = models
    s = jio.compute_and_save_curvature(logits_fn, params[0], x, tmp_path, kind="kfac")
    k = jio.load_curvature(tmp_path, "kfac")
    assert isinstance(k, jmerge.curvature.KFAC) and list(k.factors) == list(s.curvature.factors)
    names = set(jio.SafetensorsCheckpoint(s.path).names)
    assert {"params.head.kernel.kfac_in", "params.head.kernel.kfac_out"} <= names
    v = jax.tree.map(lambda p: jnp.ones_like(p), params[0])
    _assert_trees_equal(k.mv(v), s.curvature.mv(v))


def test_foreign_gram_file_names(tmp_path, models):
    """A Gram file without jmerge metadata: keys are read as dict keys from the names."""
    _, params, _ = models
    g = np.eye(64, dtype=np.float32)
    flat = {"params.backbone.dense0.kernel.gram": g}
    p = jio.save_safetensors(flat, tmp_path / "gram.safetensors")
    op = jio.load_curvature(p, "gram")
    assert list(op.grams) == ["['params']['backbone']['dense0']['kernel']"]
    op.mv(params[0])  # the key names a leaf of the real parameters
