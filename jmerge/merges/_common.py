"""Common ground of every merge: the result type, input preparation, leaf filters, dtypes.

A merge validates its inputs once here (structure, shapes, dtypes, finiteness, with the leaf
path and the model's index in every error), works on the stacked layout (leading model axis
T), computes in at least float32, and casts each merged leaf back to the pretrained leaf's
dtype. Leaves excluded by a filter are returned unchanged from ``pretrained``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmerge.tree import LeafFilter, as_stacked, leaf_mask

PyTree = Any


class MergeResult(NamedTuple):
    """A merged model and how the merge went.

    Attributes:
      params: the merged pytree, shaped and typed like the pretrained model.
      info: a dict of scalars. Where a CG solve ran: ``num_steps``, ``residual_norm``,
        ``converged``, ``status`` (see :class:`jmerge.CGResult`); merges may add more
        (e.g. ``objective``).
    """

    params: PyTree
    info: dict


class Prepared(NamedTuple):
    """Validated merge inputs.

    Attributes:
      stacked: the fine-tuned models with a leading model axis T on every leaf.
      num_models: T.
      mask: a pytree of Python bools shaped like the params: True where a leaf is merged.
    """

    stacked: PyTree
    num_models: int
    mask: PyTree


def prepare(
    reference: PyTree,
    finetuned: Sequence[PyTree] | PyTree,
    *,
    include: LeafFilter = None,
    exclude: LeafFilter = None,
    ref_name: str = "pretrained",
    check_dtypes: bool = True,
) -> Prepared:
    """Validate ``finetuned`` against ``reference`` and stack it; build the leaf mask."""
    stacked, t = as_stacked(
        reference, finetuned, ref_name=ref_name, name="finetuned", check_dtypes=check_dtypes
    )
    return Prepared(stacked, t, leaf_mask(reference, include, exclude))


def compute_dtype(dtype: Any) -> Any:
    """The dtype merges compute in: float32 for bf16/fp16 (and ints), the dtype itself if wider."""
    return jnp.promote_types(dtype, jnp.float32)


def upcast(tree: PyTree) -> PyTree:
    """Cast every leaf to :func:`compute_dtype` of its dtype."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, compute_dtype(jnp.result_type(x))), tree)


def cast_like(tree: PyTree, like: PyTree) -> PyTree:
    """Cast every leaf of ``tree`` to the dtype of the matching leaf of ``like``."""
    return jax.tree_util.tree_map(lambda x, r: jnp.asarray(x, jnp.result_type(r)), tree, like)


def select(mask: PyTree, merged: PyTree, fallback: PyTree) -> PyTree:
    """Leaf-wise ``merged if mask else fallback`` (mask holds static Python bools)."""
    return jax.tree_util.tree_map(lambda m, a, b: a if m else b, mask, merged, fallback)


def per_model(value: Any, num_models: int, name: str) -> jax.Array:
    """A scalar or a length-T sequence as a float array of shape (T,); a clear error otherwise."""
    arr = jnp.asarray(value)
    if not jnp.issubdtype(arr.dtype, jnp.inexact):
        arr = arr.astype(jnp.float32)
    if arr.ndim == 0:
        return jnp.broadcast_to(arr, (num_models,))
    if arr.shape != (num_models,):
        raise ValueError(
            f"{name} must be a scalar or have one entry per model ({num_models}); "
            f"got shape {tuple(arr.shape)}."
        )
    return arr


def model_axis_weights(weights: Any, num_models: int, name: str = "weights") -> jax.Array:
    """Per-model weights of shape (T,), defaulting to 1/T; non-zero sum checked eagerly.

    The default is float64 when x64 is enabled (float32 otherwise), so that float64 models are
    not merged with a float32-rounded 1/T.
    """
    if weights is None:
        return jnp.full((num_models,), 1.0 / num_models, jnp.result_type(float))
    w = per_model(weights, num_models, name)
    if not isinstance(w, jax.core.Tracer) and float(np.sum(np.asarray(w))) == 0.0:
        raise ValueError(f"{name} sum to zero; a weighted merge needs a non-zero total weight.")
    return w


def weighted_sum(stacked_leaf: jax.Array, w: jax.Array) -> jax.Array:
    """Σ_t w_t x_t over the leading model axis, in the compute dtype."""
    x = stacked_leaf.astype(compute_dtype(stacked_leaf.dtype))
    return jnp.tensordot(w.astype(x.dtype), x, axes=1)
