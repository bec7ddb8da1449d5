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
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jmerge.curvature._capture import LayerGraph, per_example_fn
from jmerge.tree import NonFiniteError, check_finite

__all__ = ["fisher_diag", "KINDS"]

KINDS = ("exact", "sampled", "empirical")

# Default bound on the number of elements materialised per chunk of examples (per-example
# gradients of the leaves that need them, captured activations); about 256 MiB in float32.
_CHUNK_BUDGET = 2**26

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
        returning ``(1, ..., K)`` floating logits.
      jmerge.tree.NonFiniteError: ``params`` or the result hold NaN/Inf (named by leaf path).
        Checked eagerly only: under an outer ``jax.jit`` the values cannot be inspected.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    if kind == "empirical" and labels is None:
        raise ValueError('kind="empirical" needs labels of shape (N, *token_axes); got None.')
    if kind == "sampled" and key is None:
        raise ValueError('kind="sampled" needs a PRNG key (key=jax.random.key(0)); got None.')
    if batch_size is not None and (
        not isinstance(batch_size, (int, np.integer))
        or isinstance(batch_size, bool)
        or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}.")
    if not callable(logits_fn):
        raise TypeError(f"logits_fn must be callable, got {type(logits_fn).__name__}.")
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"params{jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}; "
                "fisher_diag needs floating-point parameters (split non-parameter state off, "
                "e.g. nnx.split(model, nnx.Param, ...))."
            )
    _num_examples(inputs)
    out, params_ok, out_ok = _fisher_jit(
        params,
        inputs,
        labels if kind == "empirical" else None,
        key if kind == "sampled" else None,
        logits_fn=logits_fn,
        kind=kind,
        batch_size=None if batch_size is None else int(batch_size),
        fast=bool(fast),
    )
    if not isinstance(params_ok, jax.core.Tracer):  # eager: the flags can be read
        params_ok, out_ok = jax.device_get((params_ok, out_ok))
        if not params_ok.all():
            check_finite(params, name="params")  # names the leaf
        if not out_ok.all():
            try:
                check_finite(out, name="fisher")
            except NonFiniteError as e:
                raise NonFiniteError(
                    f"{e} The logits or their gradients overflowed (check the inputs and the "
                    "model's dtype)."
                ) from None
    return out


