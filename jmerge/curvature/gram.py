r"""RegMean input Gram matrices and K-FAC factors of the Dense layers of a model.

Both are assembled from the per-example layer inputs ``a`` (and, for K-FAC, output gradients
``g``) that :mod:`jmerge.curvature._capture` records in the traced per-example program, so
Flax linen, Flax NNX and plain ``jnp`` models are handled by one mechanism.

**Dense-like layer.** A ``dot_general`` whose parameter operand is a kernel leaf ``W`` of shape
``(*in_dims, *out_dims)`` seen through order-preserving views only (dtype casts, reshapes,
squeeze/expand_dims), whose contracting dims are the kernel's *leading* dims ``in_dims`` (in
order) and which has no batch dims: ``z = a · W`` contracting the input's dims with ``in_dims``.
This covers ``nn.Dense``, ``nn.DenseGeneral`` (attention projections included), ``nnx.Linear``,
``nnx.LinearGeneral``, ``x @ W`` and ``jnp.dot``. Per example the input is flattened to
``R`` rows ("tokens": every free dim of the input, e.g. sequence positions) of
``d_in = prod(in_dims)`` entries, the output gradient to ``R`` rows of ``d_out = prod(out_dims)``.
A kernel read through a transpose (``x @ W.T``, a PyTorch-style ``(d_out, d_in)`` layout), a
batched ``dot_general`` (per-head weights), convolutions (``nn.Conv``), embedding lookups
(``nn.Embed``, ``gather``), biases and elementwise scales are **not** Dense-like: they get no
block and are treated by the returned operator as ``rest · I`` (RegMean itself averages them).
:func:`layer_report` says, for every leaf, whether it got a block and if not, why.

**Tied weights.** A kernel consumed by several Dense-like layers (the same ``W`` applied twice)
has no RegMean Gram of its own. ``tied="error"`` (default) raises; ``tied="sum"`` treats the
layers' rows as extra tokens: ``G = Σ_l X_lᵀ X_l`` (the Hessian of the summed local regressions
``Σ_l ‖X_l W − X_l W_t‖²``) and the K-FAC-expand factors over the union of the rows;
``tied="skip"`` leaves the kernel out (it gets ``rest``). A kernel that is also consumed by a
layer that is not Dense-like (a tied embedding read by a ``gather`` and by a transposed dot) is
always left out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jmerge.curvature._capture import LayerGraph, LayerInfo, capture, find_layers
from jmerge.curvature._data import (
    check_batch_size,
    check_callable,
    check_kind,
    check_labels_range,
    check_logits,
    check_option,
    chunk_examples,
    chunk_size,
    chunked,
    labels_in_range,
    layer_grads,
    num_examples,
    placed_shardings,
    probe,
    scan_sum,
)
from jmerge.curvature.operators import KFAC, BlockGram
from jmerge.sharding import on_auto_axes
from jmerge.tree import compute_dtype, runtime_check_finite

__all__ = ["gram", "kfac_factors", "layer_report", "NORMALIZE", "TIED"]

PyTree = Any

NORMALIZE = ("sum", "mean")
TIED = ("error", "sum", "skip")

# View primitives that keep the row-major order of the leaf's entries: with the kernel's
# contracting dims leading, ``operand.reshape(d_in, -1) == leaf.reshape(d_in, -1)``.
_ORDER_PRESERVING = frozenset(
    {
        "convert_element_type",
        "reduce_precision",
        "reshape",
        "squeeze",
        "expand_dims",
        "copy",
        "copy_p",
    }
)
_HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class _Dense:
    """How to read one Dense-like layer's captured input and output gradient as rows."""

    layer: int  # index into graph.layers
    act_order: tuple[int, ...]  # input dims: free dims, then contracted dims in kernel order
    out_order: tuple[int, ...]  # output dims: the input's free dims, then the kernel's out dims
    d_in: int
    d_out: int
    rows: int  # R: rows per example (product of the input's free dims)


