"""Tests of jmerge.curvature._capture: layer discovery in the traced program, and capture."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jmerge.curvature._capture import capture, find_layers

F64 = jnp.float64


def _params(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0])) for k, s in shapes.items()}


def _x(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def _mlp(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jax.jit(lambda h, w: jnp.dot(h, w))(h, p["w2"])  # the second layer inside a jit


MLP_SHAPES = {"w1": (4, 5), "b1": (5,), "w2": (5, 3)}


def _layer(graph, path):
    (lay,) = [lay for lay in graph.layers if lay.path == path]
    return lay


def test_find_layers_plain_mlp():
    p, x = _params(MLP_SHAPES), _x((6, 4))
    graph = find_layers(_mlp, p, x)
    assert [(lay.path, lay.primitive) for lay in graph.layers] == [
        ("['w1']", "dot_general"),
        ("['b1']", "add"),
        ("['w2']", "dot_general"),
    ]
    w1, b1, w2 = graph.layers
    assert w1.operand_shapes == ((1, 4),) and w1.out_shape == (1, 5) and w1.param_operand == 1
    assert b1.operand_shapes == ((1, 5),) and b1.out_shape == (1, 5)
    assert len(w2.location) == 2  # found inside the nested jit
    assert all(lay.foldable for lay in graph.layers)
    assert not graph.unmatched and not graph.unused


def test_find_layers_linen_kinds():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, ids):
            emb = nn.Embed(7, 4)
            h = nn.LayerNorm()(emb(ids))
            h = nn.Conv(4, (2,), padding="SAME")(h)
            return nn.Dense(3)(h) + emb.attend(h)[..., :3]

    ids = jnp.zeros((2, 5), jnp.int32)
    params = jax.eval_shape(Net().init, jax.random.key(0), ids)
    graph = find_layers(Net().apply, params, ids)
    emb = [lay for lay in graph.layers if "embedding" in lay.path]
    assert sorted(lay.primitive for lay in emb) == ["dot_general", "gather"]
    i = emb[0].leaf_index
    assert graph.rule[i] == "pullback" and len(graph.consumers_of[i]) == 2  # tied
    conv = _layer(graph, "['params']['Conv_0']['kernel']")
    assert conv.primitive == "conv_general_dilated" and not conv.foldable
    dense = _layer(graph, "['params']['Dense_0']['kernel']")
    assert dense.primitive == "dot_general" and not dense.foldable  # 5 tokens per example
    scale = _layer(graph, "['params']['LayerNorm_0']['scale']")
    assert scale.primitive == "mul"
    assert {graph.rule[lay.leaf_index] for lay in graph.layers} <= {"pullback", "fold"}


def test_embed_alone_is_rows_rule():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Dense(3)(nn.Embed(7, 4)(ids))

    ids = jnp.zeros((2, 5), jnp.int32)
    params = jax.eval_shape(Net().init, jax.random.key(0), ids)
    graph = find_layers(Net().apply, params, ids)
    lay = _layer(graph, "['params']['Embed_0']['embedding']")
    assert lay.primitive == "gather" and graph.rule[lay.leaf_index] == "rows"


@pytest.mark.parametrize(
    "fn, leaf, primitive",
    [
        (lambda p, x: x @ p["w"] + jnp.sin(p["b"]), "['b']", "sin"),
        (lambda p, x: x @ (p["w"] @ p["v"]), "['v']", "dot_general"),
        (lambda p, x: x @ p["w"] + jax.nn.relu(p["b"]), "['b']", "custom_jvp_call"),
        (lambda p, x: (x @ p["w"], p["b"])[0] * 0 + p["b"] * p["b"], "['b']", "mul"),
    ],
)
def test_unmatched_uses(fn, leaf, primitive):
    p = _params({"w": (4, 3), "v": (3, 3), "b": (3,)})
    graph = find_layers(fn, p, _x((2, 4)))
    names = dict(zip(graph.leaf_paths, range(3), strict=True))
    assert graph.unmatched.get(names[leaf]) == primitive
    assert graph.rule[names[leaf]] == "generic"
    assert all(lay.path != leaf for lay in graph.layers)


def test_unused_leaf():
    p = _params({"w": (4, 3), "u": (2,)})
    graph = find_layers(lambda p, x: x @ p["w"], p, _x((2, 4)))
    assert graph.unused == (graph.leaf_paths.index("['u']"),)
    assert graph.rule[graph.leaf_paths.index("['u']")] == "unused"


def _manual_mlp(p, x_n, e1, e2):
    """The plain MLP on one example with explicit perturbations of the layer outputs."""
    z1 = x_n[None] @ p["w1"] + e1[0]
    z2 = z1 + p["b1"] + e1[1]
    return (jnp.tanh(z2) @ p["w2"] + e2)[0]


class CaptureTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_capture_inputs_and_output_grads(self):
        p, x = _params(MLP_SHAPES), _x((6, 4))
        cots = _x((6, 3), seed=5)
        rows = jnp.arange(6)

        @self.variant
        def run(p, x, cots):
            return capture(_mlp, p, x, lambda out, n: cots[n], aux=rows)

        got = run(p, x, cots)
        out = jax.vmap(lambda x_n: _mlp(p, x_n[None])[0])(x)
        chex.assert_trees_all_close(got.outputs, out, rtol=1e-12)
        a_w1, a_b1, a_w2 = (a[0] for a in got.inputs)
        chex.assert_trees_all_close(a_w1, x[:, None, :])
        chex.assert_trees_all_close(a_w2, jnp.tanh(x @ p["w1"] + p["b1"])[:, None, :], rtol=1e-12)
        chex.assert_trees_all_close(a_b1, (x @ p["w1"])[:, None, :], rtol=1e-12)

        def manual(x_n, c_n):
            zeros = (jnp.zeros((1, 5)), jnp.zeros((1, 5)))
            return jax.grad(lambda e1, e2: _manual_mlp(p, x_n, e1, e2) @ c_n, argnums=(0, 1))(
                zeros, jnp.zeros((1, 3))
            )

        (g1, g1b), g2 = jax.vmap(manual)(x, cots)
        chex.assert_trees_all_close(got.grads, (g1, g1b, g2), rtol=1e-10)
        # RegMean's Gram of the first Dense layer: Σ_n a_nᵀ a_n = XᵀX.
        gram = jnp.einsum("nbi,nbj->ij", a_w1, a_w1)
        chex.assert_trees_all_close(gram, x.T @ x, rtol=1e-12)


def test_capture_forward_only():
    p, x = _params(MLP_SHAPES), _x((3, 4))
    got = capture(_mlp, p, x)
    assert got.grads is None
    chex.assert_shape(got.inputs[0][0], (3, 1, 4))


def test_pullbacks_sum_to_the_per_example_gradient():
    """Eq. (1): Σ over a leaf's consumers of their pullbacks is the leaf's gradient (tied)."""

    def tied(p, x):
        h = jnp.tanh(x @ p["w"])
        return h @ p["w"].T + p["b"] * h[:, :1]

    p, x = _params({"w": (4, 4), "b": (4,)}), _x((3, 4))
    graph = find_layers(tied, p, x)
    cots = _x((3, 4), seed=7)
    assert len(graph.consumers_of[graph.leaf_paths.index("['w']")]) == 2

    @jax.jit
    def per_example_grads(p, x, cots):
        cap = capture(tied, p, x, lambda out, c: c, aux=cots, graph=graph)
        leaves = jax.tree_util.tree_leaves(p)
        return [
            jax.vmap(
                lambda a, g, i=i: sum(
                    graph.pullback(k, leaves[i], a[k], g[k]) for k in graph.consumers_of[i]
                )
            )(cap.inputs, cap.grads)
            for i in range(len(leaves))
        ]

    got = per_example_grads(p, x, cots)
    want = jax.vmap(lambda x_n, c_n: jax.grad(lambda p: tied(p, x_n[None])[0] @ c_n)(p))(x, cots)
    chex.assert_trees_all_close(got, jax.tree_util.tree_leaves(want), rtol=1e-10)


def test_fold_equals_sum_of_squared_pullbacks():
    p, x = _params(MLP_SHAPES), _x((6, 4))
    graph = find_layers(_mlp, p, x)
    cots = _x((6, 3), seed=3)
    cap = capture(_mlp, p, x, lambda out, c: c, aux=cots, graph=graph)
    leaves = jax.tree_util.tree_leaves(p)
    for lay in graph.layers:
        k, leaf = lay.index, leaves[lay.leaf_index]
        per_ex = jax.vmap(lambda a, g, k=k, leaf=leaf: graph.pullback(k, leaf, a, g))(
            cap.inputs[k], cap.grads[k]
        )
        want = jnp.sum(per_ex**2, axis=0)
        got = graph.fold(k, leaf, [a**2 for a in cap.inputs[k]], cap.grads[k] ** 2)
        chex.assert_trees_all_close(got, want, rtol=1e-10)


def test_rows_sq_equals_dense_scatter():
    table = _x((7, 3))
    ids = jnp.array([[0, 3, 0, 6], [2, 2, 2, 1]])

    def fn(p, ids):
        return jnp.take(p["t"], ids, axis=0).sum(-1)

    graph = find_layers(fn, {"t": table}, ids)
    (lay,) = graph.layers
    assert graph.rule[0] == "rows"
    cots = _x((2, 2, 4), seed=4)  # two columns per example
    g = jnp.broadcast_to(cots[..., None], (2, 2, 4, 3))[:, :, None]  # (B, C, 1, T, row)

    @jax.jit
    def rows_sq(ids, g):
        idx = jax.vmap(lambda ids_n: graph.run([table], ids_n, graph.zero_perts())[1][0][0])(ids)
        return graph.rows_sq(lay.index, table.shape, idx, g, F64)

    got = rows_sq(ids, g)
    want = np.zeros(table.shape)
    g_np = np.asarray(g)
    for n in range(2):
        for c in range(2):
            dense = np.zeros(table.shape)
            np.add.at(dense, np.asarray(ids[n]), g_np[n, c, 0])
            want += dense**2
    chex.assert_trees_all_close(got, jnp.asarray(want), rtol=1e-12)
