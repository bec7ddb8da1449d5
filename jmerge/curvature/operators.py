"""Curvature operators: symmetric positive semidefinite linear maps on parameter pytrees.

Every merge in jmerge solves (C0 + Σ_t w_t C_t) θ = C0 θ0 + Σ_t w_t C_t θ_t (DESIGN.md, eq. 1).
The curvatures C are objects of this module. Each offers

* ``mv(v)``: the product C v for a pytree v shaped like the parameters (also ``op(v)``);
* ``diag(like=None)``: the diagonal of C as a pytree shaped like ``like`` (the parameters), or
  ``None`` when it is not known cheaply. Operators that hold a whole pytree (:class:`Diagonal`,
  :class:`MatrixFree` with ``diag_tree``) ignore ``like``; per-layer operators
  (:class:`BlockGram`, :class:`KFAC`, :class:`Identity`) need it to know the other leaves;
* ``has_diag``: whether ``diag`` returns a pytree rather than ``None``;
* ``as_matrix(like)``: the dense (n, n) matrix, for tests and debugging.

All operators are frozen dataclasses registered with ``jax.tree_util.register_dataclass``:
arrays, including scalars such as a scale or a damping δ, are children; functions are static
fields. They pass through ``jax.jit``, ``jax.vmap`` and ``jax.grad`` as ordinary arguments.
``a + b`` is :class:`Sum`, ``s * a`` is :class:`Scaled`.

A curvature *argument* (an operator, an object with ``mv``, a scalar, or a diagonal pytree) is
read by one function, :func:`as_operator`; :func:`mean_diagonal` gives tr(P C P)/n_P, exactly
where the diagonal is known and by Hutchinson's estimator otherwise.
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
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding

from jmerge.curvature.hvp import fisher_vp, ggn_vp, hvp
from jmerge.sharding import explicit_sharding
from jmerge.tree import (
    TreeMismatchError,
    check_finite,
    check_same_shapes,
    check_same_structure,
    is_traced,
)

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
    "mean_diagonal",
    "jacobi_preconditioner",
    "hessian_operator",
    "ggn_operator",
    "fisher_operator",
]

PyTree = Any

# Operators are frozen dataclasses compared by identity (eq=False): their fields hold arrays,
# for which a field-wise ``==`` has no truth value.
_operator_dataclass = dataclasses.dataclass(frozen=True, eq=False)


def _static(**kwargs: Any) -> Any:
    """A dataclass field that ``register_dataclass`` treats as static (auxiliary data)."""
    return dataclasses.field(metadata={"static": True}, **kwargs)


def _scale_leaf(s: Any, x: jax.Array) -> jax.Array:
    """s · x with the scalar s cast to x's dtype (a float64 scalar does not promote f32 leaves)."""
    return jnp.asarray(s, dtype=jnp.result_type(x)) * x


class CurvatureOperator:
    """Base class: a symmetric PSD linear map C on pytrees, with ``mv`` and ``diag``."""

    has_diag: bool = False

    def mv(self, v: PyTree) -> PyTree:
        """C v."""
        raise NotImplementedError

    def diag(self, like: PyTree | None = None) -> PyTree | None:
        """diag(C) as a pytree shaped like ``like`` (the parameters), or None if unknown."""
        return None

    def as_matrix(self, like: PyTree) -> jax.Array:
        """The dense (n, n) matrix M of C in the coordinates of ``ravel_pytree(like)``.

        Column i is ravel(C e_i), e_i the i-th basis vector unraveled to the shape of ``like``
        (n mat-vecs, vmapped). M_ij = (C e_j)_i, so a symmetric C gives a symmetric M. For tests
        and debugging only: it costs n mat-vecs and n² memory.
        """
        flat, unravel = ravel_pytree(like)
        basis = jnp.eye(flat.size, dtype=flat.dtype)
        cols = jax.vmap(lambda e: ravel_pytree(self.mv(unravel(e)))[0])(basis)
        return cols.T

    def __call__(self, v: PyTree) -> PyTree:
        return self.mv(v)

    def __add__(self, other: Any) -> Sum:
        return Sum([self, as_operator(other)])

    def __radd__(self, other: Any) -> Sum:
        return Sum([as_operator(other), self])

    def __mul__(self, scale: Any) -> Scaled:
        return Scaled(self, scale)

    __rmul__ = __mul__


