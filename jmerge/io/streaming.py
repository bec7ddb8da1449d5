"""Streaming merges over safetensors checkpoints: one tensor at a time, from memory-mapped files.

:func:`merge_checkpoints` runs a merge configuration (:func:`jmerge.config.load_config`,
mergekit's YAML) over checkpoint directories and writes a Hugging Face checkpoint directory:

1. **Plan** (nothing is written): open every checkpoint (headers only,
   :class:`jmerge.io.SafetensorsCheckpoint`), take the tensor names of the donor model (the
   ``base_model``, else the first model), and check that every model has every tensor with the
   same shape — or, for ``lm_head.weight``, ties it to its input embeddings as its
   ``config.json`` says (``tie_word_embeddings``). The principled merges (``fisher``,
   ``gradient_matching``, ``mats``, ``regmean``) also open each model's curvature file
   (:mod:`jmerge.io.curvature_files`) and check it covers the tensors. Every problem raises
   before any output exists, naming the model, the file and the tensor.
2. **Merge**, tensor by tensor in file order: the inputs are ``np.memmap`` views of the files
   (page cache, not the process's own memory), read with ``pread`` in chunks of 1M entries
   into reused aligned buffers that XLA reads in place; while tensor i is merged, the next
   tensor's pages are read ahead (``posix_fadvise``), and a reader thread fills the next
   chunks' buffers (:class:`_ChunkFeed`). Each merged chunk, in the output dtype, goes to a
   writer thread that puts it straight into its place in its shard
   (:meth:`jmerge.io.ShardedWriter.add_part`, ``O_DIRECT`` for large shards). The process's
   own (anonymous) memory stays about (inputs + 2) × the largest tensor (the methods that
   merge whole tensors, or compute masks over them) or a few chunks (the elementwise and
   selecting methods and DARE), however large the checkpoints.
3. **Commit**: ``config.json`` (``torch_dtype`` set to the output dtype) and the tokenizer files
   of the donor (or ``tokenizer_source``) are copied into the staging directory, which then
   replaces ``out`` atomically: an error or a kill at any point leaves the previous ``out`` or
   nothing.

Arithmetic is float32 (float64 for float64 inputs); the output dtype is ``out_dtype``, else
``dtype``, else the donor tensor's dtype (mergekit's rule: bf16 checkpoints stay bf16).

Whole-model scales of the principled merges (the mean curvature diagonal that makes ``eps``,
``damping`` and ``prior`` relative, see :func:`jmerge.absolute`) are computed in a first pass
over the curvature files, so a streamed merge equals the in-memory merge of the same trees.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import queue
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jmerge.config import (
    ConfigError,
    MergeConfig,
    layer_index,
    load_config,
    resolve_parameters,
)
from jmerge.io._memory import PeakMemory
from jmerge.io.safetensors import (
    CheckpointError,
    SafetensorsCheckpoint,
    ShardedWriter,
    file_region,
)

__all__ = ["MergeSummary", "TensorPlan", "MergePlan", "plan_merge", "merge_checkpoints"]

PRINCIPLED = ("fisher", "regmean", "mats", "gradient_matching")
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "generation_config.json",
    "chat_template.json",
)
"""Files copied from the tokenizer donor (mergekit 0.1.5 ``merge._copy_tokenizer``'s list,
plus ``vocab.json``)."""

LM_HEAD = "lm_head.weight"
EMBEDDINGS = (
    "model.embed_tokens.weight",
    "transformer.wte.weight",
    "gpt_neox.embed_in.weight",
    "model.decoder.embed_tokens.weight",
    "embed_tokens.weight",
)
"""Input-embedding names (Llama/Mistral/Qwen, GPT-2, GPT-NeoX, OPT) that a tied ``lm_head``
reads."""

_DTYPES = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}


class TensorPlan(NamedTuple):
    """One output tensor: its name, shape, output dtype, and per input model the name it is
    read under (the input embeddings for a tied ``lm_head``)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    sources: tuple[str, ...]
    nbytes_in: int


class MergePlan(NamedTuple):
    """Everything :func:`merge_checkpoints` checked before writing.

    Attributes:
      config: the validated configuration.
      donor: directory whose ``config.json`` and layout the output takes.
      inputs: model reference -> directory, in :attr:`MergeConfig.inputs` order.
      checkpoints: model reference -> opened checkpoint.
      tensors: the output tensors, in the donor's file order.
      num_layers: for parameter gradients (``num_hidden_layers`` or the largest layer index
        + 1).
      curvatures: model reference -> opened curvature checkpoint (principled merges).
    """

    config: MergeConfig
    donor: Path
    inputs: dict[str, Path]
    checkpoints: dict[str, SafetensorsCheckpoint]
    tensors: tuple[TensorPlan, ...]
    num_layers: int
    curvatures: dict[str, Any]


class MergeSummary(NamedTuple):
    """What a merge did (printed by the CLI).

    Attributes:
      method: the merge method.
      out: the output directory (None for a dry run).
      tensors: number of tensors merged (planned, for a dry run).
      bytes_read: tensor bytes read from the input checkpoints.
      bytes_written: tensor bytes written.
      seconds: wall time of the merge (planning included).
      peak_anon: peak anonymous memory (``RssAnon``) of the process during the merge, bytes.
      baseline_anon: ``RssAnon`` when the merge started, bytes.
      largest_tensor: bytes of the largest input tensor.
      dry_run: nothing was written.
    """

    method: str
    out: Path | None
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_anon: int
    baseline_anon: int
    largest_tensor: int
    dry_run: bool

    def format(self) -> str:
        mb = 1 << 20
        rate = self.bytes_read / max(self.seconds, 1e-9) / mb
        lines = [
            f"method        {self.method}",
            f"tensors       {self.tensors}"
            + (" (dry run: nothing written)" if self.dry_run else ""),
            f"read          {self.bytes_read / mb:,.1f} MiB ({rate:,.1f} MiB/s)",
            f"written       {self.bytes_written / mb:,.1f} MiB"
            + (f" -> {self.out}" if self.out else ""),
            f"time          {self.seconds:.2f} s",
            f"peak memory   {self.peak_anon / mb:,.1f} MiB anonymous "
            f"({(self.peak_anon - self.baseline_anon) / mb:,.1f} MiB above the start; "
            f"largest tensor {self.largest_tensor / mb:,.1f} MiB)",
        ]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Planning


def _model_dir(ref: str, config: MergeConfig) -> Path:
    """A model reference as a local directory: the path itself, else relative to the config
    file. Hub ids are not downloaded."""
    candidates = [Path(ref).expanduser()]
    if config.source and not Path(ref).is_absolute():
        candidates.append(Path(config.source).resolve().parent / ref)
    for c in candidates:
        if c.is_dir():
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"model {ref!r}: no such directory (tried {tried}). jmerge reads local checkpoints; "
        "download hub models first, e.g. `huggingface-cli download ORG/NAME --local-dir DIR`."
    )


def _hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from e


