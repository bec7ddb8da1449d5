"""Curvature operators: symmetric positive semidefinite linear maps on parameter pytrees.

Every merge in jmerge solves (C0 + Σ_t w_t C_t) θ = C0 θ0 + Σ_t w_t C_t θ_t (DESIGN.md, eq. 1).
The curvatures C are objects of this module. Each offers

* ``mv(v)``: the product C v for a pytree v shaped like the parameters (also ``op(v)``);
* ``diag(like=None)``: the diagonal of C as a pytree shaped like ``like`` (the parameters), or
  ``None`` when it is not known cheaply. Operators that hold a whole pytree (:class:`Diagonal`,
  :class:`MatrixFree` with ``diag_tree``) ignore ``like``; per-layer operators
  (:class:`BlockGram`, :class:`KFAC`, :class:`Identity`) need it to know the other leaves;
* ``has_diag``: whether ``diag`` returns a pytree rather than ``None``.

All operators are pytrees (arrays, including scalars such as a scale or a damping δ, are
children; functions and static configuration are auxiliary data), so they pass through
``jax.jit``, ``jax.vmap`` and ``jax.grad`` as ordinary arguments. ``a + b`` is :class:`Sum`,
``s * a`` is :class:`Scaled`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu

from jmerge.curvature.hvp import fisher_vp, ggn_vp, hvp
from jmerge.tree import TreeMismatchError

__all__ = [
    "CurvatureOperator",
    "Diagonal",
    "MatrixFree",
    "Identity",
    "BlockGram",
    "KFAC",
    "Sum",
    "Scaled",
    "Damped",
    "damped",
    "as_operator",
    "jacobi_preconditioner",
    "hessian_operator",
    "ggn_operator",
    "fisher_operator",
]

PyTree = Any


def _scale_leaf(s: Any, x: jax.Array) -> jax.Array:
    """s · x with the scalar s cast to x's dtype (a float64 scalar does not promote f32 leaves)."""
    return jnp.asarray(s, dtype=jnp.result_type(x)) * x


def _pytree(children: tuple[str, ...], static: tuple[str, ...] = ()):
    """Register a class as a pytree: ``children`` attributes are leaves/subtrees, ``static`` aux."""

    def register(cls):
        def flatten(op):
            return tuple(getattr(op, c) for c in children), tuple(getattr(op, s) for s in static)

        def unflatten(aux, kids):
            op = object.__new__(cls)
            for name, val in zip(children, kids, strict=True):
                object.__setattr__(op, name, val)
            for name, val in zip(static, aux, strict=True):
                object.__setattr__(op, name, val)
            return op

        jax.tree_util.register_pytree_node(cls, flatten, unflatten)
        return cls

    return register


class CurvatureOperator:
    """Base class: a symmetric PSD linear map C on pytrees, with ``mv`` and ``diag``."""

    has_diag: bool = False

    def mv(self, v: PyTree) -> PyTree:
        """C v."""
        raise NotImplementedError

    def diag(self, like: PyTree | None = None) -> PyTree | None:
        """diag(C) as a pytree shaped like ``like`` (the parameters), or None if unknown."""
        return None

    def __call__(self, v: PyTree) -> PyTree:
        return self.mv(v)

    def __add__(self, other: Any) -> Sum:
        return Sum([self, as_operator(other)])

    def __radd__(self, other: Any) -> Sum:
        return Sum([as_operator(other), self])

    def __mul__(self, scale: Any) -> Scaled:
        return Scaled(self, scale)

    __rmul__ = __mul__


@_pytree(children=("tree",))
class Diagonal(CurvatureOperator):
    """C = diag(d) for a pytree d shaped like the parameters: (C v)_i = d_i v_i.

    The curvature of Fisher merging (Matena & Raffel 2022, eq. 3) with d the diagonal Fisher.
    """

    has_diag = True

    def __init__(self, tree: PyTree):
        self.tree = tree

    def mv(self, v: PyTree) -> PyTree:
        return otu.tree_mul(self.tree, v)

    def diag(self, like: PyTree | None = None) -> PyTree:
        return self.tree