@jax.tree_util.register_dataclass
@_operator_dataclass
class Diagonal(CurvatureOperator):
    """C = diag(d) for a pytree d shaped like the parameters: (C v)_i = d_i v_i.

    The curvature of Fisher merging (Matena & Raffel 2022, eq. 3) with d the diagonal Fisher.
    """

    tree: PyTree

    has_diag = True

    def mv(self, v: PyTree) -> PyTree:
        return otu.tree_mul(self.tree, v)

    def diag(self, like: PyTree | None = None) -> PyTree:
        return self.tree


@jax.tree_util.register_dataclass
@_operator_dataclass
class MatrixFree(CurvatureOperator):
    """C given by a function: C v = mv_fn(v, *operands), assumed symmetric PSD.

    Args:
      mv_fn: ``v -> C v`` (or ``(v, *operands) -> C v``). Static: it must be hashable, and
        arrays it closes over are compile-time constants under ``jax.jit``; pass arrays as
        ``operands`` instead to make them traced (and differentiable) children.
      diag_tree: diag(C) as a pytree if known (enables Jacobi preconditioning), else None.
      operands: a tuple of pytrees passed after v to ``mv_fn`` (children of the operator).

    Raises:
      TypeError: ``mv_fn`` is not callable.
    """

    mv_fn: Callable[..., PyTree] = _static()
    diag_tree: PyTree | None = None
    operands: tuple[Any, ...] = ()

    def __post_init__(self):
        if not callable(self.mv_fn):
            raise TypeError(f"mv_fn must be callable, got {type(self.mv_fn)}.")
        object.__setattr__(self, "operands", tuple(self.operands))

    @property
    def has_diag(self) -> bool:  # type: ignore[override]
        return self.diag_tree is not None

    def mv(self, v: PyTree) -> PyTree:
        return self.mv_fn(v, *self.operands)

    def diag(self, like: PyTree | None = None) -> PyTree | None:
        return self.diag_tree


@jax.tree_util.register_dataclass
@_operator_dataclass
class Identity(CurvatureOperator):
    """C = s·I: C v = s v, diag = s everywhere (``like`` required). s may be traced."""

    scale: Any = 1.0

    has_diag = True

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


def _check_square(kind: str, label: str, m: Any) -> None:
    """Raise ValueError unless the matrix ``m`` is square.

    Runs in ``__post_init__``, which ``jax.tree_util.register_dataclass`` also calls when it
    rebuilds an operator (under ``jit``/``vmap``, or from placeholder leaves). Leaves without a
    shape (placeholders, ``None``) are skipped, and leading axes are allowed so that operators
    stacked leaf-wise for ``vmap`` rebuild; the last two dims must be equal.
    """
    shape = getattr(m, "shape", None)
    if shape is None:
        return
    if len(shape) < 2 or shape[-1] != shape[-2]:
        raise ValueError(f"{kind}: {label} must be square, got {tuple(shape)}.")