def _dense_spec(graph: LayerGraph, lay: LayerInfo) -> _Dense | str:
    """The :class:`_Dense` reading of layer ``lay``, or why it is not Dense-like."""
    if lay.primitive == "conv_general_dilated":
        return "convolution (no RegMean Gram / K-FAC block for Conv layers)"
    if lay.primitive == "gather":
        return "gather (embedding lookup: not a linear layer on its input)"
    if lay.primitive != "dot_general":
        return f"{lay.primitive} (bias / elementwise parameter, not a Dense kernel)"
    (lc, rc), (lb, rb) = lay.params["dimension_numbers"]
    if lb or rb:
        return "dot_general with batch dims (per-group weights), not a Dense kernel"
    bad_view = [v for v in lay.view if v not in _ORDER_PRESERVING]
    if bad_view:
        return (
            f"kernel read through {', '.join(bad_view)} (e.g. x @ W.T), not a (d_in, d_out) kernel"
        )
    pos = lay.param_operand
    pc, ac = (rc, lc) if pos == 1 else (lc, rc)
    pairs = sorted(zip(pc, ac, strict=True))
    if tuple(p for p, _ in pairs) != tuple(range(len(pc))):
        return (
            "kernel contracted on dims "
            f"{tuple(pc)}, not its leading dims (layout (*out_dims, *in_dims)?)"
        )
    (a_shape,) = lay.operand_shapes
    contract = tuple(a for _, a in pairs)
    free = tuple(d for d in range(len(a_shape)) if d not in contract)
    d_in = math.prod(a_shape[d] for d in contract)
    leaf_shape = graph.leaf_specs[lay.leaf_index].shape
    size = math.prod(leaf_shape)
    if d_in not in [math.prod(leaf_shape[:k]) for k in range(len(leaf_shape) + 1)]:
        return f"contracted size {d_in} is not a product of the leading dims of {leaf_shape}"
    n_free, n_pfree = len(free), len(lay.out_shape) - len(free)
    if pos == 1:
        out_order = tuple(range(len(lay.out_shape)))
    else:
        out_order = (*range(n_pfree, n_pfree + n_free), *range(n_pfree))
    return _Dense(
        layer=lay.index,
        act_order=(*free, *contract),
        out_order=out_order,
        d_in=d_in,
        d_out=size // d_in,
        rows=math.prod(a_shape[d] for d in free),
    )


def _classify(graph: LayerGraph) -> tuple[dict[int, list[_Dense]], dict[str, str]]:
    """``({leaf index: Dense specs of its consumers}, {path: description})`` for every leaf.

    A leaf is a candidate iff all of its consumers are Dense-like with one ``d_in``; the
    candidates with several consumers are the tied kernels (the tied policy is applied later).
    """
    dense: dict[int, list[_Dense]] = {}
    report: dict[str, str] = {}
    for i, path in enumerate(graph.leaf_paths):
        if i in graph.unmatched:
            report[path] = f"skipped: used by `{graph.unmatched[i]}`, which is not a layer"
            continue
        ks = graph.consumers_of.get(i, ())
        if not ks:
            report[path] = "skipped: does not reach the output"
            continue
        specs = [_dense_spec(graph, graph.layers[k]) for k in ks]
        reasons = sorted({s for s in specs if isinstance(s, str)})
        if reasons:
            report[path] = "skipped: " + "; ".join(reasons)
            continue
        if len({s.d_in for s in specs}) > 1:
            report[path] = "skipped: consumed by Dense layers with different input splits"
            continue
        dense[i] = specs
        s = specs[0]
        rows = sum(x.rows for x in specs)
        tie = f", tied: {len(specs)} layers" if len(specs) > 1 else ""
        report[path] = f"dense: d_in={s.d_in}, d_out={s.d_out}, rows/example={rows}{tie}"
    return dense, report


def _select(graph: LayerGraph, tied: str, who: str) -> dict[int, list[_Dense]]:
    dense, _ = _classify(graph)
    multi = {i: s for i, s in dense.items() if len(s) > 1}
    if multi and tied == "error":
        names = ", ".join(
            f"params{graph.leaf_paths[i]} ({len(s)} layers)" for i, s in multi.items()
        )
        raise ValueError(
            f"{who}: kernel(s) {names} are consumed by more than one Dense layer (tied weights); "
            "RegMean / K-FAC define one block per layer. Pass tied='sum' to pool the layers' "
            "inputs as extra rows (G = Σ_l X_lᵀX_l, the minimiser of Σ_l ‖X_l W − X_l W_t‖²) "
            "or tied='skip' to leave the kernel out (it then gets `rest`)."
        )
    if tied == "skip":
        dense = {i: s for i, s in dense.items() if len(s) == 1}
    return dense


def layer_report(fn: Callable, params: PyTree, inputs: PyTree) -> dict[str, str]:
    """For every leaf of ``params`` (``keystr`` path), whether :func:`gram` / :func:`kfac_factors`
    give it a block (``"dense: d_in=…, d_out=…, rows/example=…"``) or why not (``"skipped: …"``).

    ``inputs`` is a batch (leading example axis); only one example's shape is used.
    """
    return _classify(find_layers(fn, params, inputs))[1]


