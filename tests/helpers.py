"""Fixtures shared by the tests: small problems and independent NumPy references.

Tests import jmerge's public names only; what they compare against is written here, in
float64 NumPy, without jmerge.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {"a": (3,), "c": (2, 3)}


def problem(seed=0, num_models=2, dtype=np.float64, shapes=SHAPES, fisher_range=(0.2, 2.0)):
    """(pretrained, [finetuned], [diagonal Fisher]) on a two-leaf dict of ``shapes``."""
    rng = np.random.default_rng(seed)
    pre = {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in shapes.items()}
    ft = [
        {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in shapes.items()}
        for _ in range(num_models)
    ]
    fish = [
        {k: jnp.asarray(rng.uniform(*fisher_range, size=s)) for k, s in shapes.items()}
        for _ in range(num_models)
    ]
    return pre, ft, fish


def stack(trees):
    """Models as one pytree with a leading model axis."""
    return jax.tree_util.tree_map(lambda *x: jnp.stack(x), *trees)


def scale_tree(tree, c):
    return jax.tree_util.tree_map(lambda x: x * jnp.asarray(c, x.dtype), tree)


def ravel(tree) -> np.ndarray:
    """The leaves of a dict pytree, float64, concatenated in sorted-key order."""
    return np.concatenate([np.asarray(tree[k], np.float64).ravel() for k in sorted(tree)])


def unravel(vec: np.ndarray, like) -> dict:
    out, i = {}, 0
    for k in sorted(like):
        n = int(np.size(like[k]))
        out[k] = vec[i : i + n].reshape(np.shape(like[k]))
        i += n
    return out


def leaf_selector(like, keys) -> np.ndarray:
    """Boolean vector over ``ravel(like)``: True on the entries of the leaves in ``keys``."""
    return np.concatenate([np.full(int(np.size(like[k])), k in keys) for k in sorted(like)])


def diag_merge(pre, ft, fish, w, damping=0.0, anchor=None):
    """(Σ_t w_t d_t θ_t + δ a) / (Σ_t w_t d_t + δ), leafwise in NumPy (a = θ0 by default)."""
    anchor = pre if anchor is None else anchor
    out = {}
    for k in pre:
        num = sum(
            wt * np.asarray(f[k], np.float64) * np.asarray(t[k], np.float64)
            for wt, f, t in zip(w, fish, ft, strict=True)
        )
        den = sum(wt * np.asarray(f[k], np.float64) for wt, f in zip(w, fish, strict=True))
        out[k] = (num + damping * np.asarray(anchor[k])) / (den + damping)
    return out


def diag_objective(theta, pre, ft, fish, w, damping=0.0):
    total = 0.0
    for k in pre:
        for wt, f, t in zip(w, fish, ft, strict=True):
            total += wt * np.sum(np.asarray(f[k]) * (np.asarray(theta[k]) - np.asarray(t[k])) ** 2)
        total += damping * np.sum((np.asarray(theta[k]) - np.asarray(pre[k])) ** 2)
    return 0.5 * total


def spd(n, kappa, seed):
    """A dense SPD matrix with eigenvalues log-spaced in [1, κ], and a right-hand side."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * np.logspace(0, np.log10(kappa), n)) @ q.T, rng.normal(size=n)


def dense_mv(v, m):
    """(M v) for a dense (n, n) M over the raveled dict pytree v (the ``ravel`` order)."""
    keys = sorted(v)
    flat = jnp.concatenate([v[k].reshape(-1) for k in keys])
    out = m.astype(flat.dtype) @ flat
    res, i = {}, 0
    for k in keys:
        n = v[k].size
        res[k] = out[i : i + n].reshape(v[k].shape)
        i += n
    return res


# ---------------------------------------------------------------------------------------------
# Compiled (SPMD-partitioned) HLO: which collectives a program runs, over which mesh axes