@jax.tree_util.register_dataclass
@_operator_dataclass
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

    Raises:
      ValueError: a Gram is not square (at construction).
      TreeMismatchError: a key names no leaf, or a Gram does not fit its leaf (in ``mv``/``diag``).
    """

    grams: Mapping[str, jax.Array]
    rest: Any = 1.0

    has_diag = True

    def __post_init__(self):
        for k, g in self.grams.items():
            _check_square("BlockGram", f"the Gram of {k}", g)
        object.__setattr__(self, "grams", dict(self.grams))

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
            layout = explicit_sharding(w)  # as in KFAC.mv
            gw = jnp.matmul(g, w, out_sharding=None if layout is None else layout.spec)
            return gw.reshape(x.shape).astype(jnp.result_type(x, g))

        return jax.tree_util.tree_map_with_path(leaf, v)

    def diag(self, like: PyTree | None = None) -> PyTree:
        if like is None:
            raise ValueError("BlockGram.diag needs `like` (a pytree shaped like the parameters).")
        self._validate(like)

        def leaf(path, x):
            g = self.grams.get(jax.tree_util.keystr(path))
            shape, dt = jnp.shape(x), jnp.result_type(x)
            if g is None:
                return _typed_like(jnp.full(shape, self.rest, dt), x)
            d = _diagonal(g)[:, None]
            d = jnp.broadcast_to(d, (g.shape[0], math.prod(shape) // g.shape[0])).reshape(shape)
            return _typed_like(d.astype(dt), x)

        return jax.tree_util.tree_map_with_path(leaf, like)


def _diagonal(m: jax.Array) -> jax.Array:
    """``diag(m)`` of a square matrix as a masked sum over one axis: elementwise and a
    reduction, so a factor sharded on one axis gives its diagonal where it lives, summing over
    the whole axis (columns, or rows when only the columns are sharded on an Explicit mesh).
    ``jnp.diagonal`` is a gather, which XLA's partitioner turns into collectives."""
    n, layout = m.shape[0], explicit_sharding(m)
    iota = lambda axis: jax.lax.broadcasted_iota(jnp.int32, (n, n), axis, out_sharding=layout)
    eye = iota(0) == iota(1)
    known = layout
    if (
        known is None
        and not is_traced(m)
        and isinstance(getattr(m, "sharding", None), NamedSharding)
    ):
        known = m.sharding  # an eager call on a placed factor
    axis = 1
    if known is not None:
        spec = tuple(known.spec) + (None,) * (2 - len(known.spec))
        axis = 0 if spec[1] is not None and spec[0] is None else 1
    return jnp.sum(jnp.where(eye, m, jnp.zeros_like(m)), axis=axis)


def _typed_like(out: jax.Array, x: Any) -> jax.Array:
    """``out`` resharded to ``x``'s layout under an Explicit mesh (a value built from factors or a
    constant is typed by them, not by ``x``); unchanged otherwise."""
    layout = explicit_sharding(x)
    return out if layout is None else jax.sharding.reshard(out, layout.spec)


@jax.tree_util.register_dataclass
@_operator_dataclass
class KFAC(CurvatureOperator):
    """Kronecker-factored curvature per Dense kernel: C vec(W) = vec(A W B).

    For a kernel W reshaped to (d_in, d_out) with A (d_in, d_in) the input-activation factor
    and B (d_out, d_out) the output-gradient factor, C = A ⊗ B acts as W ↦ A W B (Martens &
    Grosse 2015, eq. 1-2; B is symmetric, so A W Bᵀ = A W B). In the row-major ravel of W the
    block of C is ``np.kron(A, B)``. Leaves without factors get rest · v. diag(C) for a kernel
    = outer(diag A, diag B) reshaped to W's shape.

    Args:
      factors: ``{keystr path of the kernel leaf: (A, B)}``.
      rest: scalar for the leaves without factors (may be traced).

    Raises:
      ValueError: a factor is not square (at construction).
      TreeMismatchError: a key names no leaf, or the factors do not fit its leaf (in
        ``mv``/``diag``).
    """

    factors: Mapping[str, tuple[jax.Array, jax.Array]]
    rest: Any = 1.0

    has_diag = True

    def __post_init__(self):
        out = {}
        for k, pair in self.factors.items():
            a, b = pair
            _check_square("KFAC", f"factor A of {k}", a)
            _check_square("KFAC", f"factor B of {k}", b)
            out[k] = (a, b)
        object.__setattr__(self, "factors", out)

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
            # Under an Explicit mesh the products keep W's layout (each contraction of a
            # sharded axis is then a local partial product plus a reduction); under Auto
            # sharding XLA's partitioner decides, which with the factors placed as
            # kfac_factors places them (B's rows like W's output axis) is the same.
            layout = explicit_sharding(w)
            layout = None if layout is None else layout.spec
            aw = jnp.matmul(a, w, out_sharding=layout)
            awb = jnp.matmul(aw, b, out_sharding=layout)
            return awb.reshape(x.shape).astype(jnp.result_type(x, a, b))

        return jax.tree_util.tree_map_with_path(leaf, v)

    def diag(self, like: PyTree | None = None) -> PyTree:
        if like is None:
            raise ValueError("KFAC.diag needs `like` (a pytree shaped like the parameters).")
        self._validate(like)

        def leaf(path, x):
            f = self.factors.get(jax.tree_util.keystr(path))
            if f is None:
                return _typed_like(jnp.full(jnp.shape(x), self.rest, jnp.result_type(x)), x)
            a, b = f
            return _typed_like(jnp.outer(_diagonal(a), _diagonal(b)).reshape(jnp.shape(x)), x)

        return jax.tree_util.tree_map_with_path(leaf, like)