def _ties_embeddings(hf_config: Mapping) -> bool:
    if "tie_word_embeddings" in hf_config:
        return bool(hf_config["tie_word_embeddings"])
    text = hf_config.get("text_config")
    return bool(isinstance(text, Mapping) and text.get("tie_word_embeddings"))


def _source_name(ref: str, ckpt: SafetensorsCheckpoint, hf_config: Mapping, name: str) -> str:
    if name in ckpt:
        return name
    if name == LM_HEAD:
        embed = next((e for e in EMBEDDINGS if e in ckpt), None)
        if embed is not None and _ties_embeddings(hf_config):
            return embed
        if embed is not None:
            raise ValueError(
                f"model {ref!r} has no {LM_HEAD!r} and its config.json does not set "
                f"tie_word_embeddings: true, so its output embeddings are unknown (the others "
                f"store {LM_HEAD!r}). Set tie_word_embeddings in {ref}/config.json if its head "
                f"is tied to {embed!r}, or leave the model out."
            )
    raise KeyError(f"model {ref!r} ({ckpt.path}) has no tensor {name!r}.")


def _num_layers(hf_config: Mapping, names: Sequence[str]) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(hf_config.get(key), int):
            return int(hf_config[key])
    indices = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(indices) + 1 if indices else 1


def _out_dtype(config: MergeConfig, dtype: np.dtype) -> np.dtype:
    name = config.out_dtype or config.dtype
    return _DTYPES[name] if name else np.dtype(dtype)


def _common_dtype(dtypes) -> np.dtype:
    """The dtype that holds every one of ``dtypes`` (JAX's promotion lattice, which NumPy lacks
    for bf16 with fp16: float32); float64 stays float64."""
    return np.dtype(functools.reduce(jnp.promote_types, dtypes))


def plan_merge(config: str | os.PathLike | Mapping | MergeConfig) -> MergePlan:
    """Check a merge before any output is written (the ``--dry-run`` of the CLI).

    Raises:
      jmerge.config.ConfigError: an invalid configuration.
      FileNotFoundError: a model directory or curvature file that does not exist.
      KeyError: a model lacks a tensor of the donor (naming both).
      ValueError: shapes differ across models (naming the tensor and every shape), an
        untied/tied ``lm_head`` mismatch, a curvature file that does not cover a tensor.
      jmerge.io.CheckpointError: a corrupt checkpoint (naming the file and tensor).
    """
    if not isinstance(config, MergeConfig):
        config = load_config(config)
    inputs = {ref: _model_dir(ref, config) for ref in config.inputs}
    checkpoints = {ref: SafetensorsCheckpoint(d) for ref, d in inputs.items()}
    hf = {ref: _hf_config(d) for ref, d in inputs.items()}
    donor_ref = config.base_model or config.inputs[0]
    donor = checkpoints[donor_ref]
    donor_ties = LM_HEAD not in donor and _ties_embeddings(hf[donor_ref])
    for ref, ckpt in checkpoints.items():
        if ref != donor_ref and donor_ties and LM_HEAD in ckpt:
            raise ValueError(
                f"model {ref!r} stores its own {LM_HEAD!r} but the donor {donor_ref!r} ties it "
                "to the input embeddings (tie_word_embeddings: true), so the merged model has "
                f"no {LM_HEAD!r} and {ref!r}'s head would be dropped. Make the donor untied "
                "(save its lm_head and set tie_word_embeddings: false) or leave the model out."
            )
    tensors = []
    for name in donor.names:
        sources = tuple(
            _source_name(ref, checkpoints[ref], hf[ref], name) for ref in config.inputs
        )
        shapes = {
            ref: checkpoints[ref].shape(src)
            for ref, src in zip(config.inputs, sources, strict=True)
        }
        if len(set(shapes.values())) > 1:
            listed = "; ".join(f"{r}: {s}" for r, s in shapes.items())
            raise ValueError(f"tensor {name!r} has different shapes across models: {listed}.")
        nbytes = sum(
            checkpoints[ref].nbytes(src) for ref, src in zip(config.inputs, sources, strict=True)
        )
        tensors.append(
            TensorPlan(name, donor.shape(name), _out_dtype(config, donor.dtype(name)), sources,
                       nbytes)
        )
    curvatures = {}
    if config.merge_method in PRINCIPLED:
        curvatures = _open_curvatures(config, inputs, tensors)
    return MergePlan(
        config, inputs[donor_ref], inputs, checkpoints, tuple(tensors),
        _num_layers(hf[donor_ref], donor.names), curvatures,
    )


# ---------------------------------------------------------------------------------------------
# Curvature files (principled merges)


class _Curvature(NamedTuple):
    kind: str  # "fisher" | "gram" | "kfac"
    checkpoint: SafetensorsCheckpoint
    rest: float


def _curvature_kind(config: MergeConfig) -> str:
    method = config.merge_method
    if method == "regmean":
        return "gram"
    if method == "mats":
        kind = str(resolve_parameters(config, "", 1, layer=None).global_["curvature"])
        if kind not in ("fisher", "gram", "kfac"):
            raise ConfigError(f"{config.source or 'config'}: mats: curvature must be one of "
                              f"fisher, gram, kfac; got {kind!r}.")
        return kind
    return "fisher"


def _open_curvatures(config: MergeConfig, inputs: Mapping[str, Path], tensors) -> dict:
    from jmerge.io.curvature_files import curvature_path

    kind = _curvature_kind(config)
    refs = list(config.stack)
    if config.merge_method == "gradient_matching" and config.base_model is not None:
        base_file = curvature_path(inputs[config.base_model], "fisher")
        if base_file.is_file():
            refs.append(config.base_model)  # the pretrained model's Fisher: the paper's prior
    out = {}
    for ref in refs:
        path = curvature_path(inputs[ref], kind)
        if not path.is_file():
            raise FileNotFoundError(
                f"{config.merge_method}: model {ref!r} has no {kind} curvature file {path}; "
                "write one with jmerge.io.compute_and_save_curvature(..., kind="
                f"{kind!r}) or jmerge.io.save_curvature."
            )
        ckpt = SafetensorsCheckpoint(path)
        rest = float(ckpt.metadata.get("jmerge.rest", "1.0"))
        if kind == "fisher":
            for t in tensors:
                if t.name not in ckpt:
                    raise KeyError(f"{path}: no Fisher for tensor {t.name!r} of model {ref!r}.")
                if ckpt.shape(t.name) != t.shape:
                    raise ValueError(
                        f"{path}: the Fisher of {t.name!r} has shape {ckpt.shape(t.name)}, the "
                        f"tensor {t.shape}."
                    )
        out[ref] = _Curvature(kind, ckpt, rest)
    return out


