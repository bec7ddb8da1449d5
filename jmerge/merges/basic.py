"""Weighted averaging and task arithmetic: the closed-form merges with C_t = I.

With C0 = 0 and C_t = I, system (1) of DESIGN.md is solved by the weighted average
θ = Σ_t w_t θ_t / Σ_t w_t; writing the models as task vectors τ_t = θ_t − θ0 gives task
arithmetic θ = θ0 + Σ_t α_t τ_t (Ilharco et al. 2023, "Editing models with task arithmetic",
ICLR), where α_t < 0 negates (forgets) a task.

Every function validates its inputs once (:func:`jmerge.merges._common.prepare`: a missing,
extra or differently shaped leaf is an error naming the leaf path and ``finetuned[i]``),
accepts the fine-tuned models as a list of pytrees or as one stacked pytree (leading model
axis T), computes in at least float32 and casts each merged leaf back to the dtype of the
reference model. ``include``/``exclude`` (a regex searched in the ``jax.tree_util.keystr`` path,
or a predicate ``f(path, leaf) -> bool``) keep leaves out of the merge; those leaves are returned
unchanged from the reference model (e.g. per-task classifier heads).

All functions are pure and run inside ``jax.jit``, ``jax.vmap`` and ``jax.grad`` (``include`` /
``exclude`` static), with the models and hyperparameters passed as arguments or closed over.
Concrete values (also arrays closed over by an outer ``jit``) are checked when the function is
called (a ``ValueError`` / :class:`jmerge.tree.NonFiniteError` naming ``finetuned[i]`` and the
leaf path); traced ones at run time: a zero total weight, or a NaN or Inf in a merge's result,
gives a ``RuntimeWarning`` (naming the leaf path) and a ``jax.experimental.checkify`` error
under ``checkify.checkify(f, errors=checkify.user_checks)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import jax
import numpy as np

from jmerge.merges._common import (
    check_result,
    model_axis_weights,
    normalise,
    per_model,
    prepare,
    select,
    weighted_sum,
)
from jmerge.tree import LeafFilter, TreeMismatchError, as_stacked, compute_dtype, upcast

__all__ = ["average", "task_vectors", "task_arithmetic", "negation"]

PyTree = Any
Models = Sequence[chex.ArrayTree] | chex.ArrayTree


def _reference(finetuned: Models, pretrained: PyTree | None) -> tuple[PyTree, str]:
    """The model that fixes shapes, dtypes and excluded leaves: ``pretrained`` or model 0.

    Without ``pretrained``, a list/tuple is read as a list of models (so a stacked pytree that is
    itself a list needs ``pretrained``), anything else as a stacked pytree.
    """
    if pretrained is not None:
        return pretrained, "pretrained"
    if isinstance(finetuned, (list, tuple)):
        if not finetuned:
            raise TreeMismatchError("finetuned is empty; at least one model is needed.")
        return finetuned[0], "finetuned[0]"
    leaves = jax.tree_util.tree_leaves(finetuned)
    if not leaves or any(np.ndim(x) == 0 for x in leaves):
        raise TreeMismatchError(
            "finetuned must be a non-empty list of models or a stacked pytree with a leading "
            "model axis on every leaf."
        )
    return jax.tree_util.tree_map(lambda x: x[0], finetuned), "finetuned[0]"


def _weights(weights: Any, num_models: int) -> jax.Array:
    """Unnormalised per-model weights (T,), ones by default; the kernels divide by Σ_t w_t
    (:func:`normalise`). A zero sum is an error, or a run-time warning and NaN when traced.

    Ones rather than ``model_axis_weights``' float32 1/T default keep float64 merges exact.
    """
    return model_axis_weights(1.0 if weights is None else weights, num_models)


def _keep(mask: PyTree, tree: PyTree) -> PyTree:
    """``tree`` with the excluded leaves replaced by ``None`` (an empty subtree).

    Kernels then map over the merged leaves only, and :func:`select` puts the reference leaves
    back in place of the ``None`` entries.
    """
    return jax.tree_util.tree_map(lambda m, x: x if m else None, mask, tree)


def _task_vectors(pretrained: PyTree, stacked: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x, p: x - p, upcast(stacked), upcast(pretrained))


def task_vectors(pretrained: chex.ArrayTree, finetuned: Models) -> chex.ArrayTree:
    """Task vectors τ_t = θ_t − θ0, stacked and in the compute dtype.

    Args:
      pretrained: θ0, a pytree; leaf shape ``s``.
      finetuned: θ_1..θ_T, a list of pytrees shaped like ``pretrained`` or one stacked pytree
        with leaves of shape ``(T, *s)`` (validated against ``pretrained``).

    Returns:
      A pytree with leaves of shape ``(T, *s)`` in float32 (bf16/fp16 inputs) or the inputs'
      dtype if wider.
    """
    stacked, _ = as_stacked(pretrained, finetuned, finite=False)
    return _task_vectors(pretrained, stacked)


@jax.jit
def _average_kernel(stacked: PyTree, w: jax.Array) -> PyTree:
    wn = normalise(w)
    return jax.tree_util.tree_map(lambda x: weighted_sum(x, wn).astype(x.dtype), stacked)


def average(
    finetuned: Models,
    weights: Any = None,
    *,
    pretrained: chex.ArrayTree | None = None,
    include: LeafFilter = None,
    exclude: LeafFilter = None,
) -> chex.ArrayTree:
    """Weighted average θ = Σ_t w_t θ_t / Σ_t w_t (elementwise; "model soup", Wortsman et al. 2022).

    Args:
      finetuned: θ_1..θ_T: a list of pytrees, or one stacked pytree with leaves ``(T, *s)``.
      weights: ``None`` (uniform), a scalar, or a length-T array w (may be traced); normalised
        by Σ_t w_t, which must not be zero: a ``ValueError`` when w is concrete; when it is
        traced, a run-time ``RuntimeWarning`` (a ``checkify`` error under
        ``checkify.checkify``) and NaN merged leaves.
      pretrained: optional reference model: shapes and dtypes are checked against it and the
        excluded leaves are taken from it. Without it the reference is ``finetuned[0]``.
      include, exclude: leaf filter (regex over ``keystr`` paths, or ``f(path, leaf) -> bool``);
        a leaf left out is returned from ``pretrained``, or from ``finetuned[0]`` when
        ``pretrained`` is None.

    Returns:
      A pytree shaped and typed like the reference model (bf16/fp16 leaves are averaged in
      float32 and cast back).

    Raises:
      TreeMismatchError: a model's structure, shapes or dtypes differ from the reference.
      NonFiniteError: a concrete model has NaN or Inf entries.
      ValueError: concrete weights sum to zero, or have the wrong shape.
    """
    ref, ref_name = _reference(finetuned, pretrained)
    prep = prepare(ref, finetuned, include=include, exclude=exclude, ref_name=ref_name)
    w = _weights(weights, prep.num_models)
    merged = select(prep.mask, _average_kernel(_keep(prep.mask, prep.stacked), w), ref)
    return check_result(merged, "average", finetuned, weights, pretrained)


@jax.jit
def _task_arithmetic_kernel(pretrained: PyTree, stacked: PyTree, alpha: jax.Array) -> PyTree:
    def leaf(p, x):
        p32 = p.astype(compute_dtype(p.dtype))
        return (p32 + weighted_sum(x - p32, alpha)).astype(p.dtype)

    return jax.tree_util.tree_map(leaf, pretrained, upcast(stacked))


def task_arithmetic(
    pretrained: chex.ArrayTree,
    finetuned: Models,
    alpha: Any = 1.0,
    *,
    include: LeafFilter = None,
    exclude: LeafFilter = None,
) -> chex.ArrayTree:
    """Task arithmetic θ = θ0 + Σ_t α_t (θ_t − θ0) (Ilharco et al. 2023, eq. 1 and §3).

    ``alpha`` < 0 is task negation: ``task_arithmetic(θ0, [θ_forget], alpha=-1.0)`` moves the
    model away from the task θ_forget was fine-tuned on (forgetting it). With α_t = 1/T it is
    the plain average of the fine-tuned models.

    Args:
      pretrained: θ0, a pytree; leaf shape ``s``.
      finetuned: θ_1..θ_T: a list of pytrees or one stacked pytree with leaves ``(T, *s)``.
      alpha: a scalar (the same α for every task) or a length-T array (one per task); may be
        traced.
      include, exclude: leaf filter; leaves left out are returned from ``pretrained``.

    Returns:
      A pytree shaped and typed like ``pretrained`` (computed in at least float32).

    Raises:
      TreeMismatchError: a model's structure, shapes or dtypes differ from ``pretrained``.
      NonFiniteError: a concrete model has NaN or Inf entries (traced ones: a run-time
        ``RuntimeWarning`` naming the result's non-finite leaves).
      ValueError: ``alpha`` is neither a scalar nor of length T.
    """
    return _task_arithmetic(pretrained, finetuned, alpha, 1.0, include, exclude, "task_arithmetic")


def _task_arithmetic(pretrained, finetuned, alpha, sign, include, exclude, name):
    prep = prepare(pretrained, finetuned, include=include, exclude=exclude)
    a = sign * per_model(alpha, prep.num_models, "alpha")
    merged = _task_arithmetic_kernel(
        _keep(prep.mask, pretrained), _keep(prep.mask, prep.stacked), a
    )
    merged = select(prep.mask, merged, pretrained)
    return check_result(merged, name, pretrained, finetuned, alpha)


def negation(
    pretrained: chex.ArrayTree,
    finetuned: Models,
    alpha: Any = 1.0,
    *,
    include: LeafFilter = None,
    exclude: LeafFilter = None,
) -> chex.ArrayTree:
    """Task negation θ = θ0 − Σ_t α_t (θ_t − θ0): :func:`task_arithmetic` with ``-alpha``.

    Ilharco et al. 2023, §3 ("forgetting via negation"): subtracting a task vector lowers
    performance on that task while leaving control tasks mostly intact.
    """
    return _task_arithmetic(pretrained, finetuned, alpha, -1.0, include, exclude, "negation")
