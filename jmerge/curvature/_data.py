"""What the per-example curvature functions share: reading their data, and chunking it.

:func:`jmerge.curvature.fisher.fisher_diag`, :func:`jmerge.curvature.gram.gram` and
:func:`jmerge.curvature.gram.kfac_factors` take ``(fn, params, inputs[, labels][, key])`` with
a leading example axis ``N`` on ``inputs``, and loop over the examples in chunks of at most
``batch_size``:

* validation at the public boundary: the options (:func:`check_option`, :func:`check_kind`),
  ``batch_size`` (:func:`check_batch_size`), the callable (:func:`check_callable`), the
  example axis (:func:`num_examples`), one example's logits and the labels
  (:func:`probe`, :func:`check_logits`, :func:`labels_in_range`, :func:`check_labels_range`);
* the distribution ``q_n`` of the labels, as cotangents on one example's logits
  (:func:`cotangents`), and the layer quantities they give (:func:`layer_grads`);
* the chunking: ``inputs``, ``labels`` and the per-example keys ``jax.random.split(key, N)``
  reshaped to ``(n_chunks, chunk, ...)``, padded with example 0 and a mask that is False on
  the padding (:func:`chunk_size`, :func:`chunked`, :func:`chunk_examples`), and the sum over
  chunks by one ``lax.scan`` (:func:`scan_sum`).

Nothing here reads a value: everything works on concrete and traced arrays alike, except
:func:`check_labels_range`, which raises on concrete labels and stages a
:func:`jmerge.tree.require` check on traced ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from jmerge.tree import compute_dtype, constrain, is_traced, placed_shardings, require

__all__ = [
    "KINDS",
    "CHUNK_BUDGET",
    "check_option",
    "check_kind",
    "check_callable",
    "check_batch_size",
    "num_examples",
    "probe",
    "check_logits",
    "labels_in_range",
    "check_labels_range",
    "cotangents",
    "layer_grads",
    "chunk_size",
    "chunked",
    "chunk_examples",
    "scan_sum",
    "placed_shardings",
    "constrain",
    "constrain_stacked",
]

PyTree = Any

KINDS = ("exact", "sampled", "empirical")

# Default bound on the number of elements materialised per chunk of examples (per-example
# gradients, captured activations and output gradients); about 256 MiB in float32.
CHUNK_BUDGET = 2**26


# ------------------------------------------------------------------------------- validation


def check_option(name: str, value: Any, choices: Sequence[str]) -> None:
    """``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")


def check_kind(kind: str, labels: Any, key: Any) -> None:
    """``kind`` is one of :data:`KINDS`, with the labels / key that it needs."""
    check_option("kind", kind, KINDS)
    if kind == "empirical" and labels is None:
        raise ValueError('kind="empirical" needs labels of shape (N, *token_axes); got None.')
    if kind == "sampled" and key is None:
        raise ValueError('kind="sampled" needs a PRNG key (key=jax.random.key(0)); got None.')


def check_callable(fn: Any, name: str) -> None:
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}.")


def check_batch_size(batch_size: Any) -> int | None:
    """``batch_size`` as an ``int`` (or None); ``ValueError`` unless a positive integer."""
    if batch_size is None:
        return None
    if (
        not isinstance(batch_size, (int, np.integer))
        or isinstance(batch_size, bool)
        or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}.")
    return int(batch_size)


def num_examples(inputs: PyTree) -> int:
    """The common leading axis ``N`` of the leaves of ``inputs`` (shapes only, never values)."""
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


def probe(fn: Callable, name: str, params: PyTree, inputs: PyTree) -> Any:
    """``jax.eval_shape(fn, params, inputs[:1])`` (shapes only), with a readable error."""
    spec = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))  # noqa: E731
    one = lambda a: jax.ShapeDtypeStruct((1, *jnp.shape(a)[1:]), jnp.result_type(a))  # noqa: E731
    try:
        return jax.eval_shape(
            fn, jax.tree_util.tree_map(spec, params), jax.tree_util.tree_map(one, inputs)
        )
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported the same way
        raise ValueError(
            f"{name}(params, inputs[:1]) failed (do params and inputs belong to the same model? "
            f"inputs need a leading example axis): {type(e).__name__}: {e}"
        ) from e