def _layout(name: str, shape: tuple[int, ...], d_in: int) -> str:
    """How a 2-D block factor applies to a tensor: Flax kernels are (in..., out) (a ``kernel``
    or any name whose leading dims multiply to d_in), PyTorch/HF ``*.weight`` matrices are
    (out, in) and are transposed around the solve."""
    if name.endswith(".weight") and len(shape) == 2 and shape[1] == d_in:
        return "torch"
    if math.prod(shape[:-1]) == d_in:
        return "kernel"
    raise ValueError(
        f"curvature block of {name!r} is {d_in}x{d_in}, which fits neither a (d_in, ...) kernel "
        f"nor a (out, d_in) weight of shape {shape}."
    )


def _operator(curv: _Curvature, name: str, shape: tuple[int, ...]):
    """(operator on the one-leaf tree {'w': x}, transpose?) for tensor ``name``."""
    from jmerge.curvature import KFAC, BlockGram, Diagonal

    ckpt = curv.checkpoint
    if curv.kind == "fisher":
        return Diagonal({"w": jnp.asarray(ckpt.get(name))}), False
    suffixes = ("gram",) if curv.kind == "gram" else ("kfac_in", "kfac_out")
    keys = [f"{name}.{s}" for s in suffixes]
    if not all(k in ckpt for k in keys):
        if curv.kind == "gram":
            return BlockGram({}, rest=curv.rest), False
        return KFAC({}, rest=curv.rest), False
    factors = [jnp.asarray(ckpt.get(k)) for k in keys]
    torch = _layout(name, shape, int(factors[0].shape[0])) == "torch"
    if curv.kind == "gram":
        return BlockGram({"['w']": factors[0]}, rest=curv.rest), torch
    return KFAC({"['w']": tuple(factors)}, rest=curv.rest), torch


def _trace_sum(op, x: jax.Array) -> float:
    """tr(C) restricted to this tensor (exact: every kind here has a diagonal)."""
    return float(jnp.sum(op.diag({"w": x})["w"]))


def _global_scale(plan: MergePlan, weights_of: Callable[[TensorPlan], np.ndarray]) -> float:
    """s = mean diag(Σ_t |w_t| C_t) over every entry of the model (jmerge's relative unit,
    :func:`jmerge.curvature.mean_diagonal`), from a pass over the curvature files."""
    total, count = 0.0, 0
    stack = plan.config.stack
    for t in plan.tensors:
        w = np.abs(weights_of(t))
        x = jnp.zeros(t.shape, jnp.float32)
        for i, ref in enumerate(stack):
            op, torch = _operator(plan.curvatures[ref], t.name, t.shape)
            total += float(w[i]) * _trace_sum(op, x.T if torch else x)
        count += math.prod(t.shape)
    s = total / max(count, 1)
    return s if s > 0 else 1.0


# ---------------------------------------------------------------------------------------------
# Per-tensor merges


def _key_for(seed: int, name: str) -> jax.Array:
    """The random methods' key of one tensor: fixed by the seed and the tensor's name, so a
    tensor's mask does not depend on which tensors come before it."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _principled(plan: MergePlan, scale: float, t: TensorPlan, base, stack, params) -> jax.Array:
    import jmerge
    from jmerge.merges import absolute

    method, g = plan.config.merge_method, params.global_
    w = jnp.asarray(params.per_model["weight"])
    ops, flags = zip(
        *(_operator(plan.curvatures[ref], t.name, t.shape) for ref in plan.config.stack),
        strict=True,
    )
    torch = any(flags)
    tr = (lambda x: x.T) if torch else (lambda x: x)
    models = [{"w": tr(x)} for x in stack]
    theta0 = None if base is None else {"w": tr(base)}
    if method == "fisher":
        fishers = [op.diag(m) for op, m in zip(ops, models, strict=True)]
        out = jmerge.fisher_merge(models, fishers, weights=w, eps=absolute(g["eps"] * scale))
    elif method == "regmean":
        out = jmerge.regmean(models, list(ops), weights=w, alpha=g["alpha"],
                             ridge=g["ridge"])
    elif method == "mats":
        out = jmerge.mats(theta0, models, list(ops), weights=w, init=g["init"],
                          damping=absolute(g["damping"] * scale), maxiter=int(g["maxiter"]),
                          rtol=g["rtol"]).params
    else:  # gradient_matching, diagonal
        prior: Any = absolute(g["prior"] * scale)
        base_curv = plan.curvatures.get(plan.config.base_model)
        if base_curv is not None:
            f0 = jnp.asarray(base_curv.checkpoint.get(t.name), jnp.float32)
            prior = {"w": tr(f0) + g["prior"] * scale}
        out = jmerge.gradient_matching(theta0, models, list(ops), alpha=w, prior=prior,
                                       maxiter=int(g["maxiter"]), rtol=g["rtol"]).params
    return tr(out["w"])


_STATIC = frozenset({"density", "gamma"})
"""Per-model parameters that fix how many entries the trimming methods keep (static)."""


def _hashable(values: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(np.asarray(v).tolist()) if np.ndim(v) else v)
                        for k, v in values.items()))


def _kernel_args(params) -> dict:
    """The keyword arguments of :func:`_tensor_kernel` that come from the resolved parameters:
    the trimming densities/gammas and the globals static (hashable), the rest traced."""
    per_model = params.per_model
    return dict(
        dynamic={k: np.asarray(v) for k, v in per_model.items() if k not in _STATIC},
        static=_hashable({k: v for k, v in per_model.items() if k in _STATIC}),
        globals_=_hashable(params.global_),
    )


@partial(jax.jit, static_argnames=("method", "static", "globals_", "out_dtype"))
def _tensor_kernel(base, tensors, dynamic, key, masks=None, scales=None, bounds=None,
                   start=None, *, method, static, globals_, out_dtype):
    """One tensor (or piece) of a mergekit method, compiled once per shape and static setting:
    the stack of the inputs, the merge, the cast to the output dtype and the finiteness check
    fuse into one program, so no (N, *s) float32 copy of the inputs is materialised outside
    it. ``masks``/``scales``: the sparsifying methods' masks and L1 factors of the whole
    tensor (:func:`jmerge.merges.mergekit.sparsify_task_vector`); ``bounds`` ((N,), (N,)):
    a magnitude selection's bounds instead of its masks, which are rebuilt here
    (:func:`jmerge.merges.mergekit.keep_within`); ``start`` with ``key``: this piece begins
    at entry ``start`` of its tensor, and DARE's masks are drawn here from the counter-based
    uniforms of those entries (:func:`jmerge.merges.mergekit.uniforms`)."""
    from jmerge.merges.mergekit import keep_within, merge_tensor, uniforms

    # tensors / masks: a sequence (stacked here) or one stacked (N, ...) array
    stack = tensors if isinstance(tensors, jax.Array) else jnp.stack(tensors)
    per_model = dict(dynamic) | {k: np.asarray(v) for k, v in static}
    if bounds is not None:
        masks = keep_within(base, stack, *bounds)
    elif start is not None:
        density = jnp.asarray(per_model["density"], jnp.float32)
        density = density.reshape((-1,) + (1,) * (stack.ndim - 1))
        masks, key = uniforms(key, stack.shape, start) < density, None
    elif masks is not None and not isinstance(masks, jax.Array):
        masks = jnp.stack(masks)
    merged = merge_tensor(method, base, stack, per_model, dict(globals_), key=key,
                          masks=masks, scales=scales)
    return merged.astype(out_dtype), jnp.all(jnp.isfinite(merged))


_ELEMENTWISE = frozenset({"linear", "task_arithmetic"})
"""Methods whose result at an entry depends on that entry only (given the resolved
parameters): merged in flat chunks."""
_SPARSIFYING = frozenset({"ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                          "della", "della_linear"})
"""Methods that are elementwise once each model's keep mask and L1 factor are known: the masks
are computed one model at a time over the whole tensor, then the merge runs in chunks."""
_CHUNK = 1 << 20
"""Entries per chunk: 2 MiB of bf16 per input, so that a chunk's buffers (4 models: 8 MiB) are
still in the CPU's cache when the kernel reads them after pread wrote them. Task arithmetic
over 4 × 713 MB, in-process merge after a warm-up: 0.70 s with 4M-entry chunks, 0.58 s with
1M, 0.64 s with 512K (per-chunk dispatch costs more there)."""


def _padded_size(n: int) -> int:
    """Chunk length for a flat tensor of n entries: _CHUNK, or the next power of two (at least
    1024) for smaller tensors, so that a whole model compiles a handful of programs."""
    return _CHUNK if n >= _CHUNK else max(1024, 1 << (n - 1).bit_length())


def _chunk_delta(base, stack, valid, dtype):
    """|δ| = |θ_t − θ0| of a chunk's models in ``dtype``'s compute dtype, (N, *lanes), and
    the mask of the chunk's first ``valid`` entries (the rest is padding), ``lanes``."""
    wd = jnp.promote_types(dtype, jnp.float32)
    delta = jnp.abs(stack.astype(wd) - base.astype(wd)[None])
    return delta, jnp.arange(base.size).reshape(base.shape) < valid