@_pytree(children=("diag_tree", "operands"), static=("mv_fn",))
class MatrixFree(CurvatureOperator):
    """C given by a function: C v = mv_fn(v, *operands), assumed symmetric PSD.

    Args:
      mv_fn: ``v -> C v`` (or ``(v, *operands) -> C v``). Static: it must be hashable, and
        arrays it closes over are compile-time constants under ``jax.jit``; pass arrays as
        ``operands`` instead to make them traced (and differentiable) children.
      diag_tree: diag(C) as a pytree if known (enables Jacobi preconditioning), else None.
      operands: a tuple of pytrees passed after v to ``mv_fn`` (children of the operator).
    """

    def __init__(
        self,
        mv_fn: Callable[..., PyTree],
        diag_tree: PyTree | None = None,
        operands: Sequence[Any] = (),
    ):
        if not callable(mv_fn):
            raise TypeError(f"mv_fn must be callable, got {type(mv_fn)}.")
        self.mv_fn = mv_fn
        self.diag_tree = diag_tree
        self.operands = tuple(operands)

    @property
    def has_diag(self) -> bool:  # type: ignore[override]
        return self.diag_tree is not None

    def mv(self, v: PyTree) -> PyTree:
        return self.mv_fn(v, *self.operands)

    def diag(self, like: PyTree | None = None) -> PyTree | None:
        return self.diag_tree


@_pytree(children=("scale",))
class Identity(CurvatureOperator):
    """C = s·I: C v = s v, diag = s everywhere (``like`` required). s may be traced."""

    has_diag = True

    def __init__(self, scale: Any = 1.0):
        self.scale = scale

    def mv(self, v: PyTree) -> PyTree:
        return jax.tree.map(lambda x: _scale_leaf(self.scale, x), v)

    def diag(self, like: PyTree | None = None) -> PyTree:
        if like is None:
            raise ValueError("Identity.diag needs `like` (a pytree shaped like the parameters).")
        return jax.tree.map(lambda x: jnp.full(jnp.shape(x), self.scale, jnp.result_type(x)), like)


def _in_split(shape: tuple[int, ...], d_in: int) -> int | None:
    """The k such that prod(shape[:k]) == d_in (the input dims of a kernel), or None."""
    prod = 1
    for k, s in enumerate(shape):
        if prod == d_in:
            return k
        prod *= s
    return len(shape) if prod == d_in else None


def _check_blocks(kind: str, keys: Sequence[str], v: PyTree, dims: Mapping[str, tuple]) -> None:
    """Raise :class:`TreeMismatchError` naming the path if a block key names no leaf of ``v`` or
    the block's sizes do not fit the leaf."""
    leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(v)}
    missing = [k for k in keys if k not in leaves]
    if missing:
        shown = ", ".join(list(leaves)[:8]) + (" ..." if len(leaves) > 8 else "")
        raise TreeMismatchError(
            f"{kind}: block key(s) {', '.join(missing)} name no leaf of the parameter pytree "
            f"(its leaves: {shown})."
        )
    for k in keys:
        shape = tuple(np.shape(leaves[k]))
        d_in, d_out = dims[k]
        size = math.prod(shape)
        ok = _in_split(shape, d_in) is not None and (d_out is None or d_in * d_out == size)
        if not ok:
            want = f"({d_in}, {d_out})" if d_out is not None else f"({d_in}, -1)"
            raise TreeMismatchError(
                f"{kind}: block {k} has input size {d_in}"
                + (f" and output size {d_out}" if d_out is not None else "")
                + f", which does not fit the leaf of shape {shape}: the leaf must reshape to "
                f"{want} with the input size a product of its leading dims."
            )