def _num_examples(inputs: Any) -> int:
    leaves = jax.tree_util.tree_leaves_with_path(inputs)
    if not leaves:
        raise ValueError("inputs is empty; expected an array or pytree of arrays.")
    sizes = {}
    for path, x in leaves:
        shape = jnp.shape(x)
        if len(shape) == 0:
            raise ValueError(
                f"inputs{jax.tree_util.keystr(path)} is a scalar; every input needs a leading "
                "example axis."
            )
        sizes[jax.tree_util.keystr(path)] = shape[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(
            "inputs must share one leading example axis; got leading sizes "
            + ", ".join(f"inputs{p or ''}: {n}" for p, n in sizes.items())
            + "."
        )
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError("inputs hold no examples (leading axis of size 0).")
    return int(n)


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


def _cotangents(kind: str, logits: jax.Array, label: Any, key: Any, keep: Any) -> jax.Array:
    """Cotangents on one example's logits ``(*T, K)``: ``onehot(y) − p``, or for ``exact`` the
    ``T·K`` columns ``c_{t,k} = √p_{t,k} (e_k − p_t)`` stacked on a leading axis."""
    work = jnp.promote_types(logits.dtype, jnp.float32)
    logp = jax.nn.log_softmax(logits.astype(work), axis=-1)
    p = jnp.exp(logp)
    k = logits.shape[-1]
    if kind == "exact":
        tshape = logits.shape[:-1]
        t = math.prod(tshape)
        pf = p.reshape(t, k)
        base = jnp.sqrt(pf)[:, :, None] * (jnp.eye(k, dtype=work)[None] - pf[:, None, :])
        cols = jnp.eye(t, dtype=work)[:, None, :, None] * base[:, :, None, :]
        cols = cols.reshape(t * k, *tshape, k)
    else:
        if kind == "empirical":
            y = label
        else:  # Gumbel-max; noise drawn flat: XLA:CPU compiles rank-1 random bits much faster
            noise = jax.random.gumbel(key, (logp.size,), work).reshape(logp.shape)
            y = jnp.argmax(logp + noise, axis=-1)
        cols = jax.nn.one_hot(y, k, dtype=work) - p
    cols = jnp.where(keep, cols, 0)
    return lax.stop_gradient(cols.astype(logits.dtype))


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


def _check_logits(probe: Any, labels: Any, n: int) -> tuple[tuple[int, ...], int]:
    """Validate the logits of one example (``probe``, a ShapeDtypeStruct of shape
    (1, *token_axes, K)) and, if given, the labels (N, *token_axes) against them.

    Shared by :func:`fisher_diag` and ``jmerge.curvature.gram.kfac_factors``.

    Returns:
      ``(token_shape, num_classes)``.
    """
    if not isinstance(probe, jax.ShapeDtypeStruct):
        raise TypeError(
            f"logits_fn must return one array of logits (1, *token_axes, K); got {probe}."
        )
    if len(probe.shape) < 2 or probe.shape[0] != 1:
        raise ValueError(
            "logits_fn(params, inputs[:1]) must return logits of shape (1, *token_axes, K) "
            f"(the leading example axis kept); got shape {probe.shape}."
        )
    if not jnp.issubdtype(probe.dtype, jnp.floating):
        raise TypeError(f"logits must be floating point; got dtype {probe.dtype}.")
    token_shape, num_classes = tuple(probe.shape[1:-1]), probe.shape[-1]
    if labels is not None:
        if tuple(jnp.shape(labels)) != (n, *token_shape):
            raise ValueError(
                f"labels must have shape (N, *token_axes) = {(n, *token_shape)} to match the "
                f"logits (N, *token_axes, K) = {(n, *token_shape, num_classes)}; got "
                f"{tuple(jnp.shape(labels))}."
            )
        if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
            raise TypeError(f"labels must be integer class ids; got {jnp.result_type(labels)}.")
    return token_shape, num_classes


def _impl(params, inputs, labels, key, *, logits_fn, kind, batch_size, fast):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    n = _num_examples(inputs)
    acc = [jnp.promote_types(jnp.result_type(x), jnp.float32) for x in leaves]
    spec = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))  # noqa: E731
    one_spec = lambda a: jax.ShapeDtypeStruct((1, *jnp.shape(a)[1:]), jnp.result_type(a))  # noqa: E731
    try:
        probe = jax.eval_shape(
            logits_fn,
            jax.tree_util.tree_map(spec, params),
            jax.tree_util.tree_map(one_spec, inputs),
        )
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported the same way
        raise ValueError(f"logits_fn(params, inputs[:1]) failed: {type(e).__name__}: {e}") from e
    token_shape, num_classes = _check_logits(probe, labels, n)
    cols = num_classes * math.prod(token_shape) if kind == "exact" else 1
    logit_size = math.prod(probe.shape)
    f1 = per_example_fn(logits_fn, treedef)
    keys = jax.random.split(key, n) if key is not None else None

    graph = None
    if fast:
        graph = LayerGraph(
            logits_fn,
            params,
            jax.tree_util.tree_map(
                lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)), inputs
            ),
        )
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
    chunk = batch_size if batch_size is not None else _CHUNK_BUDGET // max(per_ex, 1)
    chunk = int(min(max(chunk, 1), n))
    n_chunks = -(-n // chunk)
    total = n_chunks * chunk

    def chunked(x):
        if x is None:
            return None
        if total > n:
            idx = np.arange(total)
            idx[idx >= n] = 0
            x = x[idx]
        return x.reshape(n_chunks, chunk, *x.shape[1:])

    xs = (
        jax.tree_util.tree_map(chunked, inputs),
        chunked(labels),
        chunked(keys),
        jnp.asarray(np.arange(total) < n).reshape(n_chunks, chunk),
    )

    def generic_sq(idx, batch):
        def one(x_n, y_n, k_n, m_n):
            def f(sub):
                ls = list(leaves)
                for i, v in zip(idx, sub, strict=True):
                    ls[i] = v
                return f1(ls, x_n)

            logits, vjp = jax.vjp(f, [leaves[i] for i in idx])
            c = _cotangents(kind, logits, y_n, k_n, m_n)
            if kind == "exact":
                gs = jax.vmap(vjp)(c)[0]
                return [_sum0(g.astype(acc[i]) ** 2) for i, g in zip(idx, gs, strict=True)]
            return [g.astype(acc[i]) ** 2 for i, g in zip(idx, vjp(c)[0], strict=True)]

        return [_sum0(s) for s in jax.vmap(one)(*batch)]

    def fast_sq(batch):
        layers = graph.layers

        def one(x_n, y_n, k_n, m_n):
            logits, vjp, a = graph.run_vjp(leaves, x_n)
            c = _cotangents(kind, logits, y_n, k_n, m_n)
            g = jax.vmap(vjp)(c) if kind == "exact" else [gk[None] for gk in vjp(c)]
            g = [
                jnp.sum(gk.astype(acc[lay.leaf_index]) ** 2, axis=0) if lay.foldable else gk
                for lay, gk in zip(layers, g, strict=True)
            ]
            return a, g

        a, g = jax.vmap(one)(*batch)
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

    def chunk_sums(batch):
        if graph is None:
            return dict(zip(generic, generic_sq(generic, batch), strict=True))
        return fast_sq(batch)

    zeros = {i: jnp.zeros(jnp.shape(x), acc[i]) for i, x in enumerate(leaves)}
    if n_chunks == 1:
        sums = {**zeros, **chunk_sums(jax.tree_util.tree_map(lambda x: x[0], xs))}
    else:

        def body(carry, batch):
            part = chunk_sums(batch)
            return {i: carry[i] + part[i] if i in part else carry[i] for i in carry}, None

        sums, _ = lax.scan(body, zeros, xs)
    result = [(sums[i] / n).astype(acc[i]) for i in range(len(leaves))]
    finite = lambda xs: jnp.array([jnp.all(jnp.isfinite(x)) for x in xs], bool)  # noqa: E731
    return jax.tree_util.tree_unflatten(treedef, result), finite(leaves), finite(result)


_fisher_jit = jax.jit(_impl, static_argnames=("logits_fn", "kind", "batch_size", "fast"))
