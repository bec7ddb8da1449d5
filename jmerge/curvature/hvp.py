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

from jmerge.curvature._data import constrain, placed_shardings
from jmerge.tree import cast_like, check_same_shapes, compute_dtype

__all__ = ["hvp", "ggn_vp", "fisher_vp"]

PyTree = Any


def _tangent(v: PyTree, params: PyTree) -> PyTree:
    """Validate that ``v`` is shaped like ``params`` (naming the leaf) and cast to its dtypes.

    Shapes only: works on traced ``v`` and ``params`` (``jit``, ``vmap``).
    """
    check_same_shapes(params, v, ref_name="params", name="v", check_dtypes=False)
    return cast_like(v, params)


def _gauss_newton(
    f: Callable[[PyTree], Any], params: PyTree, v: PyTree, curvature: Callable[[Any, Any], Any]
) -> PyTree:
    """``Jᵀ M J v`` with ``J = ∂f/∂θ`` at ``params`` and ``M u = curvature(z, u)`` at
    ``z = f(params)``: one ``jax.jvp`` (z and J v) and one ``jax.vjp`` (Jᵀ u)."""
    z, jv = jax.jvp(f, (params,), (_tangent(v, params),))
    _, vjp_fn = jax.vjp(f, params)
    return _like_v(vjp_fn(curvature(z, jv))[0], v)


def _like_v(out: PyTree, v: PyTree) -> PyTree:
    """``out`` placed like ``v`` when ``v`` is a concrete sharded pytree (an eager product):
    the pullback would otherwise come back laid out like the model's activations (a
    replicated bias sharded over the model axis). Under ``jit`` (traced ``v``) unchanged: the
    caller's ``out_shardings`` (or, under an Explicit mesh, the pullback's types) decide."""
    return constrain(out, placed_shardings(v, typed=False))


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
    grad_fn = jax.grad(lambda p: loss_fn(p, batch))
    return _like_v(jax.jvp(grad_fn, (params,), (_tangent(v, params),))[1], v)


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
    loss_grad = jax.grad(lambda out: output_loss_fn(out, batch))
    hessian_vp = lambda z, jv: jax.jvp(loss_grad, (z,), (jv,))[1]
    return _gauss_newton(lambda p: model_fn(p, batch), params, v, hessian_vp)


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

    def softmax_curvature(z, jv):
        # (diag p − p pᵀ) u = p ⊙ u − p (pᵀ u), per example and token; mean over examples.
        p = jax.nn.softmax(z.astype(compute_dtype(z.dtype)), axis=-1)
        jv = jv.astype(p.dtype)
        m_jv = p * jv - p * jnp.sum(p * jv, axis=-1, keepdims=True)
        return (m_jv / z.shape[0]).astype(z.dtype)

    return _gauss_newton(lambda p: logits_fn(p, inputs), params, v, softmax_curvature)