@jax.tree_util.register_dataclass
@_operator_dataclass
class Sum(CurvatureOperator):
    """C = Σ_i C_i. diag(C) = Σ_i diag(C_i) if every part has a diagonal, else None.

    Parts are read by :func:`as_operator`; nested sums are flattened: ``a + b + c`` is
    ``Sum([a, b, c])``.

    Raises:
      ValueError: no operators.
    """

    ops: tuple[Any, ...]

    def __post_init__(self):
        if len(self.ops) == 0:
            raise ValueError("Sum needs at least one operator.")
        flat = []
        for o in map(as_operator, self.ops):
            flat.extend(o.ops if isinstance(o, Sum) else [o])
        object.__setattr__(self, "ops", tuple(flat))

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


@jax.tree_util.register_dataclass
@_operator_dataclass
class Scaled(CurvatureOperator):
    """C = s · C_op, s a scalar (a child: it may be traced and differentiated)."""

    op: Any
    scale: Any

    def __post_init__(self):
        object.__setattr__(self, "op", as_operator(self.op))

    @property
    def has_diag(self) -> bool:  # type: ignore[override]
        return self.op.has_diag

    def mv(self, v: PyTree) -> PyTree:
        return jax.tree.map(lambda x: _scale_leaf(self.scale, x), self.op.mv(v))

    def diag(self, like: PyTree | None = None) -> PyTree | None:
        d = self.op.diag(like)
        return None if d is None else jax.tree.map(lambda x: _scale_leaf(self.scale, x), d)


@jax.tree_util.register_dataclass
@_operator_dataclass
class Damped(CurvatureOperator):
    """C = C_op + δ I (Tikhonov damping), δ a scalar child. diag = diag(C_op) + δ."""

    op: Any
    delta: Any

    def __post_init__(self):
        object.__setattr__(self, "op", as_operator(self.op))

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


# ---------------------------------------------------------------------------------------------
# Reading a curvature argument


def _is_bool(x: Any) -> bool:
    if isinstance(x, (bool, np.bool_)):
        return True
    return isinstance(x, (np.ndarray, jax.Array)) and np.ndim(x) == 0 and x.dtype == np.bool_


def _is_scalar(x: Any) -> bool:
    """A Python int/float, a NumPy scalar, or a 0-d NumPy / JAX array (possibly a tracer)."""
    if isinstance(x, (int, float, np.generic)):
        return True
    return isinstance(x, (np.ndarray, jax.Array)) and np.ndim(x) == 0


def _is_scalar_param(like: PyTree) -> bool:
    """``like`` is a single 0-d leaf (a scalar parameter), not a container."""
    return jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(like)) and (
        np.ndim(like) == 0
    )


