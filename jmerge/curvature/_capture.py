"""Find the parameter-consuming layers of a model in its traced program, and capture them.

Per-example curvature (diagonal Fisher, RegMean Gram matrices, K-FAC factors) needs, for every
layer ``k`` that consumes a parameter ``w``, two per-example quantities:

* ``a_k``: the layer's non-parameter operand(s) (the input of a Dense/Conv layer, the token ids
  of an Embed lookup, the normalised activation multiplied by a LayerNorm scale), and
* ``g_k = ∂ ⟨c, f(θ, x_n)⟩ / ∂ z_k``: the gradient of the output, contracted with a cotangent
  ``c``, with respect to the layer's output ``z_k = op_k(a_k, w)``.

Then the per-example gradient of ``⟨c, f⟩`` with respect to ``w`` is the pullback of ``g_k``
through ``op_k`` with ``a_k`` held fixed, summed over the layers that consume ``w``:

    ∇_w ⟨c, f(θ, x_n)⟩ = Σ_{k consumes w} h_kᵀ ( ∂ op_k(a_k, v) / ∂ v |_{v = h_k(w)} )ᵀ g_k     (1)

where ``h_k`` is the chain of *views* (dtype conversion, reshape, broadcast, transpose, static
slice) that turns the leaf into the operand of ``op_k``. This is the chain rule: a layer whose
input ``a_k`` itself depends on ``w`` (weight tying) contributes through its own term.

How the layers are found: the model is traced *per example*,
``f1(leaves, x_n) = fn(unflatten(leaves), x_n[None])[0]`` (the model sees a batch of one), with
``jax.make_jaxpr``, and the program is scanned like kfac-jax's graph matcher, so that Flax linen,
Flax NNX (through ``nnx.split``/``nnx.merge``) and plain ``jnp`` models are handled by one
mechanism. A variable is a *view* of leaf ``i`` if it is the leaf's input variable or the output
of a view primitive applied to a view. A *consumer* is an equation with exactly one view operand
whose primitive is ``dot_general``, ``conv_general_dilated``, ``gather`` (operand is the view),
``mul``, ``add`` or ``sub``. The scan recurses into ``jit`` / ``closed_call`` / ``remat``
sub-programs. Any other use of a view (it enters another primitive such as ``custom_jvp_call``,
``sin``, a ``dot_general`` with two parameter operands, a ``scan`` body, or is returned) marks
that leaf as *unmatched*; callers fall back to generic per-example gradients for such leaves.

The captured program is evaluated by a small interpreter, :meth:`LayerGraph.run`, that binds
every equation as ``jax.core.eval_jaxpr`` does, inlines the sub-programs that contain consumers,
adds a zero perturbation ``p_k`` to every consumer's output and records ``a_k``; then
``g_k = ∂⟨c, f⟩/∂p_k`` by ``jax.vjp`` with respect to the perturbations only. The backward pass
therefore never forms the parameter gradient: it propagates through activations only, and the
per-layer quantities are assembled afterwards (``fisher_diag``'s fast path, Gram matrices,
K-FAC factors).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core

__all__ = ["LayerInfo", "LayerGraph", "Captured", "find_layers", "capture"]

PyTree = Any

# Primitives whose output is a re-indexing of their single operand: the transpose of each is a
# re-indexing too (no sums), except an expanding broadcast (tracked via `_View.expanding`).
_VIEW_PRIMITIVES = frozenset(
    {
        "convert_element_type",
        "reshape",
        "broadcast_in_dim",
        "squeeze",
        "expand_dims",
        "transpose",
        "copy",
        "copy_p",
        "slice",
        "rev",
        "reduce_precision",
    }
)
# Call-like primitives whose body is scanned (and inlined when it holds a consumer): name -> the
# parameter holding the sub-program.
_CALL_PRIMITIVES = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}
_BILINEAR = frozenset({"dot_general", "conv_general_dilated"})
_ELEMENTWISE = frozenset({"mul", "add", "sub"})
_DTYPE_ONLY = frozenset({"convert_element_type", "reduce_precision"})


@dataclasses.dataclass(frozen=True)
class _ViewOp:
    primitive: Any
    params: dict
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _View:
    """Leaf ``leaf`` seen through the chain ``ops`` (the function ``h`` of eq. (1))."""

    leaf: int
    ops: tuple[_ViewOp, ...] = ()

    def then(self, eqn: Any) -> _View:
        op = _ViewOp(
            eqn.primitive,
            dict(eqn.primitive.get_bind_params(eqn.params)),
            tuple(eqn.invars[0].aval.shape),
            tuple(eqn.outvars[0].aval.shape),
        )
        return _View(self.leaf, (*self.ops, op))

    @property
    def expanding(self) -> bool:
        """True if some op replicates entries (its transpose sums): squaring does not commute."""
        return any(math.prod(op.out_shape) > math.prod(op.in_shape) for op in self.ops)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(op.primitive.name for op in self.ops)

    def apply(self, x: jax.Array, *, drop_converts: bool = False) -> jax.Array:
        for op in self.ops:
            if drop_converts and op.primitive.name in _DTYPE_ONLY:
                continue
            x = op.primitive.bind(x, **op.params)
        return x


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One parameter-consuming equation of the traced per-example program.

    Attributes:
      index: position in :attr:`LayerGraph.layers` (and in the captured lists).
      leaf_index: index of the consumed leaf in ``jax.tree_util.tree_leaves(params)``.
      path: ``jax.tree_util.keystr`` path of that leaf.
      primitive: ``"dot_general"``, ``"conv_general_dilated"``, ``"gather"``, ``"mul"``,
        ``"add"`` or ``"sub"``.
      params: the equation's primitive parameters (dimension numbers, strides, ...).
      param_operand: which operand of the equation is the parameter view.
      operand_shapes: per-example shapes of the other operands (what :func:`capture` records;
        they include the model's batch axis of size one).
      out_shape: per-example shape of the equation's output.
      view: names of the view primitives from the leaf to the operand.
      foldable: ``True`` if the per-example gradient of this layer is an entrywise product of
        one entry of ``a`` and one of ``g`` (a Dense layer applied to one token, a bias, an
        elementwise scale): then ``Σ_n (∇_w)² = pullback(Σ over n of a_n², g_n²)``, one
        contraction over the example axis.
    """

    index: int
    leaf_index: int
    path: str
    primitive: str
    params: dict
    param_operand: int
    operand_shapes: tuple[tuple[int, ...], ...]
    out_shape: tuple[int, ...]
    view: tuple[str, ...]
    foldable: bool
    location: tuple[int, ...] = dataclasses.field(repr=False, default=())
    _view: _View | None = dataclasses.field(repr=False, default=None, compare=False)

    @property
    def out_size(self) -> int:
        return math.prod(self.out_shape)