# --------------------------------------------------------------------------------- helpers


def _rows(x: jax.Array, order: tuple[int, ...], width: int, dtype: Any) -> jax.Array:
    """Per-example ``x`` ``(B, *shape)`` -> ``(B, R, width)`` with the dims ``order``-ed."""
    x = jnp.transpose(x, (0, *(1 + d for d in order)))
    return x.reshape(x.shape[0], -1, width).astype(dtype)


def _outer_sum(x: jax.Array) -> jax.Array:
    """``Σ_rows x_r x_rᵀ`` for ``x`` of shape ``(..., d)``, in full precision."""
    x = x.reshape(-1, x.shape[-1])
    return jnp.einsum("ri,rj->ij", x, x, precision=_HIGHEST)


def _axis_entry(entries: tuple) -> Any:
    """The mesh axes of the flattened dims whose spec entries are ``entries``: the entry of a
    single dim, None if no dim is sharded; ``False`` if several dims are (no layout for the
    flattened axis)."""
    if len(entries) == 1:
        return entries[0]
    return None if all(e is None for e in entries) else False


def _factor_sharding(kernel: NamedSharding | None, d_in: int, side: str, shape) -> Any:
    """The sharding of a ``(d, d)`` factor of a kernel placed by ``kernel``: ``side="in"``
    (a Gram, K-FAC's A: columns sharded like the kernel's input axis, ``P(None, s_in)``) or
    ``"out"`` (K-FAC's B: rows sharded like its output axis, ``P(s_out, None)``). With these,
    ``G W`` and ``A W B`` contract each sharded axis locally (partial sums, then a reduction)
    and need no gather of the kernel; a kernel sharded on its output axis only gets a
    replicated Gram / A, and every mat-vec with it is local. Replicated when the kernel's
    flattened axis has no single layout (several of its dims sharded). None when ``kernel`` is.
    """
    if kernel is None:
        return None
    spec = tuple(kernel.spec) + (None,) * (len(shape) - len(kernel.spec))
    k = next(j for j in range(len(shape) + 1) if math.prod(shape[:j]) == d_in)
    entry = _axis_entry(spec[:k] if side == "in" else spec[k:])
    if entry is False:
        entry = None
    pspec = PartitionSpec(None, entry) if side == "in" else PartitionSpec(entry, None)
    return NamedSharding(kernel.mesh, pspec)


def _constrain(x: jax.Array, sharding: Any) -> jax.Array:
    return x if sharding is None else lax.with_sharding_constraint(x, sharding)


def _rows_layout(shardings: tuple | None) -> Any:
    """The layout of the ``(B, R, d)`` rows of a layer's inputs (or output gradients) that
    :func:`_outer_sum` contracts: the feature axis whole on every device, the example axes
    left to XLA (they stay sharded over the data axis). ``Σ_rows x xᵀ`` is then a local
    matmul per data shard followed by a reduction over the data axis; without it XLA computes
    row blocks of the ``(d, d)`` sum and all-gathers the result over the model axis.

    On the parameters' mesh (eager call), or the context mesh of ``jax.set_mesh`` under an
    outer ``jit``; None (no constraint) without a mesh or with Explicit axes (whose types
    carry the layout)."""
    u = PartitionSpec.UNCONSTRAINED
    spec = PartitionSpec(u, u, None)
    if shardings is not None:
        return NamedSharding(shardings[0].mesh, spec)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or any(t != AxisType.Auto for t in mesh.axis_types):
        return None
    return spec


# ------------------------------------------------------------------------------------ gram