@partial(jax.jit, static_argnames=("shift", "width", "filtered", "select_dtype"))
def _chunk_histogram(base, stack, valid, prefixes, *, shift, width, filtered, select_dtype):
    """Radix-select histograms of one chunk, every model at once: for model i and each of its
    prefixes p_ij, the counts (2^width bins) of bits [shift, shift + width) of the order key
    of |δ_i| over the chunk's first ``valid`` entries whose higher bits equal p_ij (all of
    them when not ``filtered``, then J = 1). ``stack`` (N, *lanes), ``prefixes`` (N, J);
    returns (N, J, 2^width) int32, counted by the CPU kernel (``jmerge._kernels``)."""
    from jmerge.merges._select import _histogram, _to_key

    delta, live = _chunk_delta(base, stack, valid, select_dtype)
    key = _to_key(delta.astype(select_dtype))  # ranked in the checkpoint dtype, as mergekit
    kd = key.dtype
    bins = 1 << width
    digit = ((key >> np.array(shift, kd)) & np.array(bins - 1, kd)).astype(jnp.int32)
    expand = (slice(None), slice(None)) + (None,) * base.ndim
    if filtered:
        same = (key[:, None] >> np.array(shift + width, kd)) == prefixes[expand]
        digits = jnp.where(same & live, digit[:, None], bins)
    else:
        digits = jnp.where(live, digit, bins)[:, None]
    return _histogram(digits, bins, 2, kernel=True)


@partial(jax.jit, static_argnames=("select_dtype",))
def _chunk_l1(base, stack, valid, lo, hi, *, select_dtype):
    """Per model (Σ|δ|, Σ_{lo ≤ |δ| ≤ hi} |δ|) over the chunk's first ``valid`` entries,
    float32 (N,) each; ``lo``, ``hi`` (N,)."""
    delta, live = _chunk_delta(base, stack, valid, select_dtype)
    mag = delta.astype(select_dtype)
    bound = (slice(None),) + (None,) * base.ndim
    kept = live & (mag >= lo[bound]) & (mag <= hi[bound])
    axes = tuple(range(1, stack.ndim))
    return (jnp.sum(jnp.where(live, delta, 0), axes), jnp.sum(jnp.where(kept, delta, 0), axes))


@jax.jit
def _pick_digit(hist, k_rem):
    """:func:`jmerge.merges._select.pick_digit`, compiled (called on host values)."""
    from jmerge.merges._select import pick_digit

    return pick_digit(hist, k_rem)


def _streamed_kth(chunks: Callable, n: int, wanted: Sequence[Sequence[int]],
                  select_dtype) -> list[list[int]]:
    """Per model i, the order keys (ints) of the k-th largest |δ_i| for each k in
    ``wanted[i]``, over a tensor read in chunks (``chunks()`` yields ``(start, stop, base,
    stack)`` as :meth:`_ChunkFeed.tensor`, re-read once per radix pass): radix select as
    :func:`jmerge.merges._select.kth_largest_over`, each pass's histograms summed over the
    chunks (one pass for 16-bit dtypes, two for float32) and every model counted from the
    same chunk, so the selection holds one chunk of each model, not the tensor."""
    from jmerge.merges._select import _digits

    if n >= 2**31:
        raise ValueError(f"a magnitude selection over {n} >= 2^31 entries per model needs "
                         "64-bit counts; tensors that large are not supported.")
    key_bits = np.dtype(select_dtype).itemsize * 8
    kd = np.dtype(f"uint{key_bits}")
    num, j = len(wanted), max(1, *(len(w) for w in wanted))
    ks = np.array([list(w) + [1] * (j - len(w)) for w in wanted], np.int64)  # padded: k = 1
    prefixes = [[0] * j for _ in range(num)]
    k_rem = ks.astype(np.int32).reshape(-1)
    decided = 0
    for width in _digits(key_bits, n):
        shift = key_bits - decided - width
        pre = jnp.asarray(np.array(prefixes, kd))
        hist = np.zeros((), np.int64)
        pending = None
        for start, stop, base, stack in chunks():
            h = _chunk_histogram(base, stack, stop - start, pre, shift=shift, width=width,
                                 filtered=decided > 0, select_dtype=select_dtype)
            # One step late: waiting for the previous chunk's count (np.asarray) frees its
            # buffers for the next chunk's copy, while this chunk's count runs.
            if pending is not None:
                hist = hist + np.asarray(pending)
            pending = h
        hist = hist + np.asarray(pending)
        hist = np.broadcast_to(hist, (num, j, hist.shape[-1])).reshape(num * j, -1)
        digits, k_rem = _pick_digit(hist.astype(np.int32), k_rem)
        digits = np.asarray(digits).reshape(num, j)
        prefixes = [[(p << width) | int(d) for p, d in zip(ps, ds, strict=True)]
                    for ps, ds in zip(prefixes, digits, strict=True)]
        decided += width
    return [ps[: len(w)] for ps, w in zip(prefixes, wanted, strict=True)]