@_pytree(children=("grams", "rest"))
class BlockGram(CurvatureOperator):
    """Block-diagonal RegMean curvature: one input Gram G = XᵀX per Dense kernel.

    For a kernel W of shape (*in_dims, *out_dims) with prod(in_dims) = d_in = G.shape[0],
    (C W) = G · W.reshape(d_in, −1), reshaped back (Jin et al. 2023, RegMean, eq. 2:
    the Hessian of Σ ‖X W − X W_t‖² in W is G ⊗ I over the output columns). Every leaf without
    a Gram gets C v = rest · v: ``rest=1`` makes a RegMean merge average those leaves (biases),
    ``rest=0`` puts them in the null space.

    diag(C) = diag(G) broadcast over the output columns, ``rest`` elsewhere (needs ``like``).

    Args:
      grams: ``{keystr path of the kernel leaf: G (d_in, d_in)}``, e.g. keys like
        ``"['params']['Dense_0']['kernel']"`` (``jax.tree_util.keystr``).
      rest: scalar for the leaves without a Gram (may be traced).
    """

    has_diag = True

    def __init__(self, grams: Mapping[str, jax.Array], rest: Any = 1.0):
        for k, g in grams.items():
            if np.ndim(g) != 2 or np.shape(g)[0] != np.shape(g)[1]:
                raise ValueError(f"BlockGram: the Gram of {k} must be square, got {np.shape(g)}.")
        self.grams = dict(grams)
        self.rest = rest

    def _validate(self, v: PyTree) -> None:
        dims = {k: (int(np.shape(g)[0]), None) for k, g in self.grams.items()}
        _check_blocks("BlockGram", list(self.grams), v, dims)

    def mv(self, v: PyTree) -> PyTree:
        self._validate(v)

        def leaf(path, x):
            g = self.grams.get(jax.tree_util.keystr(path))
            if g is None:
                return _scale_leaf(self.rest, x)
            w = x.reshape(g.shape[0], -1)
            return jnp.matmul(g, w).reshape(x.shape).astype(jnp.result_type(x, g))

        return jax.tree_util.tree_map_with_path(leaf, v)

    def diag(self, like: PyTree | None = None) -> PyTree:
        if like is None:
            raise ValueError("BlockGram.diag needs `like` (a pytree shaped like the parameters).")
        self._validate(like)

        def leaf(path, x):
            g = self.grams.get(jax.tree_util.keystr(path))
            shape, dt = jnp.shape(x), jnp.result_type(x)
            if g is None:
                return jnp.full(shape, self.rest, dt)
            d = jnp.diagonal(g)[:, None]
            return jnp.broadcast_to(d, (g.shape[0], math.prod(shape) // g.shape[0])).reshape(shape)

        return jax.tree_util.tree_map_with_path(leaf, like)


@_pytree(children=("factors", "rest"))
class KFAC(CurvatureOperator):
    """Kronecker-factored curvature per Dense kernel: C vec(W) = vec(A W B).

    For a kernel W reshaped to (d_in, d_out) with A (d_in, d_in) the input-activation factor
    and B (d_out, d_out) the output-gradient factor, C = A ⊗ B acts as W ↦ A W B (Martens &
    Grosse 2015, eq. 1-2; B is symmetric, so A W Bᵀ = A W B). Leaves without factors get
    rest · v. diag(C) for a kernel = outer(diag A, diag B) reshaped to W's shape.

    Args:
      factors: ``{keystr path of the kernel leaf: (A, B)}``.
      rest: scalar for the leaves without factors (may be traced).
    """

    has_diag = True

    def __init__(self, factors: Mapping[str, tuple[jax.Array, jax.Array]], rest: Any = 1.0):
        out = {}
        for k, (a, b) in factors.items():
            for name, m in (("A", a), ("B", b)):
                if np.ndim(m) != 2 or np.shape(m)[0] != np.shape(m)[1]:
                    raise ValueError(
                        f"KFAC: factor {name} of {k} must be square, got {np.shape(m)}."
                    )
            out[k] = (a, b)
        self.factors = out
        self.rest = rest

    def _validate(self, v: PyTree) -> None:
        dims = {k: (int(np.shape(a)[0]), int(np.shape(b)[0])) for k, (a, b) in self.factors.items()}
        _check_blocks("KFAC", list(self.factors), v, dims)

    def mv(self, v: PyTree) -> PyTree:
        self._validate(v)

        def leaf(path, x):
            f = self.factors.get(jax.tree_util.keystr(path))
            if f is None:
                return _scale_leaf(self.rest, x)
            a, b = f
            w = x.reshape(a.shape[0], b.shape[0])
            return (a @ w @ b).reshape(x.shape).astype(jnp.result_type(x, a, b))

        return jax.tree_util.tree_map_with_path(leaf, v)

    def diag(self, like: PyTree | None = None) -> PyTree:
        if like is None:
            raise ValueError("KFAC.diag needs `like` (a pytree shaped like the parameters).")
        self._validate(like)

        def leaf(path, x):
            f = self.factors.get(jax.tree_util.keystr(path))
            if f is None:
                return jnp.full(jnp.shape(x), self.rest, jnp.result_type(x))
            a, b = f
            return jnp.outer(jnp.diagonal(a), jnp.diagonal(b)).reshape(jnp.shape(x))

        return jax.tree_util.tree_map_with_path(leaf, like)


@_pytree(children=("ops",))
class Sum(CurvatureOperator):
    """C = Σ_i C_i. diag(C) = Σ_i diag(C_i) if every part has a diagonal, else None.

    Nested sums are flattened: ``a + b + c`` is ``Sum([a, b, c])``.
    """

    def __init__(self, ops: Sequence[Any]):
        if len(ops) == 0:
            raise ValueError("Sum needs at least one operator.")
        flat = []
        for o in map(as_operator, ops):
            flat.extend(o.ops if isinstance(o, Sum) else [o])
        self.ops = tuple(flat)

    @property
    def has_diag(self) -> bool:  # type: ignore[override]
        return all(o.has_diag for o in self.ops)

    def mv(self, v: PyTree) -> PyTree:
        return (
            otu.tree_add(*[o.mv(v) for o in self.ops]) if len(self.ops) > 1 else self.ops[0].mv(v)
        )

    def diag(self, like: PyTree | None = None) -> PyTree | None:
        if not self.has_diag:
            return None
        ds = [o.diag(like) for o in self.ops]
        return otu.tree_add(*ds) if len(ds) > 1 else ds[0]


@_pytree(children=("op", "scale"))
class Scaled(CurvatureOperator):
    """C = s · C_op, s a scalar (a child: it may be traced and differentiated)."""

    def __init__(self, op: Any, scale: Any):
        self.op = as_operator(op)
        self.scale = scale

    @property
    def has_diag(self) -> bool:  # type: ignore[override]
        return self.op.has_diag

    def mv(self, v: PyTree) -> PyTree:
        return jax.tree.map(lambda x: _scale_leaf(self.scale, x), self.op.mv(v))

    def diag(self, like: PyTree | None = None) -> PyTree | None:
        d = self.op.diag(like)
        return None if d is None else jax.tree.map(lambda x: _scale_leaf(self.scale, x), d)


@_pytree(children=("op", "delta"))
class Damped(CurvatureOperator):
    """C = C_op + δ I (Tikhonov damping), δ a scalar child. diag = diag(C_op) + δ."""

    def __init__(self, op: Any, delta: Any):
        self.op = as_operator(op)
        self.delta = delta

    @property
    def has_diag(self) -> bool:  # type: ignore[override]
        return self.op.has_diag

    def mv(self, v: PyTree) -> PyTree:
        return jax.tree.map(
            lambda cv, x: cv + _scale_leaf(self.delta, x).astype(jnp.result_type(cv)),
            self.op.mv(v),
            v,
        )

    def diag(self, like: PyTree | None = None) -> PyTree | None:
        d = self.op.diag(like)
        if d is None:
            return None
        return jax.tree.map(lambda x: x + jnp.asarray(self.delta, jnp.result_type(x)), d)


def damped(op: Any, delta: Any) -> Damped:
    """C + δ I; see :class:`Damped`."""
    return Damped(op, delta)


def as_operator(x: Any) -> CurvatureOperator:
    """Read a curvature argument as an operator.

    A :class:`CurvatureOperator` is returned as is; another object with ``.mv`` is wrapped in
    :class:`MatrixFree` (diagonal unknown); a Python number s is s·I (:class:`Identity`); any
    other pytree of arrays d is ``Diagonal(d)``.
    """
    if isinstance(x, CurvatureOperator):
        return x
    if hasattr(x, "mv"):
        return MatrixFree(x.mv)
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return Identity(float(x))
    return Diagonal(x)


def _safe_inverse(d: jax.Array) -> jax.Array:
    tiny = jnp.finfo(jnp.result_type(d)).tiny
    return jnp.where(d > tiny, 1.0 / jnp.where(d > tiny, d, 1.0), 1.0).astype(jnp.result_type(d))


@_pytree(children=("op",))
class _LazyJacobi:
    """v ↦ v / diag(C), with diag(C) taken shaped like v (for operators that need ``like``)."""

    def __init__(self, op: CurvatureOperator):
        self.op = op

    def __call__(self, v: PyTree) -> PyTree:
        inv = jax.tree.map(_safe_inverse, self.op.diag(like=v))
        return jax.tree.map(lambda x, i: x * i.astype(jnp.result_type(x)), v, inv)


def jacobi_preconditioner(op: Any, like: PyTree | None = None) -> Callable[[PyTree], PyTree] | None:
    """The Jacobi preconditioner M = diag(C)⁻¹: v ↦ v / diag(C), or None if diag(C) is unknown.

    Entries with diag ≤ the dtype's smallest normal number (zero, negative) are left unscaled
    (inverse 1), so M stays positive definite. The result is a pytree callable (a
    :class:`Diagonal` of the inverse when the diagonal is available now) for ``cg``'s
    ``preconditioner``.

    Args:
      op: a curvature operator or anything :func:`as_operator` reads.
      like: a pytree shaped like the parameters; needed only to precompute the inverse for
        per-layer operators (:class:`BlockGram`, :class:`KFAC`, :class:`Identity`), which
        otherwise compute diag shaped like each vector they are applied to.
    """
    op = as_operator(op)
    if not op.has_diag:
        return None
    try:
        d = op.diag(like)
    except ValueError:
        if like is not None:
            raise
        return _LazyJacobi(op)
    return Diagonal(jax.tree.map(_safe_inverse, d))


# Matrix-free curvature products. The product functions are small frozen dataclasses (hashable,
# compared by the user's function), so an operator built twice from the same function hits the
# jit cache; params and data are operands (traced children).


@dataclasses.dataclass(frozen=True)
class _HessianMV:
    loss_fn: Callable

    def __call__(self, v, params, batch):
        return hvp(self.loss_fn, params, batch, v)


@dataclasses.dataclass(frozen=True)
class _GGNMV:
    model_fn: Callable
    output_loss_fn: Callable

    def __call__(self, v, params, batch):
        return ggn_vp(self.model_fn, self.output_loss_fn, params, batch, v)


@dataclasses.dataclass(frozen=True)
class _FisherMV:
    logits_fn: Callable

    def __call__(self, v, params, inputs):
        return fisher_vp(self.logits_fn, params, inputs, v)


def hessian_operator(loss_fn: Callable, params: PyTree, batch: Any) -> MatrixFree:
    """C = ∇²_θ loss_fn(θ, batch) at θ = params, matrix-free (``jmerge.curvature.hvp``).

    Symmetric, but PSD only near a minimum; add damping (:class:`Damped`) otherwise.
    """
    return MatrixFree(_HessianMV(loss_fn), None, (params, batch))


def ggn_operator(
    model_fn: Callable, output_loss_fn: Callable, params: PyTree, batch: Any
) -> MatrixFree:
    """C = Jᵀ ∇²_z ℓ J, the generalised Gauss-Newton matrix, matrix-free (``ggn_vp``), with
    z = model_fn(θ, batch), ℓ = output_loss_fn(z, batch), J = ∂z/∂θ at θ = params."""
    return MatrixFree(_GGNMV(model_fn, output_loss_fn), None, (params, batch))


def fisher_operator(logits_fn: Callable, params: PyTree, inputs: Any) -> MatrixFree:
    """C = (1/N) Σ_n Σ_t J_ntᵀ (diag p_nt − p_nt p_ntᵀ) J_nt, the Fisher of a categorical
    likelihood p = softmax(logits_fn(θ, inputs)), matrix-free (``fisher_vp``)."""
    return MatrixFree(_FisherMV(logits_fn), None, (params, inputs))