def gram(
    apply_fn: Callable[[chex.ArrayTree, chex.ArrayTree], Any],
    params: chex.ArrayTree,
    inputs: chex.ArrayTree,
    *,
    batch_size: int | None = None,
    normalize: str = "sum",
    tied: str = "error",
    rest: Any = 1.0,
) -> BlockGram:
    r"""RegMean input Gram matrices of every Dense-like kernel, as a :class:`BlockGram`.

    For a Dense-like kernel ``W`` of shape ``(*in_dims, *out_dims)`` (see the module docstring)
    whose layer sees, on example ``n``, the input rows ``a_{n,r} ∈ R^{d_in}`` (``r`` over the
    ``R`` tokens / positions of the example; ``R = 1`` for a plain feature vector;
    ``d_in = prod(in_dims)``, entries in the kernel's row-major order):

        G = Σ_n Σ_r a_{n,r} a_{n,r}ᵀ = XᵀX      (normalize="sum", default; RegMean's Gram)
        G = (1/N) XᵀX                          (normalize="mean": mean over examples, tokens
                                                 still summed)

    with ``X`` the ``(N·R, d_in)`` matrix of all rows (Jin et al. 2023, "Dataless knowledge
    fusion by merging weights of language models", eq. 2). RegMean weighs tasks by their Gram,
    so ``"sum"`` gives a task with more data more weight; ``"mean"`` does not.

    Only Dense-like kernels get a Gram: Conv kernels, Embed tables, biases, norm scales and
    kernels read through a transpose are not part of RegMean and get ``rest · I`` in the
    returned operator (:func:`jmerge.merges.closed_form.regmean` averages them). The kernels
    that got a Gram are ``result.grams.keys()``; :func:`layer_report` says why the others did
    not.

    Args:
      apply_fn: ``apply_fn(params, x) -> output`` (any pytree) for a batch ``x`` with a leading
        example axis. A static argument of the internal ``jax.jit``: hashable and stable, so
        repeated calls with the same function and shapes compile once (a new ``lambda`` per
        call recompiles). The model must treat examples independently (no batch statistics):
        inputs are captured on the one-example batch ``x_n[None]``.
      params: the parameter pytree (Flax NNX: the state of ``nnx.split``, with
        ``apply_fn = lambda s, x: nnx.merge(graphdef, s)(x)``).
      inputs: array or pytree of arrays with a common leading example axis ``N``.
      batch_size: examples captured at once (chunked by ``lax.scan``; need not divide ``N``);
        None picks the largest chunk within about 2**26 captured elements.
      normalize: ``"sum"`` or ``"mean"``, above.
      tied: ``"error"`` (default), ``"sum"`` or ``"skip"`` for a kernel used by several Dense
        layers (module docstring).
      rest: the scalar of the returned :class:`BlockGram` for the leaves without a Gram.

    Returns:
      ``BlockGram({keystr path of kernel: G (d_in, d_in)}, rest)``; ``G`` in float32, or in
      the input dtype if wider.

    Raises:
      ValueError: bad ``normalize`` / ``tied`` / ``batch_size``; inputs without a common
        leading axis; ``apply_fn(params, inputs[:1])`` failing (e.g. params and inputs of
        different models); tied kernels with ``tied="error"``.
      jmerge.tree.NonFiniteError: a Gram holds NaN/Inf (non-finite inputs or activations),
        named by its path. Under ``jax.jit`` / ``jax.vmap`` the check runs in the compiled
        program (:func:`jmerge.tree.runtime_check_finite`: a ``RuntimeWarning``, a
        ``checkify`` error under ``checkify.checkify``).
    """
    check_option("normalize", normalize, NORMALIZE)
    check_option("tied", tied, TIED)
    check_callable(apply_fn, "apply_fn")
    batch_size = check_batch_size(batch_size)
    num_examples(inputs)
    grams = _gram_jit(
        params,
        inputs,
        apply_fn=apply_fn,
        normalize=normalize,
        batch_size=batch_size,
        tied=tied,
        shardings=placed_shardings(params),
    )
    runtime_check_finite(grams, name="gram")
    return BlockGram(grams, rest=rest)


def _gram_impl(params, inputs, *, apply_fn, normalize, batch_size, tied, shardings):
    n = num_examples(inputs)
    probe(apply_fn, "apply_fn", params, inputs)
    graph = find_layers(apply_fn, params, inputs)
    dense = _select(graph, tied, "gram")
    if not dense:
        return {}, {}
    layers = graph.layers
    per_ex = sum(math.prod(layers[s.layer].operand_shapes[0]) for ss in dense.values() for s in ss)
    xs, mask = chunked(inputs, n, chunk_size(batch_size, per_ex, n))

    def chunk_sum(batch):
        x, m = batch
        cap = capture(apply_fn, params, x, graph=graph)
        out = {}
        for i, ss in dense.items():
            parts = []
            for s in ss:
                (a,) = cap.inputs[s.layer]
                a = _rows(a, s.act_order, s.d_in, compute_dtype(a.dtype))
                a = _constrain(a, _rows_layout(shardings))
                parts.append(jnp.where(m[:, None, None], a, 0))
            out[i] = sum(_outer_sum(a) for a in parts)
        return out

    sums = scan_sum(chunk_sum, (xs, mask))
    scale = 1.0 / n if normalize == "mean" else 1.0
    out, specs = {}, {}
    for i, g in sums.items():
        spec = None if shardings is None else shardings[i]
        layout = _factor_sharding(spec, dense[i][0].d_in, "in", graph.leaf_specs[i].shape)
        out[graph.leaf_paths[i]] = _constrain(g * jnp.asarray(scale, g.dtype), layout)
        specs[graph.leaf_paths[i]] = PartitionSpec() if layout is None else layout.spec
    return out, specs