def _rescales(config: MergeConfig, params) -> bool:
    """Whether a sparsifying method rescales the kept entries by its L1 factors (mergekit's
    ``rescale``, given or its default for the method)."""
    from jmerge.merges.mergekit import METHODS

    default = METHODS[config.merge_method].global_["rescale"].default
    return bool(params.global_.get("rescale", default))


def _selection(config: MergeConfig, t: TensorPlan, by_ref: Mapping, params, feed):
    """Each model's magnitude-selection bounds ((N,) lo, (N,) hi) and L1 factors (N,),
    computed over the whole tensor from chunks, every model from the same chunk
    (:func:`_streamed_kth`; the bounds from the ranks as the in-memory merge takes them,
    ``mergekit._bounds_from_ranks``): two numbers per model replace its mask, and no
    whole-tensor buffer is allocated."""
    from jmerge.merges._select import _from_key
    from jmerge.merges.mergekit import _GTA_KIND, METHODS, _bounds_from_ranks, selection_ranks

    method = config.merge_method
    spec, kind = METHODS[method], _GTA_KIND[method]
    n = math.prod(t.shape)
    select_dtype = _common_dtype(np.asarray(by_ref[r]).dtype for r in config.inputs)
    rescale = _rescales(config, params)

    def per_model(name, i):
        default = spec.per_model[name].default if name in spec.per_model else 0.0
        return float(np.asarray(params.per_model.get(name, [default] * len(config.stack))[i]))

    def chunks():
        return feed.tensor(t.name, n)

    models = range(len(config.stack))
    densities = [per_model("density", i) for i in models]
    gammas = [per_model("gamma", i) if kind == "outliers" else 0.0 for i in models]
    ranks = selection_ranks(kind, n, densities, gammas)
    key_dtype = np.dtype(f"uint{8 * select_dtype.itemsize}")
    wanted = [sorted({k for k in (ranks[0][i], ranks[1][i]) if k is not None}) for i in models]
    found = _streamed_kth(chunks, n, wanted, select_dtype)
    keys = [dict(zip(w, f, strict=True)) for w, f in zip(wanted, found, strict=True)]

    def kth(ks):  # per model, the value of rank ks[i] (0 where None)
        return np.stack([
            np.zeros((), select_dtype) if k is None
            else np.asarray(_from_key(jnp.asarray(np.array(keys[i][k], key_dtype)), select_dtype))
            for i, k in enumerate(ks)
        ])

    lo, hi = _bounds_from_ranks(ranks, kth, select_dtype, xp=np)
    wd = _common_dtype([select_dtype, np.float32])
    if not rescale:
        return (lo, hi), jnp.ones(len(config.stack), wd)
    before, after = np.zeros(len(config.stack)), np.zeros(len(config.stack))
    lo_d, hi_d = jnp.asarray(lo), jnp.asarray(hi)
    for start, stop, base, stack in chunks():
        s0, s1 = _chunk_l1(base, stack, stop - start, lo_d, hi_d, select_dtype=select_dtype)
        before += np.asarray(s0, np.float64)
        after += np.asarray(s1, np.float64)
    return (lo, hi), jnp.asarray(_l1_factors(before, after).astype(wd))


