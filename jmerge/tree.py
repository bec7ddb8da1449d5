"""Validation of pytrees at the public boundary, and the stacked-model layout.

Every public function of jmerge validates its pytree arguments here, once, before any
tracing, so that a mismatch is reported with the leaf path (``jax.tree_util.keystr``), what
was expected and what came, instead of surfacing as a shape error deep inside XLA or, worse,
as a silently wrong merge. Tree *arithmetic* is not written here: it comes from
``optax.tree_utils`` and ``jax.tree_util``.

Layout conventions:

* A sequence of models is a Python list (or tuple) of pytrees of one structure.
* The jitted kernels work on the *stacked* form: one pytree whose leaves carry a leading
  model axis of length T. :func:`as_stacked` accepts either and returns the stacked form.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.sharding import NamedSharding

__all__ = [
    "TreeMismatchError",
    "NonFiniteError",
    "check_same_structure",
    "check_same_shapes",
    "check_finite",
    "validate_models",
    "as_stacked",
    "stack",
    "unstack",
    "leaf_mask",
    "path_strings",
    "is_traced",
    "compute_dtype",
    "upcast",
    "cast_like",
    "axpy",
    "require",
    "runtime_check_finite",
    "placed_shardings",
    "constrain",
    "place",
]

PyTree = Any


class TreeMismatchError(ValueError):
    """Two pytrees that must agree (structure, shapes or dtypes) do not."""


class NonFiniteError(ValueError):
    """A leaf holds NaN or Inf where finite values are required."""


def path_strings(tree: PyTree) -> list[str]:
    """The ``keystr`` path of every leaf of ``tree``, in leaf order."""
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def is_traced(x: Any) -> bool:
    """True if ``x`` is a tracer (an abstract value inside ``jit``/``vmap``/``grad``).

    Arrays closed over by a jitted function are *not* traced: their values can be checked
    eagerly (under :func:`jax.ensure_compile_time_eval`) even while an outer ``jit`` traces.
    """
    return isinstance(x, jax.core.Tracer)


def check_same_structure(
    reference: PyTree, other: PyTree, *, ref_name: str = "reference", name: str = "tree"
) -> None:
    """Raise :class:`TreeMismatchError` unless ``other`` has the tree structure of ``reference``.

    The message lists the leaf paths that are missing from ``other`` and those it has in
    excess, which is what a user needs to find a renamed layer or a forgotten head.
    """
    ref_def = jax.tree_util.tree_structure(reference)
    oth_def = jax.tree_util.tree_structure(other)
    if ref_def == oth_def:
        return
    ref_paths = path_strings(reference)
    oth_paths = path_strings(other)
    missing = [p for p in ref_paths if p not in set(oth_paths)]
    extra = [p for p in oth_paths if p not in set(ref_paths)]
    parts = [f"{name} does not have the tree structure of {ref_name}."]
    if missing:
        parts.append(f"Leaves missing from {name}: {_short(missing)}.")
    if extra:
        parts.append(f"Leaves in {name} but not in {ref_name}: {_short(extra)}.")
    if not missing and not extra:
        parts.append(f"Same leaf paths, different node types: expected {ref_def}, got {oth_def}.")
    raise TreeMismatchError(" ".join(parts))


def _short(paths: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" (and {len(paths) - limit} more)" if len(paths) > limit else "")


def check_same_shapes(
    reference: PyTree,
    other: PyTree,
    *,
    ref_name: str = "reference",
    name: str = "tree",
    check_dtypes: bool = True,
    leading_axis: int | None = None,
) -> None:
    """Raise :class:`TreeMismatchError` unless every leaf of ``other`` matches ``reference``.

    Args:
      reference, other: pytrees of one structure (checked first).
      check_dtypes: also require equal dtypes.
      leading_axis: if given, every leaf of ``other`` must have shape
        ``(leading_axis, *reference_leaf.shape)`` (the stacked-model layout).
    """
    check_same_structure(reference, other, ref_name=ref_name, name=name)
    for (path, r), o in zip(
        jax.tree_util.tree_leaves_with_path(reference),
        jax.tree_util.tree_leaves(other),
        strict=True,
    ):
        r_shape, o_shape = np.shape(r), np.shape(o)
        want = r_shape if leading_axis is None else (leading_axis, *r_shape)
        if tuple(o_shape) != tuple(want):
            raise TreeMismatchError(
                f"{name}{jax.tree_util.keystr(path)} has shape {tuple(o_shape)}, expected "
                f"{tuple(want)} (the shape of {ref_name}{jax.tree_util.keystr(path)}"
                + (f" with a leading model axis of {leading_axis}" if leading_axis else "")
                + ")."
            )
        if check_dtypes and jnp.result_type(r) != jnp.result_type(o):
            raise TreeMismatchError(
                f"{name}{jax.tree_util.keystr(path)} has dtype {jnp.result_type(o)}, expected "
                f"{jnp.result_type(r)} (the dtype of {ref_name}{jax.tree_util.keystr(path)})."
            )


# ---------------------------------------------------------------------------------------------
# Dtypes and the few tree operations optax.tree_utils does not have with these semantics


def compute_dtype(dtype: Any) -> Any:
    """The dtype arithmetic runs in: float32 for bf16/fp16 (and ints), the dtype if wider."""
    return jnp.promote_types(dtype, jnp.float32)


def upcast(tree: PyTree) -> PyTree:
    """Every leaf cast to :func:`compute_dtype` of its dtype (bf16 -> f32, f64 stays f64)."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, compute_dtype(jnp.result_type(x))), tree)