@jax.jit
def _leaf_mins(leaves: list[jax.Array]) -> list[jax.Array]:
    # One compiled program per tree signature, not one dispatch per leaf.
    return [jnp.min(x) for x in leaves]


def _check_nonnegative_diagonal(tree: PyTree, name: str) -> None:
    """Raise ValueError naming the first concrete leaf of ``tree`` with a negative entry.

    Tracers are skipped. The jitted reduction runs under ``jax.ensure_compile_time_eval`` so
    that arrays closed over by an outer ``jax.jit`` are checked eagerly, not traced.
    """
    leaves = [
        (p, x)
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
        if not is_traced(x) and np.size(x) > 0
    ]
    if not leaves:
        return
    with jax.ensure_compile_time_eval():
        mins = jax.device_get(_leaf_mins([x for _, x in leaves]))
    for (path, x), m in zip(leaves, mins, strict=True):
        if float(m) < 0:
            n_neg = int(np.sum(np.asarray(jax.device_get(x)) < 0))
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} has {n_neg} negative entries (min "
                f"{float(m):.3g}); a curvature diagonal must be non-negative (positive "
                "semidefinite curvature)."
            )


def _check_diagonal(like: PyTree, tree: PyTree, name: str) -> None:
    """A diagonal must be shaped like the parameters, and finite and non-negative where its
    leaves are concrete. Errors name ``name`` and the leaf path."""
    check_same_shapes(like, tree, ref_name="pretrained", name=name, check_dtypes=False)
    with jax.ensure_compile_time_eval():
        check_finite(tree, name=name)
    _check_nonnegative_diagonal(tree, name)


def _check_scalar(x: Any, name: str) -> None:
    """A concrete scalar curvature s (C = s·I) must be finite and ≥ 0; tracers are skipped."""
    if is_traced(x):
        return
    v = float(np.asarray(jax.device_get(x), dtype=np.float64))
    if not np.isfinite(v) or v < 0:
        raise ValueError(
            f"{name} must be a finite non-negative scalar (the curvature s·I), got {x!r}."
        )


def as_operator(
    x: Any, like: PyTree | None = None, *, name: str = "curvature"
) -> CurvatureOperator:
    """Read a curvature argument as an operator: the one rule of jmerge.

    * a :class:`CurvatureOperator` is returned as is. With ``like``, the diagonal tree of a
      :class:`Diagonal` (or the ``diag_tree`` of a :class:`MatrixFree`, named
      ``name + ".diag_tree"``) is validated as below;
    * another object with ``.mv`` is ``MatrixFree(x.mv)`` (diagonal unknown);
    * a scalar s (a Python int/float, a NumPy scalar, a 0-d NumPy or JAX array, possibly a
      tracer) is s·I (:class:`Identity`), except when ``like`` is itself a single 0-d leaf (a
      scalar parameter): then it is ``Diagonal(s)``;
    * any other pytree d is ``Diagonal(d)``.

    With ``like`` (the parameters), a diagonal must have its tree structure and leaf shapes
    (dtypes may differ), and be finite and non-negative in every leaf that is not a tracer.
    A concrete scalar must be finite and non-negative whether or not ``like`` is given.

    Args:
      x: the curvature argument.
      like: the parameter pytree the curvature acts on, or None to skip the diagonal checks.
      name: how errors name ``x``, e.g. ``"curvatures[1]"``; leaf paths are appended.

    Raises:
      TypeError: ``x`` is None or a bool.
      TreeMismatchError: a diagonal's structure or shapes differ from ``like``.
      NonFiniteError: a concrete diagonal leaf holds NaN or Inf.
      ValueError: a concrete diagonal leaf has negative entries, or a concrete scalar is
        negative or not finite.
    """
    if isinstance(x, CurvatureOperator):
        if like is not None and isinstance(x, Diagonal):
            _check_diagonal(like, x.tree, name)
        elif like is not None and isinstance(x, MatrixFree) and x.diag_tree is not None:
            _check_diagonal(like, x.diag_tree, f"{name}.diag_tree")
        return x
    if hasattr(x, "mv"):
        return MatrixFree(x.mv)
    if x is None or _is_bool(x):
        raise TypeError(
            f"{name} is {x!r}; expected a curvature operator, an object with .mv, a "
            "non-negative scalar or a diagonal pytree shaped like the parameters."
        )
    if _is_scalar(x) and not (like is not None and _is_scalar_param(like)):
        _check_scalar(x, name)
        return Identity(float(x) if isinstance(x, (int, float)) else x)
    if like is not None:
        _check_diagonal(like, x, name)
    return Diagonal(x)