class Captured(NamedTuple):
    """What :func:`capture` returns; every array has a leading example axis ``N``.

    The per-layer tuples follow the order of ``find_layers(fn, params, inputs).layers``.

    Attributes:
      outputs: ``fn``'s per-example outputs, stacked: ``(N, *out)`` (the model's batch axis of
        one removed).
      inputs: per layer, the tuple of its non-parameter operands, each ``(N, *operand_shape)``.
      grads: per layer, ``g_k`` of shape ``(N, *out_shape)``, or ``None`` if no cotangent was
        given.
    """

    outputs: PyTree
    inputs: tuple[tuple[jax.Array, ...], ...]
    grads: tuple[jax.Array, ...] | None


def _sub_program(eqn: Any) -> tuple[Any, list] | None:
    key = _CALL_PRIMITIVES.get(eqn.primitive.name)
    if key is None or key not in eqn.params:
        return None
    sub = eqn.params[key]
    if isinstance(sub, jex_core.ClosedJaxpr):
        return sub.jaxpr, list(sub.consts)
    if isinstance(sub, jex_core.Jaxpr) and not sub.constvars:
        return sub, []
    return None


def _is_var(v: Any) -> bool:
    return isinstance(v, jex_core.Var) and not isinstance(v, jex_core.DropVar)