def cast_like(tree: PyTree, like: PyTree) -> PyTree:
    """Every leaf of ``tree`` cast to the dtype of the matching leaf of ``like``."""
    return jax.tree_util.tree_map(lambda x, r: jnp.asarray(x, jnp.result_type(r)), tree, like)


def axpy(a: Any, x: PyTree, y: PyTree) -> PyTree:
    """y + a·x per leaf, with the scalar ``a`` cast to each leaf of y's dtype.

    Unlike ``optax.tree_utils.tree_add_scale`` the dtype of y is kept: a float32 (or float64)
    scalar does not promote bf16 / float32 leaves.
    """
    return jax.tree_util.tree_map(lambda u, v: v + jnp.asarray(a, jnp.result_type(v)) * u, x, y)


# ---------------------------------------------------------------------------------------------
# Checks of values, eager where the values are known, at run time where they are traced


def require(ok: Any, message: str) -> None:
    """Raise ``ValueError(message)`` if the boolean ``ok`` is False.

    ``ok`` may be computed from traced values (inside ``jax.jit``/``vmap``/``grad``); then it
    cannot be read at trace time, and the check is staged instead: a
    ``checkify.debug_check`` (an error when the caller runs under
    ``jax.experimental.checkify.checkify(f, errors=checkify.user_checks)``) and a
    ``RuntimeWarning`` with ``message`` when the compiled program finds ``ok`` False.
    Never a trace-time crash, never a silent wrong value.
    """
    if not is_traced(ok):
        if not bool(np.all(np.asarray(jax.device_get(ok)))):
            raise ValueError(message)
        return
    ok = jnp.all(ok)
    checkify.debug_check(ok, message.replace("{", "{{").replace("}", "}}"))
    jax.debug.callback(functools.partial(_warn_unless, message=message), ok)


def _warn_unless(ok: Any, *, message: str) -> None:
    if not bool(np.all(np.asarray(ok))):
        warnings.warn(message, RuntimeWarning, stacklevel=2)