# ---------------------------------------------------------------------------------------------
# Mean diagonal (trace) of an operator


def _accumulation_dtype(leaves: Sequence[Any]) -> Any:
    """float32, or float64 if a leaf is float64 (and x64 is enabled)."""
    dt = jnp.result_type(jnp.float32, *[jnp.result_type(x) for x in leaves])
    if not jnp.issubdtype(dt, jnp.floating):
        dt = jnp.float32
    return jax.dtypes.canonicalize_dtype(jnp.promote_types(dt, jnp.float32))


def _masked_sum(tree: PyTree, like: PyTree, keep: Sequence[bool], acc: Any) -> jax.Array:
    """Σ of the entries of ``tree``'s leaves where ``keep`` is True, in dtype ``acc``."""
    check_same_shapes(like, tree, ref_name="like", name="diag(C)", check_dtypes=False)
    parts = [
        jnp.sum(jnp.asarray(x, acc))
        for x, k in zip(jax.tree_util.tree_leaves(tree), keep, strict=True)
        if k
    ]
    return sum(parts[1:], parts[0])


def _hutchinson(
    op: CurvatureOperator,
    like: PyTree,
    keep: Sequence[bool],
    acc: Any,
    key: jax.Array,
    num_probes: int,
) -> jax.Array:
    """(1/m) Σ_j z_jᵀ P C P z_j for m Rademacher probes (Hutchinson 1990): an unbiased
    estimate of tr(P C P). z_j is zero outside the mask; probes run one at a time
    (``lax.map``), so memory stays that of one mat-vec."""
    leaves, treedef = jax.tree_util.tree_flatten(like)

    def probe_dtype(x):
        dt = jnp.result_type(x)
        return dt if jnp.issubdtype(dt, jnp.inexact) else acc

    def one(k):
        ks = jax.random.split(k, len(leaves))
        zs = [
            jax.random.rademacher(ki, np.shape(x), probe_dtype(x))
            if m
            else jnp.zeros(np.shape(x), probe_dtype(x))
            for ki, x, m in zip(ks, leaves, keep, strict=True)
        ]
        czs = treedef.flatten_up_to(op.mv(treedef.unflatten(zs)))
        quad = [
            jnp.sum(jnp.asarray(z, acc) * jnp.asarray(cz, acc))  # not vdot: its ravel gathers
            for z, cz, m in zip(zs, czs, keep, strict=True)
            if m
        ]
        return sum(quad[1:], quad[0])

    return jnp.mean(jax.lax.map(one, jax.random.split(key, num_probes)))


def _masked_trace(
    op: CurvatureOperator,
    like: PyTree,
    keep: Sequence[bool],
    n: int,
    acc: Any,
    key: jax.Array,
    num_probes: int,
) -> jax.Array:
    """tr(P C P), exact where C (or each part of a Sum/Scaled/Damped) has a diagonal."""
    rec = lambda o: _masked_trace(o, like, keep, n, acc, key, num_probes)
    if isinstance(op, Sum):
        parts = [rec(o) for o in op.ops]
        return sum(parts[1:], parts[0])
    if isinstance(op, Scaled):
        return jnp.asarray(op.scale, acc) * rec(op.op)
    if isinstance(op, Damped):
        return rec(op.op) + jnp.asarray(op.delta, acc) * n
    if isinstance(op, Identity):
        return jnp.asarray(op.scale, acc) * n
    if op.has_diag:
        return _masked_sum(op.diag(like), like, keep, acc)
    return _hutchinson(op, like, keep, acc, key, num_probes)