def check_logits(logits: Any, labels: Any, n: int) -> tuple[tuple[int, ...], int]:
    """Validate the logits of one example (``logits``, a ShapeDtypeStruct of shape
    ``(1, *token_axes, K)`` from :func:`probe`) and, if given, the shape and dtype of the
    labels ``(N, *token_axes)`` against them.

    Returns:
      ``(token_shape, num_classes)``.
    """
    if not isinstance(logits, jax.ShapeDtypeStruct):
        raise TypeError(
            f"logits_fn must return one array of logits (1, *token_axes, K); got {logits}."
        )
    if len(logits.shape) < 2 or logits.shape[0] != 1:
        raise ValueError(
            "logits_fn(params, inputs[:1]) must return logits of shape (1, *token_axes, K) "
            f"(the leading example axis kept); got shape {logits.shape}."
        )
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"logits must be floating point; got dtype {logits.dtype}.")
    token_shape, num_classes = tuple(logits.shape[1:-1]), logits.shape[-1]
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


def labels_in_range(labels: Any, num_classes: int) -> jax.Array:
    """Scalar bool: every label is a class id in ``[0, num_classes)`` (True for None)."""
    if labels is None:
        return jnp.asarray(True)
    return jnp.all((labels >= 0) & (labels < num_classes))


def _labels_message(num_classes: int, detail: str) -> str:
    return (
        f"labels must be class ids in [0, {num_classes}) (the K = {num_classes} classes of the "
        f"logits){detail}; an out-of-range id has no one-hot vector and would silently give a "
        "wrong curvature."
    )


def check_labels_range(
    ok: Any, labels: Any, logits_fn: Callable, params: PyTree, inputs: PyTree
) -> None:
    """Raise ``ValueError`` if ``ok`` (:func:`labels_in_range`, computed with the logits of
    ``logits_fn(params, inputs)``) is False.

    Concrete labels are checked now, also while an outer ``jit`` traces (labels it closes
    over); traced labels are checked at run time by :func:`jmerge.tree.require` (a
    ``RuntimeWarning``, and a ``checkify`` error under ``checkify.checkify``). The number of
    classes for the message is found only when it is needed.
    """
    if labels is None:
        return
    if not is_traced(ok) and bool(np.all(np.asarray(jax.device_get(ok)))):
        return
    num_classes = probe(logits_fn, "logits_fn", params, inputs).shape[-1]
    if is_traced(labels):
        require(ok, _labels_message(num_classes, ""))
        return
    ys = np.asarray(jax.device_get(labels))
    bad = (ys < 0) | (ys >= num_classes)
    if bad.any():
        raise ValueError(
            _labels_message(
                num_classes,
                f"; got {int(bad.sum())} of {ys.size} outside (min {ys.min()}, max {ys.max()})",
            )
        )


# -------------------------------------------------------------------------------- shardings


def constrain_stacked(x: jax.Array, sharding: NamedSharding | None) -> jax.Array:
    """A stack ``x`` of per-example (or per-column) copies of a leaf, ``(*lead, *leaf)``,
    constrained to the leaf's ``sharding`` on its trailing dims, the leading dims left to
    XLA (``PartitionSpec.UNCONSTRAINED``): per-example gradients then stay laid out like the
    parameter, and summing them over examples needs no resharding."""
    if sharding is None:
        return x
    lead = x.ndim - len(sharding.spec)
    spec = PartitionSpec(*[PartitionSpec.UNCONSTRAINED] * lead, *sharding.spec)
    return lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, spec))


# -------------------------------------------------------------------------------- cotangents


