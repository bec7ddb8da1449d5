"""Matrix-free curvature products: Hessian, Gauss-Newton and Fisher times a vector.

All three are pure functions over arbitrary pytrees and never form a matrix. Each costs a
small constant number of forward/backward passes, independent of the number of parameters:

* :func:`hvp`     — H v = ∇²_θ L(θ) v, forward-over-reverse (``jax.jvp`` of ``jax.grad``).
* :func:`ggn_vp`  — G v = Jᵀ (∇²_z ℓ) J v, the generalised Gauss-Newton matrix (Schraudolph
  2002) of a loss ℓ(z) composed with a model z = f(θ): one ``jax.jvp`` (J v), one HVP of ℓ in
  output space, one ``jax.vjp`` (Jᵀ u).
* :func:`fisher_vp` — F v for a categorical likelihood p = softmax(z):
  F = (1/N) Σ_n Σ_t J_ntᵀ (diag p_nt − p_nt p_ntᵀ) J_nt, the output-space curvature in closed
  form (it is the Hessian of the negative log-likelihood in the logits, so for softmax
  cross-entropy F equals the GGN). Its diagonal is :func:`jmerge.fisher_diag` with
  ``kind="exact"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jmerge.tree import check_same_shapes

__all__ = ["hvp", "ggn_vp", "fisher_vp"]

PyTree = Any


def _cast_like(v: PyTree, like: PyTree) -> PyTree:
    """Validate that ``v`` is shaped like ``params`` (naming the leaf) and cast to its dtypes."""
    check_same_shapes(like, v, ref_name="params", name="v", check_dtypes=False)
    return jax.tree_util.tree_map(lambda x, p: jnp.asarray(x, jnp.result_type(p)), v, like)


def hvp(
    loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, batch: Any, v: PyTree
) -> PyTree:
    """Hessian-vector product ∇²_θ L(θ, batch) · v by forward-over-reverse differentiation.

    Computes ``jax.jvp(jax.grad(L), (θ,), (v,))[1]``: one forward and one reverse pass with
    forward-mode tangents, about 2-3x the cost of a gradient, no matrix formed.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: the point θ at which the Hessian is taken (any pytree of arrays).
      batch: data passed through to ``loss_fn`` unchanged (not differentiated).
      v: a pytree shaped like ``params``.

    Returns:
      A pytree shaped like ``params``: H v with H = ∂²L/∂θ².
    """
    v = _cast_like(v, params)
    grad_fn = jax.grad(lambda p: loss_fn(p, batch))
    return jax.jvp(grad_fn, (params,), (v,))[1]


def ggn_vp(
    model_fn: Callable[[PyTree, Any], Any],
    output_loss_fn: Callable[[Any, Any], jax.Array],
    params: PyTree,
    batch: Any,
    v: PyTree,
) -> PyTree:
    """Generalised Gauss-Newton product G v = Jᵀ (∇²_z ℓ(z, batch)) J v.

    With z = model_fn(θ, batch) (any pytree of outputs) and J = ∂z/∂θ, the GGN drops the
    second-order term of the model from the Hessian of ℓ(f(θ)); it is positive semidefinite
    whenever ℓ is convex in z (squared error, softmax cross-entropy).

    Cost: one ``jax.jvp`` through the model (J v, which also gives z), one Hessian-vector
    product of ℓ in output space, one ``jax.vjp`` (Jᵀ u).

    Args:
      model_fn: ``model_fn(params, batch) -> z``.
      output_loss_fn: ``output_loss_fn(z, batch) -> scalar`` (e.g. a mean cross-entropy).
      params, batch: as in :func:`hvp`.
      v: a pytree shaped like ``params``.

    Returns:
      G v, shaped like ``params``.
    """
    v = _cast_like(v, params)
    f = lambda p: model_fn(p, batch)
    z, jv = jax.jvp(f, (params,), (v,))
    loss_grad = jax.grad(lambda out: output_loss_fn(out, batch))
    hjv = jax.jvp(loss_grad, (z,), (jv,))[1]
    _, vjp_fn = jax.vjp(f, params)
    return vjp_fn(hjv)[0]


def fisher_vp(
    logits_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, inputs: Any, v: PyTree
) -> PyTree:
    """Fisher-vector product for a categorical likelihood, F v.

    F = (1/N) Σ_n Σ_t J_ntᵀ (diag p_nt − p_nt p_ntᵀ) J_nt, where z = logits_fn(θ, x) has shape
    (N, *token_axes, K), p = softmax(z) over the last axis, and J_nt = ∂z_nt/∂θ. The examples
    are averaged (axis 0) and the tokens of a row summed, matching :func:`jmerge.fisher_diag`
    (a row's log-likelihood is the sum over its tokens). F is the exact Fisher of the model's
    predictive distribution and equals the GGN of softmax cross-entropy.

    Cost: one ``jax.jvp`` and one ``jax.vjp`` through the model.

    Args:
      logits_fn: ``logits_fn(params, inputs) -> logits[N, ..., K]``.
      params: a pytree of arrays.
      inputs: arrays with a leading example axis N (any pytree).
      v: a pytree shaped like ``params``.

    Returns:
      F v, shaped like ``params``.
    """
    v = _cast_like(v, params)
    f = lambda p: logits_fn(p, inputs)
    z, jv = jax.jvp(f, (params,), (v,))
    n = z.shape[0]
    p = jax.nn.softmax(z.astype(jnp.promote_types(z.dtype, jnp.float32)), axis=-1)
    # (diag p − p pᵀ) u = p ⊙ u − p (pᵀ u), per example and token.
    jv = jv.astype(p.dtype)
    m_jv = p * jv - p * jnp.sum(p * jv, axis=-1, keepdims=True)
    _, vjp_fn = jax.vjp(f, params)
    return vjp_fn((m_jv / n).astype(z.dtype))[0]