def _dot_foldable(eqn: Any, pos: int) -> bool:
    """Per-example weight gradient of a dot is an outer product (no sum over positions)."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    act = 1 - pos
    contract, batch = (lc, lb) if act == 0 else (rc, rb)
    shape = eqn.invars[act].aval.shape
    free = [d for d in range(len(shape)) if d not in contract and d not in batch]
    return math.prod(shape[d] for d in free) == 1


def _gather_is_row_take(eqn: Any, pos: int) -> bool:
    """``gather`` that takes whole rows ``table[ids]`` along axis 0 (``jnp.take``, Embed)."""
    if pos != 0:
        return False
    dn = eqn.params["dimension_numbers"]
    op_shape = tuple(eqn.invars[0].aval.shape)
    idx_shape = tuple(eqn.invars[1].aval.shape)
    out_ndim = len(eqn.outvars[0].aval.shape)
    rest = op_shape[1:]
    return (
        len(op_shape) >= 1
        and tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and tuple(getattr(dn, "operand_batching_dims", ())) == ()
        and tuple(dn.offset_dims) == tuple(range(out_ndim - len(rest), out_ndim))
        and tuple(eqn.params["slice_sizes"]) == (1, *rest)
        and len(idx_shape) >= 1
        and idx_shape[-1] == 1
    )


class _Consumer(NamedTuple):
    location: tuple[int, ...]
    eqn: Any
    pos: int
    view: _View


class _Scanner:
    """Walks a jaxpr, tracking parameter views, and records consumers and unmatched uses."""

    def __init__(self) -> None:
        self.consumers: list[_Consumer] = []
        self.unmatched: dict[int, str] = {}

    def visit(
        self, jaxpr: Any, views: dict[Any, _View], location: tuple[int, ...]
    ) -> list[_View | None]:
        for idx, eqn in enumerate(jaxpr.eqns):
            in_views = [views.get(v) if _is_var(v) else None for v in eqn.invars]
            hits = [(j, vw) for j, vw in enumerate(in_views) if vw is not None]
            if not hits:
                continue
            name = eqn.primitive.name
            sub = _sub_program(eqn)
            if sub is not None:
                sub_jaxpr, _ = sub
                sub_views = {
                    iv: vw for iv, vw in zip(sub_jaxpr.invars, in_views, strict=True) if vw
                }
                outs = self.visit(sub_jaxpr, sub_views, (*location, idx))
                for ov, vw in zip(eqn.outvars, outs, strict=True):
                    if vw is not None and _is_var(ov):
                        views[ov] = vw
                continue
            if name in _VIEW_PRIMITIVES and len(eqn.invars) == 1 and len(eqn.outvars) == 1:
                views[eqn.outvars[0]] = hits[0][1].then(eqn)
                continue
            if len(hits) == 1 and len(eqn.invars) == 2:
                pos, vw = hits[0]
                if name in _BILINEAR or name in _ELEMENTWISE or (name == "gather" and pos == 0):
                    self.consumers.append(_Consumer((*location, idx), eqn, pos, vw))
                    continue
            for _, vw in hits:
                self.unmatched.setdefault(vw.leaf, name)
        return [views.get(v) if _is_var(v) else None for v in jaxpr.outvars]


class LayerGraph:
    """The consumers of the parameters of ``fn`` in its per-example program, and an interpreter.

    Build it with :func:`find_layers`. ``layers`` lists the matched consumers; ``unmatched``
    maps a leaf index to the primitive of its first unmatched use (those leaves have no entry
    in ``layers``); ``unused`` lists the indices of leaves that do not reach the output.
    ``rule[i]`` says how ``fisher_diag`` treats leaf ``i``: ``"fold"`` (one foldable
    consumer), ``"rows"`` (one row-take ``gather``), ``"pullback"`` (per-example pullbacks),
    ``"generic"`` (unmatched) or ``"unused"``.
    """

    def __init__(self, fn: Callable, params: PyTree, example: PyTree) -> None:
        leaves, self.treedef = jax.tree_util.tree_flatten(params)
        self.leaf_paths = tuple(
            jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
        )
        self.leaf_specs = tuple(
            jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves
        )
        x_spec = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), example
        )
        self.fn = fn
        self.per_example = per_example_fn(fn, self.treedef)
        closed, out_shape = jax.make_jaxpr(self.per_example, return_shape=True)(
            list(self.leaf_specs), x_spec
        )
        self.closed_jaxpr = closed
        self.out_tree = jax.tree_util.tree_structure(out_shape)
        self.out_shape = out_shape
        jaxpr = closed.jaxpr
        n = len(leaves)
        scanner = _Scanner()
        top_views = {v: _View(i) for i, v in enumerate(jaxpr.invars[:n])}
        for vw in scanner.visit(jaxpr, top_views, ()):
            if vw is not None:
                scanner.unmatched.setdefault(vw.leaf, "output")
        self.unmatched: dict[int, str] = dict(scanner.unmatched)
        kept = [c for c in scanner.consumers if c.view.leaf not in self.unmatched]
        per_leaf: dict[int, list[int]] = {}
        for k, c in enumerate(kept):
            per_leaf.setdefault(c.view.leaf, []).append(k)
        layers = []
        for k, c in enumerate(kept):
            eqn, pos, vw = c.eqn, c.pos, c.view
            name = eqn.primitive.name
            out_shape_k = tuple(eqn.outvars[0].aval.shape)
            alone = len(per_leaf[vw.leaf]) == 1
            if name == "dot_general":
                foldable = _dot_foldable(eqn, pos)
            elif name in _ELEMENTWISE:
                foldable = tuple(eqn.invars[pos].aval.shape) == out_shape_k
            else:
                foldable = False
            layers.append(
                LayerInfo(
                    index=k,
                    leaf_index=vw.leaf,
                    path=self.leaf_paths[vw.leaf],
                    primitive=name,
                    params=dict(eqn.params),
                    param_operand=pos,
                    operand_shapes=tuple(
                        tuple(v.aval.shape) for j, v in enumerate(eqn.invars) if j != pos
                    ),
                    out_shape=out_shape_k,
                    view=vw.names,
                    foldable=bool(foldable and alone and not vw.expanding),
                    location=c.location,
                    _view=vw,
                )
            )
        self.layers: tuple[LayerInfo, ...] = tuple(layers)
        self._eqns = {c.location: (k, c.eqn) for k, c in enumerate(kept)}
        self._by_location = {c.location: k for k, c in enumerate(kept)}
        self._inline = {c.location[:j] for c in kept for j in range(1, len(c.location))}
        self.consumers_of: dict[int, tuple[int, ...]] = {i: tuple(ks) for i, ks in per_leaf.items()}
        self.unused = tuple(i for i in range(n) if i not in per_leaf and i not in self.unmatched)
        rule = {}
        for i in range(n):
            if i in self.unmatched:
                rule[i] = "generic"
            elif i not in per_leaf:
                rule[i] = "unused"
            elif len(per_leaf[i]) == 1 and self.layers[per_leaf[i][0]].foldable:
                rule[i] = "fold"
            elif len(per_leaf[i]) == 1 and self._is_rows(per_leaf[i][0]):
                rule[i] = "rows"
            else:
                rule[i] = "pullback"
        self.rule: dict[int, str] = rule

    def _is_rows(self, k: int) -> bool:
        lay = self.layers[k]
        if lay.primitive != "gather":
            return False
        _, eqn = self._eqns[lay.location]
        return all(n in _DTYPE_ONLY for n in lay.view) and _gather_is_row_take(eqn, 0)

    # ----------------------------------------------------------------- interpreter

    def pert_specs(self) -> list[jax.ShapeDtypeStruct]:
        """Shape and dtype of each consumer's per-example output (of its perturbation)."""
        return [
            jax.ShapeDtypeStruct(
                self._eqns[lay.location][1].outvars[0].aval.shape,
                self._eqns[lay.location][1].outvars[0].aval.dtype,
            )
            for lay in self.layers
        ]

    def zero_perts(self) -> list[jax.Array]:
        return [jnp.zeros(s.shape, s.dtype) for s in self.pert_specs()]

    def run(
        self, leaves: Sequence[jax.Array], x_n: PyTree, perts: Sequence[jax.Array]
    ) -> tuple[PyTree, list[tuple[jax.Array, ...]]]:
        """Evaluate the per-example program: ``(f1(leaves, x_n), [a_k for each layer])``.

        ``z_k + perts[k]`` replaces each consumer's output ``z_k``, so that
        ``∂ out / ∂ perts[k]`` is the gradient with respect to that layer's output.
        """
        captured: list[Any] = [None] * len(self.layers)
        args = [*leaves, *jax.tree_util.tree_leaves(x_n)]
        outs = self._eval(
            self.closed_jaxpr.jaxpr, self.closed_jaxpr.consts, args, perts, captured, ()
        )
        return jax.tree_util.tree_unflatten(self.out_tree, outs), captured

    def _eval(self, jaxpr, consts, args, perts, captured, location):
        env: dict[Any, Any] = {}

        def read(v):
            return v.val if isinstance(v, jex_core.Literal) else env[v]

        for v, x in zip(jaxpr.constvars, consts, strict=True):
            env[v] = x
        for v, x in zip(jaxpr.invars, args, strict=True):
            env[v] = x
        for idx, eqn in enumerate(jaxpr.eqns):
            loc = (*location, idx)
            invals = [read(v) for v in eqn.invars]
            if loc in self._inline:
                sub_jaxpr, sub_consts = _sub_program(eqn)
                ans = self._eval(sub_jaxpr, sub_consts, invals, perts, captured, loc)
            else:
                bind_params = eqn.primitive.get_bind_params(eqn.params)
                with eqn.ctx.manager:
                    ans = eqn.primitive.bind(*invals, **bind_params)
                k = self._by_location.get(loc)
                if k is not None:
                    pos = self.layers[k].param_operand
                    captured[k] = tuple(x for j, x in enumerate(invals) if j != pos)
                    ans = ans + perts[k]
            if eqn.primitive.multiple_results:
                for v, x in zip(eqn.outvars, ans, strict=True):
                    if _is_var(v):
                        env[v] = x
            elif _is_var(eqn.outvars[0]):
                env[eqn.outvars[0]] = ans
        return [read(v) for v in jaxpr.outvars]

    def run_vjp(
        self, leaves: Sequence[jax.Array], x_n: PyTree
    ) -> tuple[PyTree, Callable, list[tuple[jax.Array, ...]]]:
        """``(out, vjp, a)``: ``vjp(c)`` returns the list of ``g_k = ∂⟨c, out⟩/∂z_k``."""
        out, vjp_fn, captured = jax.vjp(
            lambda p: self.run(leaves, x_n, p), self.zero_perts(), has_aux=True
        )
        return out, lambda c: vjp_fn(c)[0], captured

    # ----------------------------------------------------------------- per-layer pullbacks

    def _bind(self, k: int, operands: Sequence[jax.Array], params: dict | None = None):
        lay = self.layers[k]
        _, eqn = self._eqns[lay.location]
        bind_params = dict(eqn.primitive.get_bind_params(eqn.params))
        if params:
            bind_params.update(params)
        return eqn.primitive.bind(*operands, **bind_params)

    def _with_param(self, k: int, others: Sequence[jax.Array], w: jax.Array) -> list:
        ops = list(others)
        ops.insert(self.layers[k].param_operand, w)
        return ops

    def pullback(
        self, k: int, leaf: jax.Array, others: Sequence[jax.Array], g: jax.Array
    ) -> jax.Array:
        """Layer ``k``'s term of eq. (1) for one example: ``h_kᵀ (∂op_k/∂v)ᵀ g``, leaf-shaped."""
        view = self.layers[k]._view

        def f(leaf_):
            return self._bind(k, self._with_param(k, others, view.apply(leaf_)))

        return jax.vjp(f, leaf)[1](g)[0]

    def fold(
        self, k: int, leaf: jax.Array, others_sq: Sequence[jax.Array], g_sq: jax.Array
    ) -> jax.Array:
        """``Σ_n (∇_w ⟨c_n, f⟩)²`` for a foldable layer, from ``a_n²`` and ``g_n²``.

        For a foldable layer every entry of the per-example gradient is a single product
        ``a_n[i] g_n[j]``, so its square is the same pullback applied to ``a_n²`` and ``g_n²``,
        and the sum over examples is one contraction over the example axis: the pullback of
        ``v ↦ vmap_n(op_k(a_n², v))`` applied to ``G²``. ``others_sq`` and ``g_sq`` have a
        leading example axis; the computation runs in ``g_sq.dtype`` (the accumulation dtype).
        """
        lay = self.layers[k]
        acc = g_sq.dtype
        view = lay._view
        extra = {}
        if lay.primitive in _BILINEAR:
            extra["preferred_element_type"] = acc
        if lay.primitive in ("add", "sub"):
            # ∇_w = ±h_kᵀ g_n (w has the output's shape): the sign drops out of the square.
            return jax.vjp(lambda l: view.apply(l, drop_converts=True), leaf.astype(acc))[1](
                jnp.sum(g_sq, axis=0)
            )[0]

        def f(leaf_):
            w = view.apply(leaf_, drop_converts=True)
            return jax.vmap(lambda a: self._bind(k, self._with_param(k, a, w), extra))(
                tuple(others_sq)
            )

        return jax.vjp(f, leaf.astype(acc))[1](g_sq)[0]

    def rows_sq(
        self, k: int, leaf_shape: tuple[int, ...], ids: jax.Array, g_cols: jax.Array, acc: Any
    ) -> jax.Array:
        """``Σ_n Σ_c (∇_table ⟨c, f⟩)²`` for a row-take gather (Embed) without a dense table.

        Args:
          ids: ``(B, *idx_shape, 1)`` per-example token ids (the gather's index operand).
          g_cols: ``(B, C, *idx_shape, *row)`` gradients at the gathered rows, ``C`` columns.

        Per example the table gradient of row ``v`` is ``Σ_{t: id_t = v} g_t``: ids are sorted,
        equal ids summed (``segment_sum``), the sums squared, summed over columns and examples,
        and scatter-added into the table: ``O(B·C·T·row)`` instead of ``O(B·C·V·row)``.
        """
        mode = self._eqns[self.layers[k].location][1].params.get("mode")
        n_rows = leaf_shape[0]
        b, c = g_cols.shape[:2]
        ids = ids.reshape(b, -1).astype(jnp.int32)
        t = ids.shape[1]
        g_cols = g_cols.reshape(b, c, t, -1).astype(acc)
        if mode is not None and "CLIP" in str(mode):
            ids = jnp.clip(ids, 0, n_rows - 1)

        def one(ids_n, g_n):
            order = jnp.argsort(ids_n)
            sid = ids_n[order]
            new = jnp.concatenate([jnp.ones((1,), bool), sid[1:] != sid[:-1]])
            seg = jnp.cumsum(new) - 1
            sums = jax.vmap(lambda gc: jax.ops.segment_sum(gc[order], seg, num_segments=t))(g_n)
            row = jnp.full((t,), n_rows, ids_n.dtype).at[seg].set(sid)
            return row, jnp.sum(sums**2, axis=0)

        rows, sq = jax.vmap(one)(ids, g_cols)
        table = jnp.zeros((n_rows, sq.shape[-1]), acc)
        table = table.at[rows.reshape(-1)].add(sq.reshape(b * t, -1), mode="drop")
        return table.reshape(leaf_shape)