def cotangents(kind: str, logits: jax.Array, label: Any, key: Any, keep: Any) -> jax.Array:
    """Cotangents on one example's logits ``(*T, K)``: ``onehot(y) − p``, or for ``exact`` the
    ``T·K`` columns ``c_{t,k} = √p_{t,k} (e_k − p_t)`` stacked on a leading axis.

    ``y`` is ``label`` (``"empirical"``) or a sample from ``softmax(logits)`` drawn with
    ``key`` (``"sampled"``, Gumbel-max); ``keep`` False (a padding example) gives zeros.
    """
    work = compute_dtype(logits.dtype)
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


def layer_grads(
    graph: Any, leaves: list, kind: str, x_n: Any, y_n: Any, k_n: Any, m_n: Any
) -> tuple[list, list]:
    """One example's layer operands ``a`` and output gradients ``g`` (leading axis: the
    cotangent columns of :func:`cotangents`, one unless ``kind="exact"``), from the
    ``LayerGraph`` ``graph`` of :mod:`jmerge.curvature._capture`."""
    logits, vjp, a = graph.run_vjp(leaves, x_n)
    c = cotangents(kind, logits, y_n, k_n, m_n)
    g = jax.vmap(vjp)(c) if kind == "exact" else [gk[None] for gk in vjp(c)]
    return a, g


# -------------------------------------------------------------------------------- chunking


def chunk_size(batch_size: int | None, per_example: int, n: int) -> int:
    """``batch_size``, or the most examples of ``per_example`` elements within
    :data:`CHUNK_BUDGET`; at least 1, at most ``n``."""
    chunk = batch_size if batch_size is not None else CHUNK_BUDGET // max(per_example, 1)
    return int(min(max(chunk, 1), n))


def chunked(tree: PyTree, n: int, chunk: int) -> tuple[PyTree, jax.Array]:
    """Leaves ``(N, ...)`` -> ``(n_chunks, chunk, ...)``, padded with example 0, and the mask
    ``(n_chunks, chunk)``, False on the padding. ``None`` entries stay ``None``."""
    n_chunks = -(-n // chunk)
    total = n_chunks * chunk

    def one(x):
        if total > n:
            idx = np.arange(total)
            idx[idx >= n] = 0
            x = x[idx]
        return x.reshape(n_chunks, chunk, *x.shape[1:])

    mask = jnp.asarray(np.arange(total) < n).reshape(n_chunks, chunk)
    return jax.tree_util.tree_map(one, tree), mask


def chunk_examples(
    inputs: PyTree, labels: Any, key: Any, n: int, chunk: int
) -> tuple[tuple[PyTree, Any, Any], jax.Array]:
    """:func:`chunked` ``(inputs, labels, keys)`` with ``keys = jax.random.split(key, n)`` (one
    key per example: the same samples whatever the chunk size), and the mask."""
    keys = jax.random.split(key, n) if key is not None else None
    return chunked((inputs, labels, keys), n, chunk)


def scan_sum(fn: Callable[[Any], PyTree], xs: Any, zeros: PyTree | None = None) -> PyTree:
    """``Σ_chunks fn(chunk)`` over the leading axis of ``xs`` (one ``lax.scan``; a single chunk
    is not scanned). ``zeros``, the initial carry, is a pytree of zeros like ``fn``'s output
    (found by ``jax.eval_shape`` of ``fn`` if not given)."""
    n_chunks = jax.tree_util.tree_leaves(xs)[0].shape[0]
    if n_chunks == 1:
        return fn(jax.tree_util.tree_map(lambda x: x[0], xs))
    if zeros is None:
        spec = jax.eval_shape(fn, jax.tree_util.tree_map(lambda x: x[0], xs))
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), spec)

    def body(carry, batch):
        return jax.tree_util.tree_map(jnp.add, carry, fn(batch)), None

    return lax.scan(body, zeros, xs)[0]
