"""Curvature files next to a model: diagonal Fisher, RegMean Gram and K-FAC factors.

Each kind is one safetensors file (written atomically), by default in the model's directory:

* ``fisher.safetensors``: the diagonal Fisher, one tensor per parameter under the parameter's
  flat name (:func:`jmerge.io.flatten`, e.g. ``params.backbone.dense0.kernel``), shaped like
  it; what :func:`jmerge.curvature.fisher_diag` returns and :func:`jmerge.fisher_merge`
  takes.
* ``gram.safetensors``: ``<kernel name>.gram``, the RegMean input Gram ``G = XᵀX``
  ``(d_in, d_in)`` of each Dense kernel; what :func:`jmerge.curvature.gram` returns (a
  :class:`jmerge.curvature.BlockGram`) and :func:`jmerge.regmean` takes.
* ``kfac.safetensors``: ``<kernel name>.kfac_in`` (``A``, ``(d_in, d_in)``, input
  activations) and ``<kernel name>.kfac_out`` (``B``, ``(d_out, d_out)``, output gradients);
  what :func:`jmerge.curvature.kfac_factors` returns (a :class:`jmerge.curvature.KFAC`).

Tensors are float32 on disk by default (``dtype=None`` keeps the computed dtype). The file's
``__metadata__`` records ``jmerge.curvature`` (the kind), ``jmerge.sep`` and, for Gram and
K-FAC, the operator's ``rest`` (exact ``repr`` of the float) and ``jmerge.paths`` (JSON:
kernel name -> the operator's ``keystr`` key), so that :func:`load_curvature` gives back an
operator with the same keys, ``rest`` and arrays: the round trip is exact for float32
curvatures. Files without that metadata (written by other tools under the same names) are read
with keys ``['a']['b']...`` from the names (dict keys, as in Flax parameters).
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jmerge.curvature import KFAC, BlockGram, Diagonal, fisher_diag, gram, kfac_factors
from jmerge.io.safetensors import (
    CheckpointError,
    SafetensorsCheckpoint,
    flatten,
    save_safetensors,
    unflatten,
)

__all__ = [
    "CURVATURE_KINDS",
    "SavedCurvature",
    "curvature_path",
    "save_curvature",
    "load_curvature",
    "compute_and_save_curvature",
]

PyTree = Any

CURVATURE_KINDS = ("fisher", "gram", "kfac")
_SUFFIX = {"gram": ("gram",), "kfac": ("kfac_in", "kfac_out")}


class SavedCurvature(NamedTuple):
    """What :func:`compute_and_save_curvature` returns: the file and the in-memory curvature."""

    path: Path
    curvature: Any


def _check_kind(kind: str) -> None:
    if kind not in CURVATURE_KINDS:
        raise ValueError(f"kind must be one of {CURVATURE_KINDS}, got {kind!r}.")


def curvature_path(path_or_dir: str | os.PathLike, kind: str) -> Path:
    """The file of curvature ``kind``: ``path_or_dir`` itself if it ends in ``.safetensors``,
    else ``<path_or_dir>/<kind>.safetensors`` (next to the model)."""
    _check_kind(kind)
    p = Path(path_or_dir)
    return p if p.suffix == ".safetensors" else p / f"{kind}.safetensors"


def _kind_of(curvature: Any) -> str:
    if isinstance(curvature, BlockGram):
        return "gram"
    if isinstance(curvature, KFAC):
        return "kfac"
    return "fisher"


_KEY = re.compile(
    r"\[(?P<q>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\]|\[(?P<i>-?\d+)\]|\.(?P<a>\w+)"
)


def _keystr_name(key: str, sep: str) -> str:
    """``"['params']['dense0']['kernel']"`` -> ``"params.dense0.kernel"`` (``keystr`` parsed);
    a key that does not parse is used as it is."""
    parts, pos = [], 0
    for m in _KEY.finditer(key):
        if m.start() != pos:
            return key
        pos = m.end()
        if m.group("q") is not None:
            parts.append(str(ast.literal_eval(m.group("q"))))
        else:
            parts.append(m.group("i") or m.group("a"))
    if pos != len(key) or not parts:
        return key
    return sep.join(parts)


def _name_keystr(name: str, sep: str) -> str:
    """Inverse for dict keys: ``"params.dense0.kernel"`` -> ``"['params']['dense0']['kernel']"``."""
    return "".join(f"[{p!r}]" for p in name.split(sep))


def save_curvature(
    curvature: Any,
    path_or_dir: str | os.PathLike,
    *,
    kind: str | None = None,
    dtype: Any = np.float32,
    sep: str = ".",
    overwrite: bool = False,
) -> Path:
    """Save a curvature as a safetensors file (module docstring), atomically.

    Args:
      curvature: a diagonal Fisher (a pytree shaped like the parameters, or a
        :class:`jmerge.curvature.Diagonal`), a :class:`jmerge.curvature.BlockGram` or a
        :class:`jmerge.curvature.KFAC`.
      path_or_dir: a ``.safetensors`` file, or the model's directory (then
        ``<dir>/<kind>.safetensors``).
      kind: ``"fisher"``, ``"gram"`` or ``"kfac"``; by default from the type of ``curvature``.
      dtype: the on-disk dtype of the floating tensors (float32); None keeps them.
      sep: the name separator.
      overwrite: replace an existing file (atomically); else ``FileExistsError``.

    Returns:
      The file written.

    Raises:
      ValueError: ``kind`` does not match ``curvature``, or names that do not flatten.
      FileExistsError, OSError: as :func:`jmerge.io.save_safetensors`.
    """
    found = _kind_of(curvature)
    kind = kind or found
    _check_kind(kind)
    if kind != found:
        raise ValueError(
            f"save_curvature: kind={kind!r}, but the curvature is a {type(curvature).__name__} "
            f"({found!r})."
        )
    path = curvature_path(path_or_dir, kind)
    meta = {"jmerge.curvature": kind, "jmerge.sep": sep}
    if kind == "fisher":
        tree = curvature.tree if isinstance(curvature, Diagonal) else curvature
        flat = flatten(tree, sep)
    else:
        blocks = curvature.grams if kind == "gram" else curvature.factors
        flat, paths = {}, {}
        for key, value in blocks.items():
            name = _keystr_name(key, sep)
            if name in paths:
                raise ValueError(f"save_curvature: keys {paths[name]!r} and {key!r} share a name.")
            paths[name] = key
            arrays = (value,) if kind == "gram" else tuple(value)
            for suffix, x in zip(_SUFFIX[kind], arrays, strict=True):
                flat[f"{name}{sep}{suffix}"] = x
        meta["jmerge.paths"] = json.dumps(paths)
        meta["jmerge.rest"] = repr(float(jax.device_get(curvature.rest)))
    return save_safetensors(flat, path, metadata=meta, dtype=dtype, overwrite=overwrite)


def load_curvature(
    path_or_dir: str | os.PathLike,
    kind: str | None = None,
    *,
    like: PyTree = None,
) -> Any:
    """Load a curvature file written by :func:`save_curvature`, as the merges take it.

    Args:
      path_or_dir: a ``.safetensors`` file, or the model's directory (then ``kind`` picks
        ``<dir>/<kind>.safetensors``).
      kind: ``"fisher"``, ``"gram"`` or ``"kfac"``; for a file, by default the one recorded
        in it (``"fisher"`` for a file without jmerge metadata).
      like: for a Fisher, a pytree whose structure the result takes (the parameters: lists,
        tuples, FrozenDict...); without it the result is nested ``dict``-s.

    Returns:
      ``"fisher"``: a pytree of ``jax.Array`` shaped like the parameters (for
      :func:`jmerge.fisher_merge`); ``"gram"``: a :class:`jmerge.curvature.BlockGram` (for
      :func:`jmerge.regmean`); ``"kfac"``: a :class:`jmerge.curvature.KFAC`.

    Raises:
      ValueError: a directory without ``kind``; the file holds another kind (file named).
      FileNotFoundError: no such file.
      CheckpointError: a corrupt file, or names that do not fit the kind (file and tensor
        named).
    """
    p = Path(path_or_dir)
    if p.suffix != ".safetensors":
        if kind is None:
            raise ValueError(f"load_curvature: {p} is a directory; pass kind={CURVATURE_KINDS}.")
        p = curvature_path(p, kind)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no curvature file there.")
    ckpt = SafetensorsCheckpoint(p)
    stored = ckpt.metadata.get("jmerge.curvature")
    if kind is not None:
        _check_kind(kind)
    if stored is not None and kind is not None and stored != kind:
        raise ValueError(f"{p} holds a {stored!r} curvature, not {kind!r}.")
    kind = kind or stored or "fisher"
    sep = ckpt.metadata.get("jmerge.sep", ".")
    if kind == "fisher":
        flat = {n: jnp.asarray(ckpt.get(n)) for n in ckpt.names}
        return unflatten(flat, sep, like=like)
    paths = json.loads(ckpt.metadata.get("jmerge.paths", "{}"))
    rest = float(ckpt.metadata.get("jmerge.rest", "1.0"))
    suffixes = _SUFFIX[kind]
    blocks: dict[str, list[Any]] = {}
    for n in ckpt.names:
        base, _, suffix = n.rpartition(sep)
        if suffix not in suffixes or not base:
            raise CheckpointError(
                f"{p}: tensor {n!r} is not a {kind} block (expected names '<kernel>{sep}"
                f"{f'|{sep}'.join(suffixes)}')."
            )
        blocks.setdefault(base, [None] * len(suffixes))[suffixes.index(suffix)] = jnp.asarray(
            ckpt.get(n)
        )
    out = {}
    for base, arrays in blocks.items():
        if any(a is None for a in arrays):
            missing = [s for s, a in zip(suffixes, arrays, strict=True) if a is None]
            raise CheckpointError(f"{p}: kernel {base!r} lacks {missing}.")
        key = paths.get(base, _name_keystr(base, sep))
        out[key] = arrays[0] if kind == "gram" else tuple(arrays)
    return BlockGram(out, rest=rest) if kind == "gram" else KFAC(out, rest=rest)


def compute_and_save_curvature(
    logits_fn: Callable[[chex.ArrayTree, chex.ArrayTree], jax.Array],
    params: chex.ArrayTree,
    inputs: chex.ArrayTree,
    out: str | os.PathLike,
    *,
    kind: str = "fisher",
    labels: jax.Array | None = None,
    fisher_kind: str = "exact",
    key: jax.Array | None = None,
    batch_size: int | None = None,
    dtype: Any = np.float32,
    overwrite: bool = False,
    **kwargs: Any,
) -> SavedCurvature:
    """Compute a model's curvature with :mod:`jmerge.curvature` and save it next to the model.

    * ``kind="fisher"``: :func:`jmerge.curvature.fisher_diag` ``(logits_fn, params, inputs,
      labels, kind=fisher_kind, key=key, batch_size=batch_size, **kwargs)``;
    * ``kind="gram"``: :func:`jmerge.curvature.gram` ``(logits_fn, params, inputs,
      batch_size=batch_size, **kwargs)`` (``normalize``, ``tied``, ``rest``);
    * ``kind="kfac"``: :func:`jmerge.curvature.kfac_factors` ``(logits_fn, params, inputs,
      labels, kind=fisher_kind, key=key, batch_size=batch_size, **kwargs)``.

    For a Flax model, ``logits_fn`` is e.g. ``jmerge.examples.digits.LogitsFn(model)``
    (``model.apply(params, x)``: hashable, so repeated calls compile once).

    Args:
      logits_fn: ``logits_fn(params, x) -> logits`` (see the functions above).
      params: the model's parameters.
      inputs: a batch with a leading example axis.
      out: the model's directory (``<out>/<kind>.safetensors``) or a ``.safetensors`` file.
      kind: ``"fisher"``, ``"gram"`` or ``"kfac"``.
      labels, fisher_kind, key, batch_size: passed on as above.
      dtype, overwrite: as :func:`save_curvature`.
      **kwargs: passed on to the curvature function.

    Returns:
      ``SavedCurvature(path, curvature)``: the file and the curvature as computed (before the
      on-disk cast).
    """
    _check_kind(kind)
    if kind == "fisher":
        c = fisher_diag(
            logits_fn,
            params,
            inputs,
            labels,
            kind=fisher_kind,
            key=key,
            batch_size=batch_size,
            **kwargs,
        )
    elif kind == "gram":
        c = gram(logits_fn, params, inputs, batch_size=batch_size, **kwargs)
    else:
        c = kfac_factors(
            logits_fn,
            params,
            inputs,
            labels,
            kind=fisher_kind,
            key=key,
            batch_size=batch_size,
            **kwargs,
        )
    path = save_curvature(c, out, kind=kind, dtype=dtype, overwrite=overwrite)
    return SavedCurvature(path, c)