def per_example_fn(fn: Callable, treedef: Any) -> Callable:
    """``f1(leaves, x_n) = fn(unflatten(leaves), x_n[None])[0]`` (leaves of every output)."""

    def f1(leaves, x_n):
        params = jax.tree_util.tree_unflatten(treedef, list(leaves))
        out = fn(params, jax.tree_util.tree_map(lambda a: a[None], x_n))
        return jax.tree_util.tree_map(lambda o: o[0], out)

    return f1


def _first_example(inputs: PyTree) -> PyTree:
    def spec(a):
        shape = jnp.shape(a)
        if len(shape) == 0:
            raise ValueError("inputs must have a leading example axis; got a scalar leaf.")
        return jax.ShapeDtypeStruct(shape[1:], jnp.result_type(a))

    return jax.tree_util.tree_map(spec, inputs)


def find_layers(fn: Callable, params: PyTree, inputs: PyTree) -> LayerGraph:
    """Trace ``fn(params, x)`` for one example and find its parameter-consuming layers.

    Args:
      fn: ``fn(params, x) -> output``, ``x`` a batch (leading example axis).
      params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
      inputs: a batch of inputs with a leading example axis ``N`` (only the shape and dtype of
        one example are used).

    Returns:
      A :class:`LayerGraph`; ``graph.layers`` is the list of :class:`LayerInfo`.
    """
    return LayerGraph(fn, params, _first_example(inputs))