_gram_jit = jax.jit(
    on_auto_axes(_gram_impl),
    static_argnames=("apply_fn", "normalize", "batch_size", "tied", "shardings"),
)


# ------------------------------------------------------------------------------------ K-FAC


def kfac_factors(
    logits_fn: Callable[[chex.ArrayTree, chex.ArrayTree], jax.Array],
    params: chex.ArrayTree,
    inputs: chex.ArrayTree,
    labels: jax.Array | None = None,
    *,
    kind: str = "exact",
    key: jax.Array | None = None,
    batch_size: int | None = None,
    tied: str = "error",
    rest: Any = 1.0,
) -> KFAC:
    r"""K-FAC factors ``(A, B)`` of every Dense-like kernel, as a :class:`KFAC` operator.

    Martens & Grosse 2015 ("Optimizing neural networks with Kronecker-factored approximate
    curvature", §3): for a Dense layer ``z = aᵀW`` with ``W`` read as ``(d_in, d_out)``, the
    per-example gradient of ``log p(y|x)`` is ``∇_W = a gᵀ`` with ``g = ∂ log p(y|x)/∂z``, so
    with the row-major ``vec``, ``vec(∇_W) = a ⊗ g`` and the Fisher block of ``W`` is

        F_W = E_n E_{y~q_n}[(a aᵀ) ⊗ (g gᵀ)] ≈ A ⊗ B,   A = E_n[a aᵀ],  B = E_n E_y[g gᵀ],

    acting as ``W ↦ A W B`` (:class:`KFAC`). For one example of a non-sequence input the
    approximation is exact: ``A ⊗ B = F_W``. The distribution ``q_n`` is as in
    :func:`jmerge.curvature.fisher.fisher_diag`: the model's predictive (``kind="exact"``:
    ``E_y[g gᵀ] = Σ_k p_k g_{e_k−p} g_{e_k−p}ᵀ``, ``K`` backward passes per token), one
    sample ``y_n ~ p(y|x_n)`` from ``jax.random.split(key, N)[n]`` (``"sampled"``), or the
    given labels (``"empirical"``).

    Normalisation, with ``R`` rows (tokens / positions) per example at the layer (``R = 1``
    for a plain feature vector; see the module docstring) — the *K-FAC-expand* convention of
    Eschenhagen et al. 2023 ("Kronecker-factored approximate curvature for modern neural
    network architectures"), which treats the tokens as extra examples:

        A = 1/(N·R) Σ_n Σ_r a_{n,r} a_{n,r}ᵀ      (mean over examples *and* tokens)
        B = 1/N     Σ_n Σ_r E_y[g_{n,r} g_{n,r}ᵀ]  (mean over examples, sum over tokens)

    so ``A ⊗ B`` approximates ``(1/N) Σ_n Σ_r (a aᵀ) ⊗ (g gᵀ)``, the Fisher of the sum over
    tokens of the log-likelihood, on the same scale as ``fisher_diag`` (mean over examples).
    A tied kernel with ``tied="sum"`` pools all its layers' rows (``R`` = their total).

    Args:
      logits_fn: ``logits_fn(params, x) -> logits (B, *token_axes, K)``; static and hashable
        like :func:`gram`'s ``apply_fn``; examples must be independent.
      params, inputs, batch_size, tied, rest: as in :func:`gram`.
      labels: integer ``(N, *token_axes)``; required for ``kind="empirical"``.
      kind: ``"exact"``, ``"sampled"`` or ``"empirical"``.
      key: PRNG key; required for ``kind="sampled"``.

    Returns:
      ``KFAC({keystr path of kernel: (A (d_in, d_in), B (d_out, d_out))}, rest)``, float32 or
      wider.

    Raises:
      ValueError / TypeError: as :func:`gram`; unknown ``kind``; missing ``labels`` / ``key``;
        labels not of shape ``(N, *token_axes)`` or not integer, or (``"empirical"``) not in
        ``[0, K)``; logits not ``(1, *token_axes, K)`` floating for one example.
      jmerge.tree.NonFiniteError: a factor holds NaN/Inf, named by its path.

    Under ``jax.jit`` / ``jax.vmap`` the checks of traced values run in the compiled program
    (a ``RuntimeWarning``, a ``checkify`` error under ``checkify.checkify``), as in
    :func:`gram`; labels closed over by the jitted function are checked while it traces.
    """
    check_kind(kind, labels, key)
    check_option("tied", tied, TIED)
    check_callable(logits_fn, "logits_fn")
    batch_size = check_batch_size(batch_size)
    num_examples(inputs)
    labels = labels if kind == "empirical" else None
    factors, labels_ok = _kfac_jit(
        params,
        inputs,
        labels,
        key if kind == "sampled" else None,
        logits_fn=logits_fn,
        kind=kind,
        batch_size=batch_size,
        tied=tied,
        shardings=placed_shardings(params),
    )
    check_labels_range(labels_ok, labels, logits_fn, params, inputs)
    runtime_check_finite(factors, name="kfac_factors")
    return KFAC(factors, rest=rest)