def mean_diagonal(
    op: Any,
    like: PyTree,
    mask: PyTree | None = None,
    *,
    key: jax.Array | None = None,
    num_probes: int = 16,
) -> jax.Array:
    """The mean diagonal entry of C over the masked coordinates: tr(P C P) / n_P.

    P is the 0/1 diagonal projection onto the entries of the leaves where ``mask`` is True and
    n_P = tr(P) the number of those entries. The trace is exact where it is known: from
    ``op.diag(like)`` for operators with a diagonal, s·n_P for :class:`Identity`, and by
    linearity for :class:`Sum` (Σ of the parts), :class:`Scaled` (s · part) and
    :class:`Damped` (part + δ n_P). Any other part is estimated with Hutchinson's estimator
    (Hutchinson 1990): tr(P C P) ≈ (1/m) Σ_j z_jᵀ C z_j, z_j = P r_j with r_j Rademacher
    (±1) vectors, m = ``num_probes``; the same probes are used for every estimated part, so
    the result is linear in C for a fixed ``key``. Accumulated in float32 (float64 when a
    leaf of ``like`` is float64).

    Jit-able with ``mask`` closed over (static Python bools) and ``num_probes`` static;
    ``op``, ``like`` and ``key`` may be traced.

    Args:
      op: a curvature operator or anything :func:`as_operator` reads.
      like: a pytree shaped like the parameters.
      mask: a pytree of Python bools with the structure of ``like`` (True = counted), or None
        for all entries.
      key: a PRNG key for the probes; default ``jax.random.PRNGKey(0)``.
      num_probes: the number m of Hutchinson probes (used only where the diagonal is unknown).

    Returns:
      A scalar array in the accumulation dtype.

    Raises:
      TreeMismatchError: ``mask`` does not have the structure of ``like``.
      TypeError: a mask leaf is not a Python bool.
      ValueError: the mask selects no entry, or ``num_probes`` < 1.
    """
    op = as_operator(op)
    leaves = jax.tree_util.tree_leaves(like)
    if mask is None:
        keep = [True] * len(leaves)
    else:
        check_same_structure(like, mask, ref_name="like", name="mask")
        keep = jax.tree_util.tree_leaves(mask)
        bad = [type(m).__name__ for m in keep if not isinstance(m, (bool, np.bool_))]
        if bad:
            raise TypeError(
                f"mask must be a pytree of Python bools (static under jit), got a {bad[0]} leaf."
            )
        keep = [bool(m) for m in keep]
    n = sum(int(np.size(x)) for x, k in zip(leaves, keep, strict=True) if k)
    if n == 0:
        raise ValueError("mean_diagonal: the mask selects no entry (n_P = 0).")
    if int(num_probes) < 1:
        raise ValueError(f"num_probes must be at least 1, got {num_probes}.")
    acc = _accumulation_dtype(leaves)
    key = jax.random.PRNGKey(0) if key is None else key
    return _masked_trace(op, like, keep, n, acc, key, int(num_probes)) / jnp.asarray(n, acc)


# ---------------------------------------------------------------------------------------------
# Jacobi preconditioner


def _safe_inverse(d: jax.Array) -> jax.Array:
    tiny = jnp.finfo(jnp.result_type(d)).tiny
    return jnp.where(d > tiny, 1.0 / jnp.where(d > tiny, d, 1.0), 1.0).astype(jnp.result_type(d))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class _LazyJacobi:
    """v ↦ v / diag(C), with diag(C) taken shaped like v (for operators that need ``like``)."""

    op: CurvatureOperator

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