_COLLECTIVE = re.compile(
    r"= (\([^)]*\)|\S+) "
    r"(all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)(?:-start)?\((.*)$",
    re.MULTILINE,
)
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_MESH_GROUPS = re.compile(
    r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))? "
    r"\{([^}]*)\}"
)
_LIST_GROUPS = re.compile(r"(?:replica_groups|source_target_pairs)=\{((?:\{[\d,]*\},?)*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


class Collective(NamedTuple):
    """One collective of compiled HLO: its op, result shape, the mesh axes its device groups
    span (None if they could not be read), and the ``op_name`` metadata (the jax source op)."""

    op: str
    shape: tuple[int, ...]
    axes: tuple[str, ...] | None
    source: str


def _group_axes(attrs: str, mesh_shape: dict[str, int] | None) -> tuple[str, ...] | None:
    """The mesh axes along which the device groups of a collective's attributes vary."""
    if mesh_shape is None:
        return None
    names, dims = list(mesh_shape), tuple(mesh_shape.values())
    if m := _MESH_GROUPS.search(attrs):  # mesh['axis_0'=a,...], device_ids=([..]T(..)) {axes}
        sizes = [int(a.split("=")[1]) for a in m.group(1).split(",")]
        ids = np.arange(int(np.prod(sizes)))
        if m.group(2):
            ids = ids.reshape([int(d) for d in m.group(2).split(",")])
            if m.group(3):
                ids = ids.transpose([int(d) for d in m.group(3).split(",")])
        ids = ids.reshape(sizes)
        picked = [int(a.strip().strip("'").removeprefix("axis_")) for a in m.group(4).split(",")]
        rest = [d for d in range(len(sizes)) if d not in picked]
        groups = ids.transpose(rest + picked).reshape(-1, int(np.prod([sizes[d] for d in picked])))
        groups = groups.tolist()
    elif m := _IOTA_GROUPS.search(attrs):
        shape = [int(d) for d in m.group(1).split(",")]
        ids = np.arange(int(np.prod(shape)))
        reshape = [int(d) for d in m.group(2).split(",")]
        ids = ids.reshape(reshape)
        if m.group(3):
            ids = ids.transpose([int(d) for d in m.group(3).split(",")])
        groups = ids.reshape(shape).tolist()
    elif m := _LIST_GROUPS.search(attrs):
        groups = [[int(i) for i in g.split(",") if i] for g in re.findall(r"\{([\d,]*)\}", m[1])]
        if not any(groups):  # {} means one group of every device
            groups = [list(range(int(np.prod(dims))))]
    else:
        return None
    varied = set()
    for g in groups:
        coords = np.array(np.unravel_index(np.asarray(g), dims))  # (mesh rank, group size)
        varied |= {names[a] for a in range(len(dims)) if len(set(coords[a])) > 1}
    return tuple(n for n in names if n in varied)


def collectives(hlo_text: str, mesh_shape: dict[str, int] | None = None) -> list[Collective]:
    """Every collective in compiled (SPMD-partitioned) HLO text, e.g. ``jax.jit(f).lower(*args)
    .compile().as_text()``; a combined (tuple-shaped) collective gives one entry per component.
    With ``mesh_shape`` (``dict(mesh.shape)``, devices in the mesh's order), ``axes`` names the
    mesh axes its device groups span."""
    out = []
    for m in _COLLECTIVE.finditer(hlo_text):
        attrs = m.group(3)
        axes = _group_axes(attrs, mesh_shape)
        src = s.group(1) if (s := _OP_NAME.search(attrs)) else "?"
        for dims in _SHAPE.findall(m.group(1)):
            shape = tuple(int(d) for d in dims.split(",") if d)
            out.append(Collective(m.group(2), shape, axes, src))
    return out


def big_collectives(
    hlo_text: str,
    mesh_shape: dict[str, int] | None = None,
    *,
    max_elements: int = 8,
    reduce_over: tuple[str, ...] = (),
) -> list[Collective]:
    """The collectives a sharded merge must not run: any with more than ``max_elements``
    elements, except all-reduces and reduce-scatters whose groups span only the mesh axes in
    ``reduce_over`` (e.g. ``("data",)`` for curvature sums over examples)."""
    return [
        c
        for c in collectives(hlo_text, mesh_shape)
        if int(np.prod(c.shape)) > max_elements
        and not (
            c.op in ("all-reduce", "reduce-scatter")
            and c.axes is not None
            and set(c.axes) <= set(reduce_over)
        )
    ]


def assert_only_scalar_collectives(hlo_text: str, max_elements: int = 8) -> None:
    big = big_collectives(hlo_text, max_elements=max_elements)
    assert not big, f"parameter-sized collectives in the compiled HLO: {big}"
