"""Meshes, placement rules and sharded inputs for merges on many devices.

Every merge in jmerge is elementwise over parameters or a sum of per-leaf inner products
(CG), and every curvature is a sum over examples. So the layout that costs no communication
is: parameters (and everything shaped like them: fine-tuned models, diagonal curvatures, CG
iterates) sharded over a *model* axis of a mesh, and curvature inputs sharded by example over
a *data* axis. A merge then runs on each device's shard, and the only collectives the math
needs are scalar all-reduces (CG's inner products) and all-reduces of curvature sums over the
data axis. ``tests/merges/test_sharded_merges.py`` and ``tests/curvature/test_sharded_curvature.py``
check this on the compiled programs.

* :func:`make_mesh`: a named :class:`jax.sharding.Mesh` over all (global) devices.
* :func:`param_specs` / :func:`shard_params`: a ``PartitionSpec`` per leaf from path rules
  (regexes over ``jax.tree_util.keystr`` paths), with a default that shards the largest axis
  divisible by the model-axis size and replicates small leaves; placement on the mesh.
* :func:`batch_specs` / :func:`shard_batch`: the example (leading) axis over the data axis.
* :func:`shardings_of`, :func:`abstract_like`: shardings of a placed tree, and
  ``ShapeDtypeStruct`` targets carrying shardings (e.g. for an orbax restore).

Auto and Explicit meshes (:class:`jax.sharding.AxisType`) both work: placement is the same,
and a jitted merge keeps the shardings of its arguments in either mode. With an Explicit
mesh, trace under ``jax.set_mesh(mesh)``.

Multi-process (``jax.distributed``): :func:`make_mesh` uses the global ``jax.devices()``;
:func:`shard_params` builds global arrays from host values that every process passes in full
(each process keeps only its addressable shards); :func:`shard_batch` with
``process_local=True`` builds a global batch from each process's own share of the examples.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = [
    "make_mesh",
    "param_specs",
    "shard_params",
    "batch_specs",
    "shard_batch",
    "shardings_of",
    "abstract_like",
    "explicit_sharding",
    "explicit_mesh",
    "on_auto_axes",
]

PyTree = Any
Rules = Sequence[tuple[str, PartitionSpec]] | Mapping[str, PartitionSpec]

_AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


# ---------------------------------------------------------------------------------------------
# Mesh


def make_mesh(
    axis_shapes: Sequence[int] | None = None,
    axis_names: Sequence[str] = ("data", "model"),
    *,
    devices: Sequence[jax.Device] | None = None,
    axis_types: str | AxisType | Sequence[str | AxisType] | None = "auto",
) -> Mesh:
    """A :class:`jax.sharding.Mesh` of ``devices`` (default: all global ``jax.devices()``).

    Args:
      axis_shapes: the size of each named axis; product = number of devices. One entry may be
        ``-1`` (inferred). ``None`` means ``(P, 1, ..., 1, -1)`` for ``P`` processes owning the
        devices: the data axis (first) spans processes and the model axis (last) spans the
        devices of one process. On one host that is ``(1, n)``: parameters sharded n ways,
        which is what saves memory in a merge (the T fine-tuned models and their curvatures
        are parameter-sized, the curvature batches are not); across hosts, the model axis
        stays on one host's fast links and only data-axis reductions of curvature sums cross
        the network. With a single axis name, ``None`` means ``(n,)``.
      axis_names: the names of the axes, e.g. ``("data", "model")``.
      devices: the devices to lay out (built with :func:`jax.make_mesh`, which orders them for
        the physical topology).
      axis_types: ``"auto"`` (default), ``"explicit"``, an :class:`jax.sharding.AxisType`, or
        one of these per axis. Auto is the default (``jax.make_mesh``'s is Explicit) because
        jmerge's functions need no sharding annotations under Auto; under Explicit, trace
        under ``jax.set_mesh(mesh)``.

    Raises:
      ValueError: if the sizes do not multiply to the number of devices, more than one size is
        ``-1``, a size is not positive, the names repeat, or an axis type is unknown.
    """
    devices = list(jax.devices() if devices is None else devices)
    names = (axis_names,) if isinstance(axis_names, str) else tuple(axis_names)
    n = len(devices)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"make_mesh: axis_names must be distinct and non-empty, got {names}.")
    if axis_shapes is None:
        procs = len({d.process_index for d in devices})
        axis_shapes = (-1,) if len(names) == 1 else (procs, *[1] * (len(names) - 2), -1)
    shape = [int(s) for s in axis_shapes]
    if len(shape) != len(names):
        raise ValueError(
            f"make_mesh: {len(shape)} axis sizes {tuple(shape)} for {len(names)} axis names "
            f"{names}."
        )
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(
            f"make_mesh: axis sizes {tuple(shape)} must be positive, with at most one -1."
        )
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if n % known:
            raise ValueError(
                f"make_mesh: cannot infer the -1 in axis sizes {tuple(shape)} for {names}: "
                f"{n} devices are not divisible by {known}."
            )
        shape[shape.index(-1)] = n // known
    if math.prod(shape) != n:
        raise ValueError(
            f"make_mesh: axis sizes {dict(zip(names, shape, strict=True))} multiply to "
            f"{math.prod(shape)}, but there are {n} devices."
        )
    types = _axis_types(axis_types, names)
    return jax.make_mesh(tuple(shape), names, axis_types=types, devices=devices)


def _axis_types(axis_types, names) -> tuple[AxisType, ...]:
    if axis_types is None:
        axis_types = "auto"
    if isinstance(axis_types, str | AxisType):
        axis_types = [axis_types] * len(names)
    out = []
    for t in axis_types:
        if isinstance(t, str):
            if t.lower() not in _AXIS_TYPES:
                raise ValueError(
                    f"make_mesh: unknown axis type {t!r}; expected 'auto', 'explicit' or a "
                    "jax.sharding.AxisType."
                )
            t = _AXIS_TYPES[t.lower()]
        if not isinstance(t, AxisType):
            raise ValueError(f"make_mesh: axis type {t!r} is not a jax.sharding.AxisType.")
        out.append(t)
    if len(out) != len(names):
        raise ValueError(f"make_mesh: {len(out)} axis types for {len(names)} axes {names}.")
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Parameters


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _mesh_shape(mesh: Mesh) -> dict[str, int]:
    return dict(mesh.shape)


def _axis_size(mesh: Mesh, axis: str | Sequence[str], who: str) -> int:
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    unknown = [a for a in names if a not in mesh.axis_names]
    if unknown:
        raise ValueError(
            f"{who}: axis {unknown[0]!r} is not an axis of the mesh {_mesh_shape(mesh)}."
        )
    return math.prod(mesh.shape[a] for a in names)


def _check_spec(path: str, shape: tuple[int, ...], spec: Any, mesh: Mesh, who: str) -> None:
    """Raise ValueError unless ``spec`` is a PartitionSpec that divides ``shape`` on ``mesh``."""

    def fail(why: str) -> None:
        raise ValueError(
            f"{who}: leaf {path} of shape {shape}: spec {spec} {why} (mesh {_mesh_shape(mesh)})."
        )

    if not isinstance(spec, PartitionSpec):
        fail("is not a jax.sharding.PartitionSpec")
    if len(spec) > len(shape):
        fail(f"has {len(spec)} entries for an array of rank {len(shape)}")
    used: list[str] = []
    for dim, entry in enumerate(spec):
        if entry is None or entry is PartitionSpec.UNCONSTRAINED:
            continue
        names = (entry,) if isinstance(entry, str) else tuple(entry)
        for name in names:
            if name not in mesh.axis_names:
                fail(f"names {name!r}, which is not a mesh axis")
            if name in used:
                fail(f"uses mesh axis {name!r} twice")
            used.append(name)
        size = math.prod(mesh.shape[a] for a in names)
        if shape[dim] % size:
            fail(f"does not divide it: axis {dim} of size {shape[dim]} over {names} of size {size}")


def _default_spec(shape: tuple[int, ...], mesh_size: int, axis: Any, min_size: int):
    """Shard the largest axis divisible by ``mesh_size`` (the last of equals); else replicate."""
    if mesh_size == 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    best = None
    for dim, size in enumerate(shape):
        if size % mesh_size == 0 and (best is None or size >= shape[best]):
            best = dim
    if best is None:
        return PartitionSpec()
    return PartitionSpec(*[None] * best, axis)


def _rules(rules: Rules) -> list[tuple[re.Pattern, PartitionSpec]]:
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = []
    for rule in items:
        pattern, spec = rule
        out.append((re.compile(pattern), spec))
    return out


def param_specs(
    params: PyTree,
    mesh: Mesh,
    rules: Rules = (),
    *,
    axis: str | Sequence[str] = "model",
    min_size: int = 2**14,
) -> PyTree:
    """A :class:`~jax.sharding.PartitionSpec` per leaf of ``params`` (arrays or
    ``ShapeDtypeStruct``), by rules, else by the default rule.

    Rules: ``(regex, spec)`` pairs (a sequence, or a dict in insertion order); the first whose
    regex matches the leaf's ``jax.tree_util.keystr`` path (:func:`re.search`) gives its spec,
    e.g. ``[(r"\\['embed'\\]", P("model", None)), (r"bias", P())]``.

    Default rule (no rule matched): a leaf with fewer than ``min_size`` elements, or whose axes
    are all indivisible by ``n = mesh.shape[axis]`` (the product for a tuple of axes), is
    replicated (``P()``); otherwise its largest axis divisible by ``n`` is sharded over
    ``axis`` (of equal sizes, the last: the output-feature axis of a Flax ``Dense``/``Conv``
    kernel, so a kernel and its bias shard alike). Every leaf then holds ``1/n`` of its
    elements per device, and elementwise merges run without communication.

    Raises:
      ValueError: if ``axis`` is not a mesh axis, or a rule's spec names an unknown mesh axis,
        has more entries than the leaf's rank, or does not divide the leaf's shape; the
        message names the leaf path, its shape, the spec and the mesh shape.
    """
    size = _axis_size(mesh, axis, "param_specs")
    compiled = _rules(rules)

    def spec(path, leaf):
        key, shape = jax.tree_util.keystr(path), _shape(leaf)
        for pattern, s in compiled:
            if pattern.search(key):
                _check_spec(key, shape, s, mesh, "param_specs")
                return s
        return _default_spec(shape, size, axis, min_size)

    return jax.tree_util.tree_map_with_path(spec, params)


def _place(leaf: Any, sharding: NamedSharding) -> jax.Array:
    """``leaf`` as a global array with ``sharding``, also when the mesh spans processes."""
    if sharding.is_fully_addressable or (
        isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
    ):
        return jax.device_put(leaf, sharding)
    # A host value (or a process-local array) that every process holds in full: each process
    # writes only the shards its own devices hold.
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(
    params: PyTree,
    mesh: Mesh,
    rules: Rules = (),
    *,
    axis: str | Sequence[str] = "model",
    min_size: int = 2**14,
) -> PyTree:
    """``params`` placed on ``mesh`` with :func:`param_specs` (same arguments).

    Leaves may be NumPy arrays, jax Arrays (resharded if placed otherwise) or scalars. When the
    mesh spans several processes, every process must call this with the full value of every
    leaf (e.g. each loads the same checkpoint; the values must agree), and each keeps only
    the shards of its own devices (:func:`jax.make_array_from_callback`). Leaves that are
    already global arrays are resharded with :func:`jax.device_put`.

    Raises:
      ValueError: as :func:`param_specs`.
    """
    specs = param_specs(params, mesh, rules, axis=axis, min_size=min_size)
    return jax.tree.map(lambda x, s: _place(x, NamedSharding(mesh, s)), params, specs)


# ---------------------------------------------------------------------------------------------
# Batches


def batch_specs(batch: PyTree, mesh: Mesh, *, axis: str | Sequence[str] = "data") -> PyTree:
    """``P(axis)`` for every leaf of ``batch``: its leading (example) axis sharded over
    ``axis`` of ``mesh`` (a name, or a tuple of names to shard over several axes), the other
    axes replicated.

    Raises:
      ValueError: if ``axis`` is not a mesh axis, or a leaf is a scalar or has a leading size
        not divisible by the axis size (the message names the leaf path and its shape).
    """
    size = _axis_size(mesh, axis, "batch_specs")
    spec = PartitionSpec(axis if isinstance(axis, str) else tuple(axis))

    def check(path, leaf):
        _check_batch_leaf(jax.tree_util.keystr(path), _shape(leaf), size, mesh, axis, "")
        return spec

    return jax.tree_util.tree_map_with_path(check, batch)


def _check_batch_leaf(key, shape, size, mesh, axis, what) -> None:
    if not shape:
        raise ValueError(
            f"batch_specs: leaf {key} is a scalar; every batch leaf needs a leading example "
            "axis."
        )
    if shape[0] % size:
        raise ValueError(
            f"batch_specs: leaf {key} of shape {shape} has {shape[0]} {what}examples, not "
            f"divisible by the {size} shards of mesh axis {axis!r} (mesh {_mesh_shape(mesh)})."
        )


def _local_shards(mesh: Mesh, axis: str | Sequence[str]) -> int:
    """How many distinct shards of ``axis`` this process's devices hold."""
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    dims = [mesh.axis_names.index(a) for a in names]
    me = jax.process_index()
    coords = {
        tuple(idx[d] for d in dims)
        for idx in np.ndindex(mesh.devices.shape)
        if mesh.devices[idx].process_index == me
    }
    return len(coords)


def shard_batch(
    batch: PyTree,
    mesh: Mesh,
    *,
    axis: str | Sequence[str] = "data",
    process_local: bool = False,
) -> PyTree:
    """``batch`` placed on ``mesh`` with :func:`batch_specs`: examples over ``axis``.

    Args:
      batch: a pytree of arrays with a leading example axis (inputs, labels, ...).
      process_local: ``False``: every process passes the whole batch (the same values).
        ``True``: each process passes only its own share of the examples, in the order of its
        devices along ``axis``; its leading size must be divisible by the number of ``axis``
        shards its devices hold, and the global batch is the concatenation over processes
        (:func:`jax.make_array_from_process_local_data`). On one process both are the same.

    Raises:
      ValueError: as :func:`batch_specs` (for ``process_local=True``, divisibility of the
        local share).
    """
    if not process_local:
        specs = batch_specs(batch, mesh, axis=axis)
        return jax.tree.map(lambda x, s: _place(x, NamedSharding(mesh, s)), batch, specs)
    _axis_size(mesh, axis, "shard_batch")
    local = _local_shards(mesh, axis)
    spec = PartitionSpec(axis if isinstance(axis, str) else tuple(axis))

    def place(path, leaf):
        leaf = np.asarray(leaf)
        _check_batch_leaf(
            jax.tree_util.keystr(path), leaf.shape, local, mesh, axis, "process-local "
        )
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), leaf)

    return jax.tree_util.tree_map_with_path(place, batch)