def capture(
    fn: Callable,
    params: PyTree,
    inputs: PyTree,
    cotangent_fn: Callable[..., PyTree] | None = None,
    aux: PyTree = None,
    *,
    graph: LayerGraph | None = None,
) -> Captured:
    """Per-example layer inputs ``a_k`` and output gradients ``g_k`` of ``fn``.

    For each example ``n`` and each layer ``k`` found by :func:`find_layers`:

        a_k[n] = the non-parameter operands of layer k on example n,
        g_k[n] = ∂ ⟨c_n, f1(θ, x_n)⟩ / ∂ z_k,   c_n = cotangent_fn(f1(θ, x_n)[, aux[n]]),

    where ``f1`` is ``fn`` on the one-example batch ``x_n[None]`` with that axis removed. RegMean
    uses ``Σ_n a_nᵀ a_n`` of Dense inputs; K-FAC uses ``Σ_n a_nᵀ a_n`` and ``Σ_n g_nᵀ g_n``
    with ``c_n = e_y − softmax(logits)``, ``y`` sampled. The cotangent is not differentiated.

    Args:
      fn: ``fn(params, x) -> output``.
      params: parameter pytree.
      inputs: batch with a leading example axis ``N`` (array or pytree of arrays).
      cotangent_fn: ``(output_n[, aux_n]) -> cotangent_n`` (shaped like ``output_n``), or None to
        capture the forward quantities only (``grads`` is then ``None``).
      aux: optional pytree with a leading axis ``N`` passed to ``cotangent_fn`` (labels, keys).
      graph: a :class:`LayerGraph` from :func:`find_layers` to reuse.

    Returns:
      :class:`Captured` with leading example axis ``N``; all ``N`` examples are processed at
      once (chunk the batch yourself to bound memory). Works under ``jax.jit``.
    """
    graph = graph if graph is not None else find_layers(fn, params, inputs)
    leaves = jax.tree_util.tree_leaves(params)

    def one(x_n, aux_n):
        if cotangent_fn is None:
            out, a = graph.run(leaves, x_n, graph.zero_perts())
            return out, a, None
        out, vjp, a = graph.run_vjp(leaves, x_n)
        c = cotangent_fn(out) if aux is None else cotangent_fn(out, aux_n)
        c = jax.tree_util.tree_map(lax.stop_gradient, c)
        return out, a, vjp(c)

    outs, a, g = jax.vmap(one)(inputs, aux)
    grads = None if g is None else tuple(g)
    return Captured(outs, tuple(tuple(x) for x in a), grads)
