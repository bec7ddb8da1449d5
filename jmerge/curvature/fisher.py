"""Diagonal Fisher information of a classifier or sequence model.

For a model with logits ``z = f(θ, x) ∈ R^{T×K}`` (``T`` token positions, possibly none, ``K``
classes) and the factorised likelihood ``log p(y | x) = Σ_t log softmax(z_t)[y_t]``, the
per-example score is

    g_y(x) = ∇_θ log p(y | x) = J(x)ᵀ (onehot(y) − p(x)),      J = ∂z/∂θ,  p = softmax(z),

and :func:`fisher_diag` returns the mean over ``N`` examples of its square,

    F = (1/N) Σ_n E_{y ~ q_n} [ g_y(x_n) ⊙ g_y(x_n) ],

with ``q_n`` the point mass on the given labels (``kind="empirical"``), one sample
``y ~ p(y | x_n)`` (``kind="sampled"``), or the model's predictive ``p(y | x_n)`` itself
(``kind="exact"``). For ``exact`` the scores of different tokens are uncorrelated given ``x``
(each has zero mean under ``p`` and the tokens are conditionally independent), so

    E_y[g_y²] = Σ_t Σ_k p_{t,k} (J_tᵀ (e_k − p_t))² = Σ_t Σ_k (J_tᵀ c_{t,k})²,
    c_{t,k} = √p_{t,k} (e_k − p_t)   (on token t's logits, zero elsewhere),

i.e. ``T·K`` backward columns per example: use ``kind="sampled"`` for language models.
Fisher merging: Matena & Raffel, "Merging Models with Fisher-Weighted Averaging" (2022), eq. (2).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jmerge.curvature._capture import find_layers, per_example_fn
from jmerge.curvature._data import (
    KINDS,
    check_batch_size,
    check_callable,
    check_kind,
    check_labels_range,
    check_logits,
    chunk_examples,
    chunk_size,
    constrain,
    constrain_stacked,
    cotangents,
    labels_in_range,
    layer_grads,
    num_examples,
    placed_shardings,
    probe,
    scan_sum,
)
from jmerge.sharding import on_auto_axes
from jmerge.tree import (
    NonFiniteError,
    check_finite,
    compute_dtype,
    is_traced,
    require,
    runtime_check_finite,
)

__all__ = ["fisher_diag", "KINDS"]

_OVERFLOW_HINT = (
    "The logits or their gradients overflowed (check the inputs and the model's dtype)."
)
_OVERFLOW = "fisher_diag: the Fisher is not finite although params are. " + _OVERFLOW_HINT

_warned: set[tuple[Callable, str]] = set()


def fisher_diag(
    logits_fn: Callable[[chex.ArrayTree, chex.ArrayTree], jax.Array],
    params: chex.ArrayTree,
    inputs: chex.ArrayTree,
    labels: jax.Array | None = None,
    *,
    kind: str = "exact",
    key: jax.Array | None = None,
    batch_size: int | None = None,
    fast: bool = True,
) -> chex.ArrayTree:
    r"""Diagonal Fisher ``F = (1/N) Σ_n E_{y~q_n}[∇_θ log p(y|x_n)²]``, a pytree like ``params``.

    See the module docstring for the three kinds. ``log p(y|x)`` of a sequence row is the sum
    over its tokens of ``log_softmax(logits)[y_t]``.

    Args:
      logits_fn: ``logits_fn(params, x) -> logits`` of shape ``(B, *token_axes, K)`` for a batch
        ``x`` with leading axis ``B``. Hashable and stable: it is a static argument of the
        internal ``jax.jit``, so repeated calls with the same function and shapes compile once
        (a new ``lambda``/``partial`` per call recompiles). The model must treat examples
        independently (no batch statistics), since per-example gradients are taken on the
        one-example batch ``x_n[None]``.
      params: pytree of floating-point arrays (for Flax NNX: the ``nnx.Param`` state of
        ``nnx.split``, with ``logits_fn = lambda s, x: nnx.merge(graphdef, s)(x)``).
      inputs: array or pytree of arrays with a common leading example axis ``N``.
      labels: integer array ``(N, *token_axes)``; required for ``kind="empirical"``.
      kind: ``"exact"``, ``"sampled"`` or ``"empirical"``.
      key: PRNG key; required for ``kind="sampled"`` (one sample ``y_n`` per example, from
        ``jax.random.split(key, N)[n]``; the same key gives the same samples on both paths).
      batch_size: number of examples whose per-example quantities are materialised at once
        (examples are processed in chunks by ``lax.scan``; ``N`` needs not be a multiple). None
        picks the largest chunk within a budget of about 2**26 elements.
      fast: use the per-layer fast path (below); ``False`` forces the generic path.

    Returns:
      Pytree like ``params``; leaves in float32, or in the parameter dtype if that is wider.

    Paths:
      * generic (``fast=False``): per-example gradients ``jax.vmap`` of a ``jax.vjp`` of the
        per-example function, chunked: exact for any ``logits_fn``; cost about ``N``
        (times ``T·K`` for ``exact``) parameter-sized gradients written to memory.
      * fast (default): the parameter-consuming layers are found in the traced program
        (:mod:`jmerge.curvature._capture`); one backward pass through the activations gives
        each layer's output gradient ``g``, and the squared per-example gradient is assembled
        per layer: Dense on one token, biases and elementwise scales by
        ``Σ_n (a_n ⊗ g_n)² = (A²)ᵀ(G²)`` (one matmul, like a gradient); Embed lookups by
        summing equal ids per example; sequence/spatial layers (Conv, Dense on tokens) and tied
        weights by per-example pullbacks summed over consumers before squaring. Leaves used
        in any other way fall back to the generic path (with one warning per function and
        leaf). Fast and generic agree to rounding.

    Cost (fast path): ``empirical``/``sampled`` about one batched gradient; ``exact`` about
    ``T·K`` backward passes per example.

    Raises:
      ValueError / TypeError: unknown ``kind``; ``labels`` missing for ``"empirical"`` or not of
        shape ``(N, *token_axes)``; ``key`` missing for ``"sampled"``; inputs with different
        leading axes; non-floating params; ``logits_fn(params, inputs[:1])`` failing or not
        returning ``(1, ..., K)`` floating logits; ``labels`` (``"empirical"``) outside
        ``[0, K)``.
      jmerge.tree.NonFiniteError: ``params`` or the result hold NaN/Inf (named by leaf path).

    Under ``jax.jit`` / ``jax.vmap`` the checks of values run where the values are known
    (params and labels closed over by the jitted function are checked while it traces) and are
    staged otherwise with :func:`jmerge.tree.require` / :func:`jmerge.tree.runtime_check_finite`:
    a ``RuntimeWarning`` when the compiled program finds labels out of range or a NaN / Inf, and
    an error under ``jax.experimental.checkify.checkify(f, errors=checkify.user_checks)``.
    """
    check_kind(kind, labels, key)
    batch_size = check_batch_size(batch_size)
    check_callable(logits_fn, "logits_fn")
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"params{jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}; "
                "fisher_diag needs floating-point parameters (split non-parameter state off, "
                "e.g. nnx.split(model, nnx.Param, ...))."
            )
    num_examples(inputs)
    labels = labels if kind == "empirical" else None
    out, (params_ok, out_ok, labels_ok) = _fisher_jit(
        params,
        inputs,
        labels,
        key if kind == "sampled" else None,
        logits_fn=logits_fn,
        kind=kind,
        batch_size=batch_size,
        fast=bool(fast),
        shardings=placed_shardings(params),
    )
    if is_traced(params_ok):  # inside jit / vmap: check concrete params now, stage the rest
        check_labels_range(labels_ok, labels, logits_fn, params, inputs)
        runtime_check_finite(params, name="params")
        require(out_ok.all() | ~params_ok.all(), _OVERFLOW)
        return out
    params_ok, out_ok, labels_ok = jax.device_get((params_ok, out_ok, labels_ok))
    check_labels_range(labels_ok, labels, logits_fn, params, inputs)
    if not params_ok.all():
        check_finite(params, name="params")  # names the leaf
    if not out_ok.all():
        try:
            check_finite(out, name="fisher")
        except NonFiniteError as e:
            raise NonFiniteError(f"{e} {_OVERFLOW_HINT}") from None
    return out


def _warn_unmatched(logits_fn: Callable, path: str, primitive: str) -> None:
    # Keyed by the function itself (like jit's cache of static arguments, which also keeps it
    # alive): a bound method such as `model.apply` is a new object per access but compares equal.
    if (logits_fn, path) in _warned:
        return
    _warned.add((logits_fn, path))
    warnings.warn(
        f"fisher_diag: params{path} is used by `{primitive}`, which the fast path does not "
        "match; that leaf falls back to per-example gradients (exact, slower).",
        stacklevel=2,
    )


def _sum0(x: jax.Array) -> jax.Array:
    """``jnp.sum(x, axis=0)`` by pairwise halving: XLA:CPU reduces a leading axis of a large
    per-example array an order of magnitude slower than it adds two halves elementwise."""
    if math.prod(x.shape[1:]) < 2**16:
        return jnp.sum(x, axis=0)
    while x.shape[0] > 1:
        h = x.shape[0] // 2
        head = x[:h] + x[h : 2 * h]
        x = head if x.shape[0] % 2 == 0 else jnp.concatenate([head, x[2 * h :]])
    return x[0]


def _impl(params, inputs, labels, key, *, logits_fn, kind, batch_size, fast, shardings):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    n = num_examples(inputs)
    acc = [compute_dtype(jnp.result_type(x)) for x in leaves]
    logits = probe(logits_fn, "logits_fn", params, inputs)
    token_shape, num_classes = check_logits(logits, labels, n)
    cols = num_classes * math.prod(token_shape) if kind == "exact" else 1
    logit_size = math.prod(logits.shape)
    f1 = per_example_fn(logits_fn, treedef)

    graph = None
    if fast:
        graph = find_layers(logits_fn, params, inputs)
        for i, prim in graph.unmatched.items():
            _warn_unmatched(logits_fn, graph.leaf_paths[i], prim)
        generic = [i for i in range(len(leaves)) if graph.rule[i] == "generic"]
        per_ex = cols * logit_size + sum(
            sum(math.prod(s) for s in lay.operand_shapes)
            + lay.out_size * (1 if lay.foldable and kind != "exact" else cols)
            for lay in graph.layers
        )
        per_ex += sum(
            cols * math.prod(leaves[i].shape)
            for i in range(len(leaves))
            if graph.rule[i] == "pullback"
        )
    else:
        generic = list(range(len(leaves)))
        per_ex = cols * logit_size
    per_ex += cols * sum(math.prod(leaves[i].shape) for i in generic)
    chunk = chunk_size(batch_size, per_ex, n)
    xs = chunk_examples(inputs, labels, key, n, chunk)

    def generic_sq(idx, batch):
        def one(x_n, y_n, k_n, m_n):
            def f(sub):
                ls = list(leaves)
                for i, v in zip(idx, sub, strict=True):
                    ls[i] = v
                return f1(ls, x_n)

            logits, vjp = jax.vjp(f, [leaves[i] for i in idx])
            c = cotangents(kind, logits, y_n, k_n, m_n)
            if kind == "exact":
                gs = jax.vmap(vjp)(c)[0]
                return [_sum0(g.astype(acc[i]) ** 2) for i, g in zip(idx, gs, strict=True)]
            return [g.astype(acc[i]) ** 2 for i, g in zip(idx, vjp(c)[0], strict=True)]

        (x, y, k), m = batch
        sq = jax.vmap(one)(x, y, k, m)
        if shardings is not None:  # per-example squares laid out like their leaf
            sq = [constrain_stacked(s, shardings[i]) for i, s in zip(idx, sq, strict=True)]
        return [_sum0(s) for s in sq]

    def fast_sq(batch):
        layers = graph.layers

        def one(x_n, y_n, k_n, m_n):
            a, g = layer_grads(graph, leaves, kind, x_n, y_n, k_n, m_n)
            g = [
                jnp.sum(gk.astype(acc[lay.leaf_index]) ** 2, axis=0) if lay.foldable else gk
                for lay, gk in zip(layers, g, strict=True)
            ]
            return a, g

        (x, y, k), m = batch
        a, g = jax.vmap(one)(x, y, k, m)
        out = {}
        for i, rule in graph.rule.items():
            ks = graph.consumers_of.get(i, ())
            if rule == "fold":
                (k,) = ks
                out[i] = graph.fold(k, leaves[i], [x.astype(acc[i]) ** 2 for x in a[k]], g[k])
            elif rule == "rows":
                (k,) = ks
                out[i] = graph.rows_sq(k, leaves[i].shape, a[k][0], g[k], acc[i])
            elif rule == "pullback":

                def per_example(a_n, g_n, i=i, ks=ks):
                    def column(g_c):
                        return sum(
                            graph.pullback(k, leaves[i], a_n[j], g_c[j]) for j, k in enumerate(ks)
                        )

                    grads = jax.vmap(column)(g_n)
                    return _sum0(grads.astype(acc[i]) ** 2)

                sq = jax.vmap(per_example)([a[k] for k in ks], [g[k] for k in ks])
                out[i] = _sum0(sq)
        if generic:
            for i, s in zip(generic, generic_sq(generic, batch), strict=True):
                out[i] = s
        return out

    zeros = {i: jnp.zeros(jnp.shape(x), acc[i]) for i, x in enumerate(leaves)}

    def chunk_sums(batch):
        if graph is None:
            part = dict(zip(generic, generic_sq(generic, batch), strict=True))
        else:
            part = fast_sq(batch)
        return {i: part.get(i, z) for i, z in zeros.items()}  # unused leaves: zeros

    sums = scan_sum(chunk_sums, xs, zeros)
    result = [(sums[i] / n).astype(acc[i]) for i in range(len(leaves))]
    result = constrain(result, shardings)
    finite = lambda xs: jnp.array([jnp.all(jnp.isfinite(x)) for x in xs], bool)  # noqa: E731
    flags = (finite(leaves), finite(result), labels_in_range(labels, num_classes))
    specs = [PartitionSpec() if shardings is None else s.spec for s in shardings or leaves]
    out_specs = (treedef.unflatten(specs), (PartitionSpec(),) * 3)
    return (jax.tree_util.tree_unflatten(treedef, result), flags), out_specs


_fisher_jit = jax.jit(
    on_auto_axes(_impl), static_argnames=("logits_fn", "kind", "batch_size", "fast", "shardings")
)