def runtime_check_finite(tree: PyTree, *, name: str) -> None:
    """Stage a finiteness check of the (traced) ``tree``: one flag per leaf, one callback.

    For results computed inside ``jit``: a NaN or Inf leaf is reported at run time with its
    path (``RuntimeWarning``, and a ``checkify`` error under ``checkify.checkify``). Concrete
    trees are checked eagerly with :func:`check_finite` instead.
    """
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    inexact = [(p, x) for p, x in leaves if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not inexact:
        return
    if not any(is_traced(x) for _, x in inexact):
        check_finite(tree, name=name)
        return
    paths = [jax.tree_util.keystr(p) for p, _ in inexact]
    flags = jnp.stack([jnp.all(jnp.isfinite(x)) for _, x in inexact])
    checkify.debug_check(jnp.all(flags), f"{name} has NaN or Inf entries.")
    jax.debug.callback(functools.partial(_warn_nonfinite, paths=paths, name=name), flags)


def _warn_nonfinite(flags: Any, *, paths: list[str], name: str) -> None:
    flags = np.asarray(flags).reshape(-1, len(paths)).all(axis=0)
    bad = [p for p, ok in zip(paths, flags, strict=True) if not ok]
    if bad:
        warnings.warn(
            f"{name} is not finite at {_short([name + p for p in bad])}: NaN or Inf entries "
            "(computed inside jax.jit, where the inputs could not be checked beforehand).",
            RuntimeWarning,
            stacklevel=2,
        )


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> list[jax.Array]:
    # One compiled program per tree signature, not one dispatch per leaf.
    return [jnp.all(jnp.isfinite(x)) for x in leaves]


def check_finite(tree: PyTree, *, name: str = "tree") -> None:
    """Raise :class:`NonFiniteError` naming the first leaf that holds NaN or Inf.

    Concrete leaves are checked, also while an outer ``jax.jit`` traces (arrays it closes over
    are known; the check runs under :func:`jax.ensure_compile_time_eval`). Tracers cannot be
    inspected and are skipped: merges check their traced results with
    :func:`runtime_check_finite`, and the solvers return status flags.
    """
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    concrete = [(p, x) for p, x in leaves if not is_traced(x)]
    if not concrete:
        return
    inexact = [(p, x) for p, x in concrete if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not inexact:
        return
    with jax.ensure_compile_time_eval():
        flags = jax.device_get(_all_finite([x for _, x in inexact]))
    for (path, x), ok in zip(inexact, flags, strict=True):
        if not bool(ok):
            xs = np.asarray(jax.device_get(x))
            n_nan, n_inf = int(np.isnan(xs).sum()), int(np.isinf(xs).sum())
            raise NonFiniteError(
                f"{name}{jax.tree_util.keystr(path)} is not finite: {n_nan} NaN and {n_inf} Inf "
                f"of {xs.size} entries (shape {xs.shape}); finite values were expected."
            )


def validate_models(
    reference: PyTree,
    models: Sequence[PyTree],
    *,
    ref_name: str = "pretrained",
    name: str = "finetuned",
    check_dtypes: bool = True,
    finite: bool = True,
) -> None:
    """Check that every model in ``models`` matches ``reference`` leaf for leaf.

    Errors name the model's index and the leaf path, e.g.
    ``finetuned[2]['params']['Dense_0']['kernel'] has shape (3, 4), expected (4, 4)``.
    """
    for i, m in enumerate(models):
        check_same_shapes(
            reference, m, ref_name=ref_name, name=f"{name}[{i}]", check_dtypes=check_dtypes
        )
        if finite:
            check_finite(m, name=f"{name}[{i}]")
    if finite:
        check_finite(reference, name=ref_name)


@jax.jit
def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stack models into one pytree with a leading model axis: leaf shape ``(T, *shape)``."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def unstack(stacked: PyTree) -> list[PyTree]:
    """Inverse of :func:`stack`: a list of T pytrees."""
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    return [jax.tree_util.tree_map(lambda x, i=i: x[i], stacked) for i in range(n)]


def _is_model_sequence(reference: PyTree, models: Any) -> bool:
    if not isinstance(models, (list, tuple)) or len(models) == 0:
        return False
    ref_def = jax.tree_util.tree_structure(reference)
    if jax.tree_util.tree_structure(models) == ref_def:
        return False  # the reference itself is a list/tuple and `models` is a stacked tree
    return True


def as_stacked(
    reference: PyTree,
    models: Sequence[PyTree] | PyTree,
    *,
    ref_name: str = "pretrained",
    name: str = "finetuned",
    check_dtypes: bool = True,
    finite: bool = True,
) -> tuple[PyTree, int]:
    """Validate ``models`` against ``reference`` and return ``(stacked, T)``.

    ``models`` is either a list of T pytrees shaped like ``reference`` or one pytree whose
    leaves have shape ``(T, *reference_leaf.shape)``.
    """
    if _is_model_sequence(reference, models):
        validate_models(
            reference,
            models,
            ref_name=ref_name,
            name=name,
            check_dtypes=check_dtypes,
            finite=finite,
        )
        return stack(models), len(models)
    check_same_structure(reference, models, ref_name=ref_name, name=name)
    leaves = jax.tree_util.tree_leaves(models)
    if not leaves or np.ndim(leaves[0]) == 0:
        raise TreeMismatchError(
            f"{name} must be a list of models or a stacked pytree with a leading model axis."
        )
    t = int(np.shape(leaves[0])[0])
    check_same_shapes(
        reference, models, ref_name=ref_name, name=name, check_dtypes=check_dtypes, leading_axis=t
    )
    if finite:
        check_finite(models, name=name)
        check_finite(reference, name=ref_name)
    return models, t


LeafFilter = str | re.Pattern | Callable[[str, Any], bool] | None


def leaf_mask(tree: PyTree, include: LeafFilter = None, exclude: LeafFilter = None) -> PyTree:
    """A pytree of Python bools, ``True`` where a leaf takes part in a merge.

    ``include``/``exclude`` are regular expressions searched in the leaf's
    ``jax.tree_util.keystr`` path (e.g. ``exclude=r"head"`` keeps per-task classifier heads out)
    or predicates ``f(path_str, leaf) -> bool``. A leaf is merged if it matches ``include`` (or
    ``include`` is None) and does not match ``exclude``.
    """

    def matches(filt: LeafFilter, path: str, leaf: Any) -> bool:
        if isinstance(filt, (str, re.Pattern)):
            return re.search(filt, path) is not None
        return bool(filt(path, leaf))

    def decide(path, leaf):
        p = jax.tree_util.keystr(path)
        keep = include is None or matches(include, p, leaf)
        if exclude is not None and matches(exclude, p, leaf):
            keep = False
        return keep

    return jax.tree_util.tree_map_with_path(decide, tree)


def placed_shardings(tree: PyTree, *, typed: bool = True) -> tuple[NamedSharding, ...] | None:
    """The leaves' :class:`~jax.sharding.NamedSharding` s, when every leaf of ``tree`` is a
    concrete ``jax.Array`` placed by one on a common mesh (an eager call on sharded
    parameters); else ``None`` (traced leaves, NumPy arrays, single-device arrays).

    The curvature functions pass these as a static argument to their jitted kernel, which
    constrains its parameter-shaped result to them (:func:`constrain`): without it, XLA's
    sharding propagation would place the result like the activations it is computed from
    (e.g. a bias' Fisher sharded over the model axis, a kernel's over its input axis). Under
    an outer ``jax.jit`` on an Auto mesh the shardings of traced parameters are not known
    here: a bare curvature function needs ``out_shardings`` on that ``jit``, while the solver
    merges need neither (their kernels lay the result out like the pretrained params, a
    ``shard_alike`` group, ``jmerge.merges._solve.laid_out_like``). Under an Explicit mesh
    every leaf's type carries its sharding, which is returned for traced leaves too unless
    ``typed`` is False.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    types = [getattr(jax.typeof(x), "sharding", None) if is_traced(x) else None for x in leaves]
    if typed and leaves and all(
        isinstance(s, NamedSharding) and not s.mesh.empty and s.mesh._any_axis_explicit
        for s in types
    ):
        return tuple(types) if len({s.mesh for s in types}) == 1 else None
    if not leaves or not all(
        isinstance(x, jax.Array) and not is_traced(x) and isinstance(x.sharding, NamedSharding)
        for x in leaves
    ):
        return None
    shardings = tuple(x.sharding for x in leaves)
    if len({s.mesh for s in shardings}) != 1:
        return None
    return shardings


def constrain(tree: PyTree, shardings: Sequence[NamedSharding] | None) -> PyTree:
    """``tree`` with each leaf constrained (``jax.jax.lax.with_sharding_constraint``) to the
    matching entry of ``shardings`` (from :func:`placed_shardings`); unchanged for None."""
    if shardings is None:
        return tree
    leaves, treedef = jax.tree_util.tree_flatten(tree)

    def one(x, s):
        if s.mesh._any_axis_explicit:  # Explicit axes: a constraint would only assert
            return jax.sharding.reshard(x, s)
        return jax.lax.with_sharding_constraint(x, s)

    return treedef.unflatten([one(x, s) for x, s in zip(leaves, shardings, strict=True)])


def place(tree: PyTree, shardings: Sequence[NamedSharding] | None) -> PyTree:
    """``tree`` (concrete arrays) moved onto ``shardings`` (from :func:`placed_shardings`)
    where a leaf's layout differs; unchanged for None. Used after a compiled solve whose
    output layout XLA chose (e.g. a small replicated bias returned sharded), so that an eager
    merge returns the input parameters' shardings without constraining the solve's loop."""
    if shardings is None:
        return tree
    if any(is_traced(x) for x in jax.tree_util.tree_leaves(tree)):  # typed (Explicit) shardings
        return constrain(tree, shardings)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef.unflatten([
        x if x.sharding.is_equivalent_to(s, x.ndim) else jax.device_put(x, s)
        for x, s in zip(leaves, shardings, strict=True)
    ])