# ---------------------------------------------------------------------------------------------
# Small helpers


def shardings_of(tree: PyTree) -> PyTree:
    """The ``.sharding`` of every leaf of a tree of jax Arrays (or ``ShapeDtypeStruct``)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def abstract_like(tree: PyTree, shardings: PyTree | jax.sharding.Sharding | None = None) -> PyTree:
    """``jax.ShapeDtypeStruct`` per leaf of ``tree`` with a sharding: the matching leaf of
    ``shardings`` (a pytree of shardings, or one sharding for every leaf), or, when ``None``,
    the leaf's own ``.sharding``. For restore targets (``orbax``) and ``jit(...).lower``.
    """
    if shardings is None:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
        )
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(_shape(x), x.dtype, sharding=shardings), tree
        )
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(_shape(x), x.dtype, sharding=s), tree, shardings
    )


def explicit_sharding(x: Any) -> NamedSharding | None:
    """The sharding in ``x``'s type when ``x`` lives on a mesh with an Explicit axis, else
    ``None``.

    Under Explicit sharding (``jax.sharding.AxisType.Explicit``) every value's type carries
    its ``NamedSharding`` and ops that create arrays from nothing (``broadcasted_iota``,
    ``zeros``) or scatter into them need an ``out_sharding``; under Auto sharding (or outside a
    mesh) XLA's partitioner chooses, and passing ``None`` keeps that. Works on tracers and on
    concrete arrays alike (``jax.typeof``); given a ``Sharding``, checks that one.
    """
    if isinstance(x, jax.sharding.Sharding):
        sharding = x
    else:
        sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or AxisType.Explicit not in tuple(mesh.axis_types):
        return None
    return sharding


def explicit_mesh(tree: PyTree) -> jax.sharding.AbstractMesh | None:
    """The abstract mesh of the first leaf of ``tree`` typed on a mesh with an Explicit axis
    (see :func:`explicit_sharding`), else ``None``."""
    for leaf in jax.tree_util.tree_leaves(tree):
        sharding = explicit_sharding(leaf)
        if sharding is not None:
            return sharding.mesh.abstract_mesh if isinstance(sharding.mesh, Mesh) else sharding.mesh
    return None


def on_auto_axes(fn: Callable[..., tuple[Any, Any]]) -> Callable[..., Any]:
    """Run a traced ``fn(*args, shardings=..., **static) -> (out, out_specs)`` with every
    Explicit mesh axis of its arguments switched to Auto, and return ``out`` resharded to
    ``out_specs`` (a pytree prefix of ``PartitionSpec`` s) on the Explicit mesh.

    For kernels written for XLA's sharding propagation (the curvature sums, whose per-example
    intermediates are laid out by ``with_sharding_constraint`` and reduced over the data
    axis): under Explicit sharding every contraction over a sharded axis would otherwise need
    its own ``out_sharding``. This is :func:`jax.sharding.auto_axes` with the output layout
    computed by ``fn`` while it traces (it depends on the layers ``fn`` finds), rather than
    given up front. ``shardings``, a tuple of the parameters' ``NamedSharding`` s (or
    ``None``), is rebuilt on the Auto mesh so that ``fn`` can constrain to it. Without an
    Explicit mesh, ``fn`` runs as is and ``out_specs`` is ignored. Call it inside ``jit``.
    """

    @functools.wraps(fn)
    def wrapped(*args, shardings=None, **static):
        mesh = explicit_mesh((args, shardings))
        if mesh is None:
            return fn(*args, shardings=shardings, **static)[0]
        auto = mesh.update_axis_types({name: AxisType.Auto for name in mesh.axis_names})
        if shardings is not None:
            shardings = tuple(NamedSharding(auto, s.spec) for s in shardings)
        with jax.sharding.use_abstract_mesh(auto):
            # Every axis is Auto now: the arguments' types hold no axis (XLA keeps their
            # layout), as in jax.sharding.auto_axes.
            args = jax.sharding.reshard(
                args, jax.tree.map(lambda a: PartitionSpec(*[None] * jnp.ndim(a)), args)
            )
            out, specs = fn(*args, shardings=shardings, **static)
        return jax.sharding.reshard(out, specs)

    return wrapped