def _kfac_impl(params, inputs, labels, key, *, logits_fn, kind, batch_size, tied, shardings):
    n = num_examples(inputs)
    logits = probe(logits_fn, "logits_fn", params, inputs)
    _, num_classes = check_logits(logits, labels, n)
    labels_ok = labels_in_range(labels, num_classes)
    graph = find_layers(logits_fn, params, inputs)
    dense = _select(graph, tied, "kfac_factors")
    if not dense:
        return ({}, labels_ok), ({}, PartitionSpec())
    layers = graph.layers
    leaves = jax.tree_util.tree_leaves(params)
    cols = math.prod(logits.shape[1:]) if kind == "exact" else 1
    per_ex = math.prod(logits.shape) * cols + sum(
        math.prod(layers[s.layer].operand_shapes[0]) + cols * layers[s.layer].out_size
        for ss in dense.values()
        for s in ss
    )
    xs, mask = chunk_examples(inputs, labels, key, n, chunk_size(batch_size, per_ex, n))
    wanted = sorted({s.layer for ss in dense.values() for s in ss})

    def chunk_sum(batch):
        (x, y, k), m = batch

        def one(x_n, y_n, k_n, m_n):
            a, g = layer_grads(graph, leaves, kind, x_n, y_n, k_n, m_n)
            return {j: a[j][0] for j in wanted}, {j: g[j] for j in wanted}

        a, g = jax.vmap(one)(x, y, k, m)
        out = {}
        for i, ss in dense.items():
            a_sum = b_sum = 0
            layout = _rows_layout(shardings)
            for s in ss:
                aj, gj = a[s.layer], g[s.layer]  # (B, *in_shape), (B, C, *out_shape)
                aj = _rows(aj, s.act_order, s.d_in, compute_dtype(aj.dtype))
                aj = jnp.where(m[:, None, None], _constrain(aj, layout), 0)
                gj = gj.reshape(-1, *gj.shape[2:])
                gj = _constrain(_rows(gj, s.out_order, s.d_out, compute_dtype(gj.dtype)), layout)
                a_sum = a_sum + _outer_sum(aj)
                b_sum = b_sum + _outer_sum(gj)
            out[i] = (a_sum, b_sum)
        return out

    sums = scan_sum(chunk_sum, (xs, mask))
    out, specs = {}, {}
    for i, (a_sum, b_sum) in sums.items():
        rows = sum(s.rows for s in dense[i])
        spec, shape, d_in = (
            None if shardings is None else shardings[i],
            graph.leaf_specs[i].shape,
            dense[i][0].d_in,
        )
        out[graph.leaf_paths[i]] = (
            _constrain(
                a_sum / jnp.asarray(n * rows, a_sum.dtype),
                _factor_sharding(spec, d_in, "in", shape),
            ),
            _constrain(
                b_sum / jnp.asarray(n, b_sum.dtype), _factor_sharding(spec, d_in, "out", shape)
            ),
        )
        specs[graph.leaf_paths[i]] = tuple(
            PartitionSpec() if spec is None else _factor_sharding(spec, d_in, side, shape).spec
            for side in ("in", "out")
        )
    return (out, labels_ok), (specs, PartitionSpec())


_kfac_jit = jax.jit(
    on_auto_axes(_kfac_impl),
    static_argnames=("logits_fn", "kind", "batch_size", "tied", "shardings"),
)