def _l1_factors(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """mergekit's L1 rescale factors ‖δ‖₁ / ‖m ⊙ δ‖₁ (sparsify.rescaled_masked_tensor),
    1 where either norm is below its eps, from sums accumulated over chunks (float64)."""
    from jmerge.merges.mergekit import _RESCALE_EPS

    small = (before < _RESCALE_EPS) | (after < _RESCALE_EPS)
    return np.where(small, 1.0, before / np.where(small, 1.0, after))


_HASHED = frozenset({"dare_linear", "dare_ties"})
"""Random methods whose masks are drawn per chunk from counter-based uniforms (no mask the
size of the tensor is held; DELLA's rank-dependent probabilities need whole rows)."""


@jax.jit
def _chunk_random_l1(base, stack, valid, density, key, start):
    """Per model (Σ|δ|, Σ_kept |δ|) over a chunk's first ``valid`` entries, DARE's masks drawn
    as the merge draws them (:func:`jmerge.merges.mergekit.uniforms`); float32 (N,) each."""
    from jmerge.merges.mergekit import uniforms

    delta, live = _chunk_delta(base, stack, valid, stack.dtype)
    bound = (slice(None),) + (None,) * base.ndim
    keep = live & (uniforms(key, delta.shape, start) < density[bound])
    axes = tuple(range(1, stack.ndim))
    return jnp.sum(jnp.where(live, delta, 0), axes), jnp.sum(jnp.where(keep, delta, 0), axes)


def _random_scales(config: MergeConfig, t: TensorPlan, by_ref: Mapping, params, key, feed):
    """DARE's L1 rescale factors ‖δ_t‖₁ / ‖m_t ⊙ δ_t‖₁ (mergekit
    sparsify.rescaled_masked_tensor) over the whole tensor, from one pass over its chunks;
    None when the method does not rescale."""
    if not _rescales(config, params):
        return None
    n = math.prod(t.shape)
    density = jnp.asarray(np.asarray(params.per_model["density"], np.float32))
    before = np.zeros(len(config.stack))
    after = np.zeros(len(config.stack))
    for start, stop, base, stack in feed.tensor(t.name, n):
        s0, s1 = _chunk_random_l1(base, stack, stop - start, density, key, start)
        before += np.asarray(s0, np.float64)
        after += np.asarray(s1, np.float64)
    dtypes = [np.asarray(by_ref[r]).dtype for r in config.inputs]
    wd = _common_dtype([*dtypes, np.float32])
    return jnp.asarray(_l1_factors(before, after).astype(wd))


def _sparsify(config: MergeConfig, t: TensorPlan, by_ref: Mapping, params, seed: int):
    """Each model's keep mask (flat bool, host) and L1 factor over the whole tensor, one model
    at a time, so that only one model's task vector is ever expanded in memory."""
    from jmerge.merges.mergekit import sparsify_task_vector

    base = jnp.asarray(by_ref[config.base])
    key = _key_for(seed, t.name) if config.spec.random else None
    masks, scales = [], []
    for i, ref in enumerate(config.stack):
        mine = {k: v[i] for k, v in params.per_model.items()}
        keep, scale = sparsify_task_vector(
            config.merge_method, base, jnp.asarray(by_ref[ref]), mine, params.global_,
            key=None if key is None else jax.random.fold_in(key, i))
        masks.append(np.asarray(keep).reshape(-1))
        scales.append(scale)
        del keep
    return masks, jnp.stack(scales)


_LANES = 1024
"""Chunks are laid out (size / 1024, 1024): XLA:CPU splits a 2-D elementwise loop over its
threads, a 1-D one of 4M entries it ran on one (measured: 0.66 vs 1.3 ms per chunk)."""


_ALIGN = 64
"""XLA:CPU reads a host buffer in place (``device_put(..., may_alias=True)``) only when it is
64-byte aligned; otherwise it copies it. NumPy's buffers are 16-byte aligned once
:func:`jmerge.io._memory.reuse_freed_memory` keeps large blocks on the heap, so every chunk
was copied twice (measured: 9 ms instead of 0.1 ms per 3 × 4M bf16 chunk)."""


def _aligned_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """``np.zeros(shape, dtype)`` whose data starts on a :data:`_ALIGN`-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.zeros(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


class _Descriptors(dict):
    """Read-only file descriptors by path, opened on first use; :meth:`close` closes all."""

    def __missing__(self, path):
        fd = self[path] = os.open(path, os.O_RDONLY)
        return fd

    def close(self) -> None:
        while self:
            os.close(self.popitem()[1])


def _fill(buf: np.ndarray, source: np.ndarray, start: int, stop: int, region=None,
          fds: _Descriptors | None = None) -> None:
    """Entries [start, stop) of the flat ``source`` into ``buf``, zeros past ``stop``: read
    with pread from ``region`` (the tensor's place in its file, opened through ``fds``) when
    given and the dtypes agree, else copied (and cast: models stored in different dtypes)."""
    if region is None or source.dtype != buf.dtype:
        buf[: stop - start] = source[start:stop]
    else:
        path, offset = region
        _pread_into(fds[path], buf[: stop - start], offset + start * source.itemsize, path)
    if stop - start < buf.size:
        buf[stop - start :] = 0


class _ChunkFeed:
    """Reads the chunks of every tensor, in plan order and as many times as the merge reads
    them (:func:`_passes`), in a thread that runs ahead of the merge: the inputs of chunk
    i + 1 (of this pass, the next one or the next tensor) are read while chunk i is merged
    and chunk i − 1 written, so reading never waits for a kernel or for the next tensor's turn
    (measured with reads on the merging thread: 0.18-0.37 s of a 0.74-0.98 s task-arithmetic
    merge of 4 × 713 MB had neither a read nor a write running).

    A chunk is the flat entries [start, stop) of a tensor, zero-padded to the chunk length
    :func:`_padded_size` (so a model runs a few compiled programs, one per chunk length): the
    models' pieces in one (N, *lanes) buffer, the base model's in another, both 64-byte
    aligned so that XLA reads them in place (``device_put(may_alias=True)``; stacking N
    device arrays inside the compiled program kept XLA:CPU from fusing it with the merge,
    15 ms instead of 1.3 ms per chunk of 4M entries, task arithmetic, 3 models). Three buffer
    sets of the largest chunk's size, allocated once per merge (fresh buffers per tensor
    faulted their pages in: 0.35-0.5 s instead of 0.23 s to read 2.85 GB), rotate: the
    thread fills a set as soon as one is released.

    :meth:`tensor` yields one pass over a tensor's chunks; asking for chunk i + 1 releases the
    buffers of chunk i − 1, so the caller must have collected every result computed from
    chunk i − 1 (``np.asarray``) by then. Used as a context manager: leaving it stops the
    thread; a read error is raised by :meth:`tensor` in the merging thread."""

    _DEPTH = 3
    _END = "end of the schedule"

    def __init__(self, plan: MergePlan):
        self._plan = plan
        config = plan.config
        self._n_stack = len(config.stack)
        self._schedule = []  # (tensor, passes, stack dtype, base dtype)
        widths = [0]
        for t in plan.tensors:
            if not (passes := _passes(plan, t)):
                continue
            dtype = {ref: plan.checkpoints[ref].dtype(src)
                     for ref, src in zip(config.inputs, t.sources, strict=True)}
            stack_dtype = _common_dtype(dtype[ref] for ref in config.stack)
            base_dtype = None if config.base is None else dtype[config.base]
            self._schedule.append((t, passes, stack_dtype, base_dtype))
            size = _padded_size(math.prod(t.shape))
            stack = stack_dtype.itemsize * size * self._n_stack
            base = 0 if base_dtype is None else base_dtype.itemsize * size
            widths.append(-(-stack // _ALIGN) * _ALIGN + base)
        self._sets = [_aligned_zeros((max(widths),), np.uint8) for _ in range(self._DEPTH)]
        self._free = threading.Semaphore(self._DEPTH)
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._taken = 0
        self._thread = threading.Thread(target=self._run, name="jmerge-reader", daemon=True)

    def __enter__(self) -> _ChunkFeed:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._free.release()
        self._thread.join()

    def _layout(self, raw: np.ndarray, size: int, stack_dtype, base_dtype):
        lanes = (size // _LANES, _LANES) if size % _LANES == 0 else (size,)
        nbytes = self._n_stack * size * stack_dtype.itemsize
        stack = raw[:nbytes].view(stack_dtype).reshape(self._n_stack, size)
        if base_dtype is None:
            return stack, None, lanes
        at = -(-nbytes // _ALIGN) * _ALIGN
        return stack, raw[at : at + size * base_dtype.itemsize].view(base_dtype), lanes

    def _run(self) -> None:
        config, fds = self._plan.config, _Descriptors()
        try:
            i = 0
            for t, passes, stack_dtype, base_dtype in self._schedule:
                flat = {ref: np.asarray(a).reshape(-1)
                        for ref, a in zip(config.inputs, _views(self._plan, t), strict=True)}
                regions = {ref: file_region(a) for ref, a in flat.items()}
                n = math.prod(t.shape)
                size = _padded_size(n)
                for start in [s for _ in range(passes) for s in range(0, n, size)]:
                    self._free.acquire()
                    if self._stop.is_set():
                        return
                    stop = min(start + size, n)
                    stack, base, lanes = self._layout(self._sets[i % self._DEPTH], size,
                                                      stack_dtype, base_dtype)
                    for row, ref in zip(stack, config.stack, strict=True):
                        _fill(row, flat[ref], start, stop, regions[ref], fds)
                    if base is not None:
                        _fill(base, flat[config.base], start, stop, regions[config.base], fds)
                    self._ready.put((t.name, start, stop, lanes, stack, base))
                    i += 1
            self._ready.put(self._END)
        except BaseException as e:  # noqa: BLE001 - raised in the merging thread
            self._ready.put(e)
        finally:
            fds.close()

    def tensor(self, name: str, n: int):
        """Yields ``(start, stop, base, stack)`` for one pass over the chunks of tensor
        ``name`` (n entries), which must be the next pass of the schedule.

        Raises:
          RuntimeError: the merge asks for another tensor, or more passes, than
            :func:`_passes` scheduled (a bug, reported rather than merged wrongly).
          The reader's error (e.g. :class:`CheckpointError` for a file cut short)."""
        stop = 0
        while stop < n:
            if self._taken >= 2:  # the caller has collected chunk taken − 2's results
                self._free.release()
            item = self._ready.get()
            if isinstance(item, BaseException):
                raise item
            if item is self._END or item[0] != name:
                got = "nothing more" if item is self._END else repr(item[0])
                raise RuntimeError(f"chunk feed: read {got}, the merge wants {name!r} "
                                   "(_passes and the merge disagree).")
            _, start, stop, lanes, stack, base = item
            self._taken += 1
            yield (start, stop,
                   None if base is None else jax.device_put(base.reshape(lanes), may_alias=True),
                   jax.device_put(stack.reshape(self._n_stack, *lanes), may_alias=True))


def _pread_into(fd: int, buf: np.ndarray, offset: int, path) -> None:
    """Fill ``buf`` with the bytes of ``fd`` from ``offset`` (short reads continued)."""
    view = memoryview(buf.reshape(-1).view(np.uint8))
    while view.nbytes:
        got = os.preadv(fd, [view], offset)
        if got == 0:
            raise CheckpointError(f"{path}: file ends before byte {offset}; truncated "
                                  "since it was opened?")
        view, offset = view[got:], offset + got


def _merge_chunked(config: MergeConfig, t: TensorPlan, by_ref: Mapping, params, feed,
                   masks=None, scales=None, bounds=None, key=None):
    """An elementwise method (or a sparsifying one given its masks, selection bounds or
    random key, and its factors) over the chunks of ``feed`` (:class:`_ChunkFeed`): yields
    ``(start, piece, finite)``, each chunk's merged entries (flat, output dtype, on the host)
    as soon as they are computed, so no tensor-sized output buffer is held; each piece is
    collected one chunk late, while the next chunk's kernel runs. ``masks`` (flat bool, one
    per model) are copied per chunk into two aligned buffers that alternate as the feed's
    do."""
    n = math.prod(t.shape)
    args = _kernel_args(params)
    mask_sets = (None if masks is None else
                 [_aligned_zeros((len(masks), _padded_size(n)), bool) for _ in range(2)])
    pending = None  # the previous chunk's (start, stop, merged, ok), collected one step late

    def collect(start, stop, merged, ok):
        # np.asarray waits for the kernel: its chunk buffers may then be refilled.
        return start, np.asarray(merged).reshape(-1)[: stop - start], ok

    for i, (start, stop, base, stack) in enumerate(feed.tensor(t.name, n)):
        piece_masks = None
        if mask_sets is not None:
            buf = mask_sets[i % 2]
            for row, m in zip(buf, masks, strict=True):
                _fill(row, m, start, stop)
            piece_masks = jax.device_put(buf.reshape(stack.shape), may_alias=True)
        merged, ok = _tensor_kernel(base, stack, key=key, masks=piece_masks, scales=scales,
                                    bounds=bounds, start=None if key is None else start,
                                    method=config.merge_method,
                                    out_dtype=np.dtype(t.dtype), **args)
        if pending is not None:  # while this chunk's kernel runs, the next one is copied
            yield collect(*pending)
        pending = (start, stop, merged, ok)
    if pending is not None:
        yield collect(*pending)


def _passes(plan: MergePlan, t: TensorPlan) -> int:
    """How many times :func:`_merge_parts` reads tensor t's chunks through a
    :class:`_ChunkFeed` (the feed's schedule; 0 where it reads none, or reads them itself):
    one merge pass, after the selection's radix passes (:func:`_streamed_kth`, one per digit)
    and the L1 pass of a rescaling method; none for whole tensors (scalars, the principled
    and in-memory methods). Must follow :func:`_merge_parts`,
    :func:`_selection` and :func:`_random_scales`; a difference is an error there
    (:meth:`_ChunkFeed.tensor`), never a wrong result."""
    from jmerge.merges._select import _digits
    from jmerge.merges.mergekit import SELECTING

    config, n = plan.config, math.prod(t.shape)
    method = config.merge_method
    if n == 0:
        return 0
    if method in _ELEMENTWISE:
        return 1
    if len(t.shape) == 0 or method not in _SPARSIFYING:
        return 0
    if method not in _HASHED and method not in SELECTING:
        return 1  # masks computed in memory, then the merge pass
    rescale = int(_rescales(config, resolve_parameters(config, t.name, plan.num_layers)))
    if method in _HASHED:
        return rescale + 1
    dtype = _common_dtype(plan.checkpoints[ref].dtype(src)
                          for ref, src in zip(config.inputs, t.sources, strict=True))
    return len(_digits(8 * dtype.itemsize, n)) + rescale + 1


def _merge_parts(plan: MergePlan, scale: float, seed: int, t: TensorPlan, arrays,
                 feed: _ChunkFeed):
    """Yields ``(start, piece, finite)`` for one tensor: its merged entries from flat index
    ``start`` on (output dtype), in order; the elementwise and sparsifying methods yield
    chunks (:func:`_merge_chunked`), the others the whole tensor once."""
    config = plan.config
    if math.prod(t.shape) == 0:  # nothing to merge, but the writer still needs the tensor
        yield 0, np.empty(t.shape, t.dtype), True
        return
    params = resolve_parameters(config, t.name, plan.num_layers)
    by_ref = dict(zip(config.inputs, arrays, strict=True))
    if config.merge_method in _ELEMENTWISE:
        yield from _merge_chunked(config, t, by_ref, params, feed)
        return
    from jmerge.merges.mergekit import SELECTING

    if config.merge_method in _HASHED and len(t.shape) > 0:
        key = _key_for(seed, t.name)
        scales = _random_scales(config, t, by_ref, params, key, feed)
        yield from _merge_chunked(config, t, by_ref, params, feed, scales=scales, key=key)
        return
    if config.merge_method in SELECTING and len(t.shape) > 0:
        bounds, scales = _selection(config, t, by_ref, params, feed)
        yield from _merge_chunked(config, t, by_ref, params, feed, scales=scales, bounds=bounds)
        return
    if config.merge_method in _SPARSIFYING and len(t.shape) > 0:
        masks, scales = _sparsify(config, t, by_ref, params, seed)
        yield from _merge_chunked(config, t, by_ref, params, feed, masks, scales)
        return
    base = None if config.base is None else jnp.asarray(by_ref[config.base])
    stack = tuple(jnp.asarray(by_ref[ref]) for ref in config.stack)
    if config.merge_method in PRINCIPLED:
        merged = _principled(plan, scale, t, base, list(stack), params)
        yield 0, merged.astype(t.dtype), jnp.all(jnp.isfinite(merged))
        return
    key = _key_for(seed, t.name) if config.spec.random else None
    yield 0, *_tensor_kernel(base, stack, key=key, method=config.merge_method,
                             out_dtype=np.dtype(t.dtype), **_kernel_args(params))


def _scale_for(plan: MergePlan) -> float:
    method = plan.config.merge_method
    if method not in ("fisher", "mats", "gradient_matching"):
        return 1.0

    def weights_of(t: TensorPlan) -> np.ndarray:
        w = resolve_parameters(plan.config, t.name, plan.num_layers).per_model["weight"]
        w = np.asarray(w, np.float64)
        return w / w.sum() if method == "fisher" else w

    return _global_scale(plan, weights_of)


# ---------------------------------------------------------------------------------------------
# The streaming loop


def _touch(arrays: Sequence[np.ndarray]) -> None:
    """Have the next tensor's inputs read into the page cache (file-backed, not this
    process's memory) while the current one merges: for tensors in checkpoint files an
    asynchronous readahead (``posix_fadvise(WILLNEED)``; the merge then reads them with
    ``pread``), for other memory-mapped arrays one byte per 4 KiB page faulted in."""
    for a in arrays:
        region = file_region(a) if hasattr(os, "posix_fadvise") else None
        if region is not None:
            fd = os.open(region[0], os.O_RDONLY)
            try:
                os.posix_fadvise(fd, region[1], a.nbytes, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
            continue
        flat = a.reshape(-1).view(np.uint8)
        if flat.size:
            int(flat[::4096].sum())


class _Background:
    """Runs ``fn(*args)`` calls in order in one worker thread, at most ``depth`` of them queued
    or running: a call blocks while ``depth`` are, and raises the error of an earlier call, if
    any (calls queued after a failed one are dropped). The merge loop runs two:
    :func:`_touch` on the next tensor's inputs (depth 1: their pages are read while the current
    tensor merges), and ``ShardedWriter.add_part`` (depth 3), so that writing (with O_DIRECT,
    or into the page cache for small shards) overlaps merging and a slow write does not stall
    the merge at once (measured with depth 1: the merging thread waited 0.15-0.18 s of a 0.7 s
    task-arithmetic merge for the writer); memory grows by up to ``depth`` chunks (the merge
    loop lets one whole tensor at a time in). :meth:`wait` waits for every call made so far.
    Leaving the ``with`` block waits too (re-raising the error unless another one is already
    propagating) and ends the thread."""

    def __init__(self, fn: Callable[..., Any], depth: int = 1):
        self._fn = fn
        self._slots = threading.Semaphore(depth)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0
        self._idle = threading.Condition()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while (args := self._jobs.get()) is not None:
            try:
                if self._error is None:
                    self._fn(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                self._error = e
            finally:
                del args
                self._slots.release()
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def wait(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0)
        self._raise()

    def __call__(self, *args: Any) -> None:
        self._raise()
        self._slots.acquire()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"jmerge-{getattr(self._fn, '__name__', 'bg')}")
            self._thread.start()
        with self._idle:
            self._pending += 1
        self._jobs.put(args)

    def __enter__(self) -> _Background:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
                return
            try:
                self.wait()
            except BaseException:  # noqa: BLE001 - the first error is the one to report
                pass
        finally:
            if self._thread is not None:
                self._jobs.put(None)
                self._thread.join()
                self._thread = None


def _views(plan: MergePlan, t: TensorPlan) -> list[np.ndarray]:
    return [
        plan.checkpoints[ref].get(src)
        for ref, src in zip(plan.config.inputs, t.sources, strict=True)
    ]


def _copy_extras(plan: MergePlan, writer: ShardedWriter, out_dtype: str | None) -> None:
    """config.json (torch_dtype set) and the tokenizer donor's files, as mergekit does."""
    config = plan.config
    cfg_path = plan.donor / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if out_dtype:
            cfg["torch_dtype"] = out_dtype
        (writer.stage_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    donor = plan.donor
    source = config.tokenizer_source
    if source not in (None, "base", "union") and source in plan.inputs:
        donor = plan.inputs[source]
    elif source not in (None, "base", "union"):
        donor = _model_dir(source, config)
    for name in TOKENIZER_FILES:
        if (donor / name).is_file():
            writer.copy_in(donor / name)


def merge_checkpoints(
    config: str | os.PathLike | Mapping | MergeConfig,
    out: str | os.PathLike | None,
    *,
    dry_run: bool = False,
    progress: bool = True,
    max_shard_size: int | str = "5GB",
    seed: int = 0,
    overwrite: bool = True,
) -> MergeSummary:
    """Run a merge configuration over safetensors checkpoints, streaming tensor by tensor.

    The module docstring gives the three phases (plan, merge, commit) and the memory bound.

    Args:
      config: a YAML path, a dict, or a :class:`jmerge.config.MergeConfig`.
      out: the output directory (replaced atomically; ignored for a dry run).
      dry_run: plan and validate only; nothing is written.
      progress: a tqdm bar over tensors with bytes per second.
      max_shard_size: bytes of tensor data per output shard (``"5GB"``, as transformers).
      seed: for the random methods (DARE, DELLA): a tensor's mask depends on the seed and
        its name only.
      overwrite: replace an existing ``out`` (default, as mergekit); if False an existing
        non-empty ``out`` is an error.

    Returns:
      :class:`MergeSummary`.

    Raises:
      Every error of :func:`plan_merge` (before anything is written), and errors of the merge
      functions themselves (non-finite results, ...) — then nothing is written either.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    with PeakMemory() as mem:
        plan = plan_merge(config)
        largest = max((c.nbytes(s) for t in plan.tensors
                       for c, s in zip(plan.checkpoints.values(), t.sources, strict=True)),
                      default=0)
        bytes_in = sum(t.nbytes_in for t in plan.tensors)
        written = 0
        if not dry_run:
            if out is None:
                raise ValueError("out: an output directory is needed unless dry_run=True.")
            scale = _scale_for(plan)
            out_dtype = plan.config.out_dtype or plan.config.dtype
            layout = [(t.name, t.shape, t.dtype) for t in plan.tensors]
            bar = tqdm(total=bytes_in, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=f"jmerge {plan.config.merge_method}", disable=not progress)
            with contextlib.ExitStack() as stack:
                writer = stack.enter_context(ShardedWriter(
                    out, plan=layout, max_shard_size=max_shard_size, overwrite=overwrite))
                write = stack.enter_context(_Background(writer.add_part, depth=3))
                prefetch = stack.enter_context(_Background(_touch))
                feed = stack.enter_context(_ChunkFeed(plan))
                views = _views(plan, plan.tensors[0]) if plan.tensors else []
                for i, t in enumerate(plan.tensors):
                    if i + 1 < len(plan.tensors):
                        nxt = _views(plan, plan.tensors[i + 1])
                        prefetch(nxt)
                    for begin, piece, finite in _merge_parts(plan, scale, seed, t, views, feed):
                        if not bool(finite):
                            raise FloatingPointError(
                                f"{plan.config.merge_method}: the merged tensor {t.name!r} has "
                                "NaN or Inf entries; nothing was written."
                            )
                        piece = np.asarray(jax.device_get(piece))
                        if piece.size > _CHUNK:  # a whole tensor: one in flight at most, so
                            write.wait()  # memory stays (inputs + 2) × the largest tensor
                        write(t.name, begin, piece)  # in a thread, while the next one merges
                        del piece
                    written += math.prod(t.shape) * t.dtype.itemsize
                    bar.update(t.nbytes_in)
                    prefetch.wait()
                    if i + 1 < len(plan.tensors):
                        views = nxt
                write.wait()
                _copy_extras(plan, writer, out_dtype)
            bar.close()
    return MergeSummary(
        plan.config.merge_method, None if dry_run else Path(out), len(plan.tensors), bytes_in,
        written, time.perf_counter() - start, mem.peak, mem.baseline, largest, dry_run,
    )
