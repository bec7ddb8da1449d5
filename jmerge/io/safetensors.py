"""Hugging Face safetensors checkpoints: zero-copy reading, sharded atomic writing.

**Format** (https://huggingface.co/docs/safetensors, "Format"): an 8-byte little-endian
unsigned header length ``n``; ``n`` bytes of UTF-8 JSON
``{"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}}``
(padded with spaces to a multiple of 8 by the reference writer); then the data region, in which
tensor ``name`` occupies bytes ``[b, e)``, row-major, little-endian. The tensors tile the data
region exactly: no overlaps, no holes, nothing after the last one (the reference reader rejects
anything else, and so does :class:`SafetensorsCheckpoint`).

**Sharded checkpoints** (Hugging Face transformers ``save_pretrained``): the tensors are split
in order into files ``model-00001-of-0000N.safetensors`` of at most ``max_shard_size`` bytes
of tensor data (a tensor larger than that gets a file of its own), and
``model.safetensors.index.json`` holds ``{"metadata": {"total_size": <bytes of all tensors>},
"weight_map": {name: file}}`` (written with ``indent=2, sort_keys=True``). A checkpoint that
fits one shard is one ``model.safetensors`` and no index. Every file's ``__metadata__`` holds
``{"format": "pt"}``, which transformers requires to load it.

**Names**: a nested parameter dict maps to flat names by joining the keys with ``"."``
(``{"model": {"layers": {"0": {"mlp": ...}}}}`` ↔ ``model.layers.0.mlp...``); see
:func:`flatten` / :func:`unflatten`. Flax's ``{"params": ...}`` trees keep their ``params.``
prefix.

**Dtypes**: bf16 (``ml_dtypes.bfloat16``), fp16, fp32, fp64, fp8 (E4M3, E5M2), the signed
and unsigned integers and bool are read and written as they are on disk; nothing is upcast on
write (merges compute in float32 and cast back, :mod:`jmerge.tree`).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import math
import mmap
import os
import re
import shutil
import sys
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import jax
import ml_dtypes
import numpy as np

from jmerge.io._atomic import StagedDir, atomic_write, describe, temp_name

__all__ = [
    "CheckpointError",
    "DTYPES",
    "flatten",
    "unflatten",
    "parse_size",
    "SafetensorsCheckpoint",
    "load_safetensors",
    "save_safetensors",
    "ShardedWriter",
    "INDEX_NAME",
    "WEIGHTS_NAME",
]

PyTree = Any

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100_000_000  # the reference implementation's limit on the JSON header
# Files that sit next to a model but are not part of it (jmerge.io.curvature_files); skipped
# when a directory without an index is read as "every *.safetensors file".
_NOT_MODEL_FILES = frozenset({"fisher.safetensors", "gram.safetensors", "kfac.safetensors"})

#: safetensors dtype names and the NumPy dtypes they are read as.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# ml_dtypes' floats are not np.floating subtypes.
_FLOATS = frozenset({DTYPES["F16"], DTYPES["BF16"], DTYPES["F32"], DTYPES["F64"]}) | {
    DTYPES["F8_E4M3"],
    DTYPES["F8_E5M2"],
}


def _is_float(dt: Any) -> bool:
    dt = np.dtype(dt)
    return dt in _FLOATS or np.issubdtype(dt, np.floating)

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("jmerge.io.safetensors maps files directly and needs a little-endian host.")


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, truncated or inconsistent; the message names the file and,
    where one is at fault, the tensor."""


# ------------------------------------------------------------------------------------- names


def _key_name(k: Any) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)  # pragma: no cover - custom key types


def flatten(params: PyTree, sep: str = ".") -> dict[str, Any]:
    """Flat names for the leaves of a pytree: ``{"a": {"b": [x, y]}}`` -> ``{"a.b.0": x,
    "a.b.1": y}``.

    Dict keys are used as they are (``str(key)``), list/tuple indices as digits, dataclass /
    NamedTuple fields by name; leaves are returned as they are (no copy, no conversion), in
    the pytree's leaf order (``jax.tree_util``: sorted dict keys). ``None`` leaves (empty
    subtrees) have no name.

    Raises:
      ValueError: a key is empty or contains ``sep`` (its name could not be split back), or
        two leaves get the same name (e.g. dict keys ``0`` and ``"0"``); the message gives the
        ``keystr`` path.
    """
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        parts = [_key_name(k) for k in path]
        for p in parts:
            if p == "" or sep in p:
                raise ValueError(
                    f"flatten: params{jax.tree_util.keystr(path)} has the key {p!r}, which "
                    + ("is empty" if p == "" else f"contains the separator {sep!r}")
                    + "; its flat name would not split back into the same keys (choose another "
                    "sep or rename the key)."
                )
        name = sep.join(parts) if parts else ""
        if name == "":
            raise ValueError("flatten: params is a single leaf; a flat name needs a dict.")
        if name in flat:
            raise ValueError(
                f"flatten: params{where[name]} and params{jax.tree_util.keystr(path)} both "
                f"flatten to {name!r}."
            )
        flat[name] = leaf
        where[name] = jax.tree_util.keystr(path)
    return flat


def unflatten(flat: Mapping[str, Any], sep: str = ".", *, like: PyTree = None) -> PyTree:
    """Inverse of :func:`flatten`: nest ``{"a.b.0": x}`` as ``{"a": {"b": {"0": x}}}``.

    Without ``like`` every node is a ``dict`` with ``str`` keys (a list of layers comes back as
    a dict with keys ``"0"``, ``"1"``, ...; a Flax ``{"params": ...}`` tree of dicts round-trips
    exactly). With ``like`` (any pytree, e.g. the parameters or their
    ``jax.ShapeDtypeStruct``-s) the result has ``like``'s structure (lists, tuples, FrozenDict,
    NNX state), and the names and shapes must match ``like``'s.

    Raises:
      ValueError: a name has an empty part (``"a..b"``); one name is a prefix of another so
        that a tensor would have to be a subtree (``"a.b"`` and ``"a.b.c"``); with ``like``,
        names missing or in excess, or a tensor whose shape differs, named.
    """
    if like is not None:
        ref = flatten(like, sep)
        missing = [n for n in ref if n not in flat]
        extra = [n for n in flat if n not in ref]
        if missing or extra:
            raise ValueError(
                "unflatten: the names do not match `like`: "
                + (f"missing {_short(missing)}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"not in `like`: {_short(extra)}" if extra else "")
                + "."
            )
        for n, r in ref.items():
            if tuple(np.shape(flat[n])) != tuple(np.shape(r)):
                raise ValueError(
                    f"unflatten: tensor {n!r} has shape {tuple(np.shape(flat[n]))}, `like` has "
                    f"{tuple(np.shape(r))}."
                )
        treedef = jax.tree_util.tree_structure(like)
        return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in ref])

    out: dict[str, Any] = {}
    leaf_at: dict[tuple[str, ...], str] = {}  # prefix -> the name that put a tensor there
    node_of: dict[tuple[str, ...], str] = {}  # prefix -> a name that made it a subtree
    for name, value in flat.items():
        parts = tuple(name.split(sep))
        if any(p == "" for p in parts):
            raise ValueError(f"unflatten: the name {name!r} has an empty part (split on {sep!r}).")
        for i in range(1, len(parts)):
            if parts[:i] in leaf_at:
                raise ValueError(
                    f"unflatten: {name!r} needs {sep.join(parts[:i])!r} to be a subtree, but "
                    f"{leaf_at[parts[:i]]!r} is a tensor there."
                )
            node_of.setdefault(parts[:i], name)
        if parts in node_of:
            raise ValueError(
                f"unflatten: {name!r} is a tensor, but {node_of[parts]!r} needs it to be a "
                "subtree."
            )
        leaf_at[parts] = name
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _short(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _is_leaf_value(x: Any) -> bool:
    return not isinstance(x, (Mapping, list, tuple)) and x is not None


def _as_flat(params_or_flat: Any, sep: str) -> dict[str, Any]:
    """A flat ``{name: array}`` dict as is (names may contain ``sep``), else :func:`flatten`."""
    if (
        isinstance(params_or_flat, Mapping)
        and params_or_flat
        and all(isinstance(k, str) for k in params_or_flat)
        and all(_is_leaf_value(v) for v in params_or_flat.values())
    ):
        return dict(params_or_flat)
    return flatten(params_or_flat, sep)


# ------------------------------------------------------------------------------------- sizes

_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like Hugging Face's: ``"500MB"`` = 500·10⁶, ``"5GB"`` =
    5·10⁹, ``"2GiB"`` = 2·2³⁰, ``"1.5GB"``, ``"123"``.

    Raises:
      ValueError: not a positive size.
    """
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        value = int(size)
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", size)
        unit = m.group(2).upper() if m else None
        if m is None or (unit and unit not in _UNITS):
            raise ValueError(
                f"max_shard_size {size!r} is not a size; use bytes (an int) or a number with a "
                "unit: B, KB, MB, GB, TB (powers of 10) or KiB, MiB, GiB, TiB (powers of 2)."
            )
        value = int(float(m.group(1)) * _UNITS[unit or "B"])
    else:
        raise ValueError(f"max_shard_size must be an int or a string like '5GB', got {size!r}.")
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}.")
    return value


# ------------------------------------------------------------------------------------ reading


class _Entry(NamedTuple):
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # offsets in the data region
    end: int


class _Header(NamedTuple):
    path: Path
    data_start: int  # 8 + header length
    data_size: int
    entries: dict[str, _Entry]  # in data-offset order
    metadata: dict[str, str]


def _read_header(path: Path) -> _Header:
    """Parse and validate the header of one safetensors file (module docstring)."""

    def fail(msg: str) -> CheckpointError:
        return CheckpointError(f"{path}: {msg}")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise fail(f"truncated: {size} bytes, shorter than the 8-byte header length.")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise fail(
                f"header length {n} runs past the end of the file ({size} bytes): truncated, "
                "or not a safetensors file."
            )
        if n > _MAX_HEADER:
            raise fail(f"header length {n} exceeds the format's limit of {_MAX_HEADER} bytes.")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise fail(f"the header is not valid UTF-8 JSON ({e}).") from None
    if not isinstance(header, dict):
        raise fail(f"the header is a JSON {type(header).__name__}, expected an object.")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise fail(f"__metadata__ must map strings to strings, got {meta!r}.")
    entries = {}
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise fail(f"tensor {name!r}: expected {{dtype, shape, data_offsets}}, got {info!r}.")
        dt = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dt is None:
            raise fail(
                f"tensor {name!r} has the unknown or unsupported dtype {info['dtype']!r} "
                f"(supported: {', '.join(DTYPES)})."
            )
        shape, offs = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise fail(f"tensor {name!r} has an invalid shape {shape!r}.")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise fail(f"tensor {name!r} has invalid data_offsets {offs!r}.")
        want = math.prod(shape) * dt.itemsize
        if offs[1] - offs[0] != want:
            raise fail(
                f"tensor {name!r}: data_offsets {offs} hold {offs[1] - offs[0]} bytes, but shape "
                f"{tuple(shape)} of {info['dtype']} needs {want}."
            )
        entries[name] = _Entry(dt, tuple(shape), offs[0], offs[1])
    ordered = sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end))
    pos, prev = 0, None
    for name, e in ordered:
        if e.begin < pos:
            raise fail(
                f"tensor {name!r} (bytes [{e.begin}, {e.end}) of the data) overlaps tensor "
                f"{prev!r}, which ends at {pos}."
            )
        if e.begin > pos:
            raise fail(
                f"bytes [{pos}, {e.begin}) of the data, before tensor {name!r}, belong to no "
                "tensor (invalid offsets)."
            )
        pos, prev = e.end, name
    data_size = size - 8 - n
    if pos > data_size:
        name, e = next((k, e) for k, e in ordered if e.end > data_size)
        raise fail(
            f"truncated: tensor {name!r} needs bytes up to {8 + n + e.end}, the file has {size}."
        )
    if pos < data_size:
        raise fail(
            f"{data_size - pos} bytes after the last tensor {prev!r} belong to no tensor "
            "(invalid offsets or a corrupt file)."
        )
    return _Header(path, 8 + n, data_size, dict(ordered), meta)


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index}: not valid JSON ({e}).") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in wm.items()
    ):
        raise CheckpointError(f"{index}: expected {{'weight_map': {{tensor name: file name}}}}.")
    for name, file in wm.items():
        if Path(file).name != file or file in ("", ".", ".."):
            raise CheckpointError(
                f"{index}: tensor {name!r} maps to {file!r}, which is not a file name in the "
                "checkpoint's directory."
            )
    return wm


def _resolve(path: Path) -> tuple[list[Path], Path | None, dict[str, str] | None]:
    """``(files, index path or None, weight_map or None)`` for a file, index or directory."""
    if path.is_file():
        if path.name.endswith(".index.json"):
            wm = _read_index(path)
            return [path.parent / f for f in sorted(set(wm.values()))], path, wm
        return [path], None, None
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory.")
    index = path / INDEX_NAME
    if not index.is_file():
        others = sorted(path.glob("*.safetensors.index.json"))
        index = others[0] if len(others) == 1 else None
    if index is not None:
        return _resolve(index)
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME], None, None
    files = sorted(p for p in path.glob("*.safetensors") if p.name not in _NOT_MODEL_FILES)
    if not files:
        raise FileNotFoundError(
            f"{path}: no {INDEX_NAME}, no {WEIGHTS_NAME} and no other *.safetensors file."
        )
    return files, None, None


_MAPPED: dict[int, tuple[Path, int, int]] = {}
"""Data regions of the files :class:`SafetensorsCheckpoint` has mapped: the address of the
mapping -> (file, offset of the data region, its size). Read by :func:`file_region`."""


def file_region(x: np.ndarray) -> tuple[Path, int] | None:
    """(file, byte offset) of a C-contiguous array that views a file mapped by
    :meth:`SafetensorsCheckpoint.get`, else None: the streaming merge reads such tensors with
    ``pread`` into its chunk buffers (no page faults, one copy) instead of copying from the
    mapping."""
    if not isinstance(x, np.ndarray) or not x.flags.c_contiguous:
        return None
    ptr = x.ctypes.data
    for start, (path, data_start, size) in _MAPPED.items():
        if start <= ptr and ptr + x.nbytes <= start + size:
            return path, data_start + (ptr - start)
    return None


class SafetensorsCheckpoint:
    """A safetensors checkpoint opened for reading; tensors are zero-copy memory-mapped views.

    ``path`` is one ``.safetensors`` file, a ``*.safetensors.index.json`` file, or a directory:
    read through ``model.safetensors.index.json`` if present (or the one
    ``*.safetensors.index.json``), else ``model.safetensors``, else every ``*.safetensors``
    file in it (jmerge's curvature files excepted). Every header is parsed and validated
    when the checkpoint is opened (module docstring: offsets must tile each data region and
    the file must be as long as they say); the index must agree with the shards' headers.

    :meth:`get` returns a read-only ``np.ndarray`` viewing an ``np.memmap`` of the file: no
    bytes are copied or read until used, and the pages live in the page cache, not in the
    process's anonymous memory. Views stay valid after the checkpoint object is dropped (they
    hold the mapping), and after the file is atomically replaced (they keep the old inode).

    Attributes:
      path: as given.
      files: the safetensors files, in order.
      names: every tensor name, file by file in data-offset order (the order that reads each
        file sequentially).
      metadata: the ``__metadata__`` of the first file (``{"format": "pt"}`` for
        transformers checkpoints).
      index_path: the index file, or None.

    Raises:
      FileNotFoundError: no such file, or a directory without safetensors files.
      CheckpointError: a corrupt, truncated or inconsistent file, naming it and the tensor; a
        tensor name in two files; an index naming a missing file or a tensor its file lacks.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        files, self.index_path, weight_map = _resolve(self.path)
        headers = []
        for f in files:
            if not f.is_file():
                holds = [n for n, v in (weight_map or {}).items() if v == f.name]
                raise CheckpointError(
                    f"{self.index_path}: shard file {f.name} (holding {_short(holds)}) does not "
                    "exist."
                )
            headers.append(_read_header(f))
        self.files: list[Path] = files
        self._headers = headers
        self._where: dict[str, tuple[int, _Entry]] = {}
        for i, h in enumerate(headers):
            for name, e in h.entries.items():
                if name in self._where:
                    other = headers[self._where[name][0]].path
                    raise CheckpointError(f"tensor {name!r} is in both {other} and {h.path}.")
                self._where[name] = (i, e)
        if weight_map is not None:
            for name, fname in weight_map.items():
                where = self._where.get(name)
                if where is None or headers[where[0]].path.name != fname:
                    raise CheckpointError(
                        f"{self.index_path} maps tensor {name!r} to {fname}, which has no "
                        "tensor of that name."
                    )
            extra = [n for n in self._where if n not in weight_map]
            if extra:
                raise CheckpointError(
                    f"{self.index_path} does not list the tensors {_short(extra)}, which are "
                    f"in {headers[self._where[extra[0]][0]].path}."
                )
        self.names: tuple[str, ...] = tuple(self._where)
        self.metadata: dict[str, str] = dict(headers[0].metadata) if headers else {}
        self._maps: dict[int, np.memmap] = {}
        self._maps_lock = threading.Lock()  # get() runs in the streaming reader thread too

    def _entry(self, name: str) -> tuple[int, _Entry]:
        try:
            return self._where[name]
        except KeyError:
            raise KeyError(
                f"{name!r} is not a tensor of {self.path} ({len(self.names)} tensors, e.g. "
                f"{_short(self.names, 3)})."
            ) from None

    def file(self, name: str) -> Path:
        """The file that holds tensor ``name``."""
        return self._headers[self._entry(name)[0]].path

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name``."""
        return self._entry(name)[1].shape

    def dtype(self, name: str) -> np.dtype:
        """The NumPy dtype of tensor ``name`` (bf16 as ``ml_dtypes.bfloat16``)."""
        return self._entry(name)[1].dtype

    def nbytes(self, name: str) -> int:
        """The size of tensor ``name`` on disk, in bytes."""
        e = self._entry(name)[1]
        return e.end - e.begin

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only view into a memory map of its file (no copy).

        Raises:
          KeyError: no such tensor.
          CheckpointError: the file shrank since it was opened (naming file and tensor).
        """
        i, e = self._entry(name)
        h = self._headers[i]
        if e.end == e.begin:
            out = np.empty(e.shape, e.dtype)
            out.flags.writeable = False
            return out
        with self._maps_lock:
            mm = self._maps.get(i)
            if mm is None:
                if h.path.stat().st_size < h.data_start + h.data_size:
                    raise CheckpointError(
                        f"{h.path}: truncated since it was opened; cannot read tensor {name!r}."
                    )
                mm = np.memmap(h.path, np.uint8, "r", offset=h.data_start, shape=(h.data_size,))
                self._maps[i] = mm
                _MAPPED[mm.ctypes.data] = (h.path, h.data_start, h.data_size)
                # Forget the address when the mapping goes (views keep it alive until then).
                weakref.finalize(mm, _MAPPED.pop, mm.ctypes.data, None)
        return mm[e.begin : e.end].view(np.ndarray).view(e.dtype).reshape(e.shape)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return (
            f"SafetensorsCheckpoint({str(self.path)!r}, {len(self.names)} tensors in "
            f"{len(self.files)} file(s))"
        )


def load_safetensors(
    path: str | os.PathLike,
    *,
    nested: bool = True,
    dtype: Any = None,
    like: PyTree = None,
    sep: str = ".",
    copy: bool = False,
) -> PyTree:
    """Read a safetensors checkpoint (file, index or directory) into NumPy arrays.

    Args:
      path: as :class:`SafetensorsCheckpoint`.
      nested: return a nested dict (:func:`unflatten`), else the flat ``{name: array}`` dict
        in :attr:`SafetensorsCheckpoint.names` order.
      dtype: if given, floating tensors are cast to it (e.g. ``np.float32`` for arithmetic);
        integer and bool tensors are kept.
      like: a pytree to restore the structure of (:func:`unflatten` with ``like``; names and
        shapes must match).
      sep: the name separator.
      copy: return writable in-memory copies instead of read-only memory-mapped views.

    Returns:
      The tensors as ``np.ndarray`` (read-only views into the files unless ``copy`` or a cast
      made a copy).

    Raises:
      FileNotFoundError, CheckpointError: as :class:`SafetensorsCheckpoint`.
      ValueError: names that do not nest (:func:`unflatten`) or do not match ``like``.
    """
    ckpt = SafetensorsCheckpoint(path)
    flat = {}
    for name in ckpt.names:
        x = ckpt.get(name)
        if dtype is not None and _is_float(x.dtype):
            x = x.astype(dtype)
        if copy and not x.flags.writeable:
            x = np.array(x)
        flat[name] = x
    if like is not None:
        return unflatten(flat, sep, like=like)
    return unflatten(flat, sep) if nested else flat


# ------------------------------------------------------------------------------------ writing


class _Spec(NamedTuple):
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _dtype_of(x: Any) -> np.dtype:
    dt = getattr(x, "dtype", None)
    return np.dtype(dt) if dt is not None else np.asarray(x).dtype


def _spec(name: Any, shape: Any, dtype: Any) -> _Spec:
    if not isinstance(name, str) or not name:
        raise ValueError(f"tensor name must be a non-empty str, got {name!r}.")
    try:
        shape = tuple(int(d) for d in shape)
    except TypeError:
        raise ValueError(
            f"tensor {name!r}: shape must be a sequence of ints, got {shape!r}."
        ) from None
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor {name!r}: negative dimension in {shape}.")
    dt = np.dtype(dtype)
    if dt not in _DTYPE_NAMES:
        raise ValueError(
            f"tensor {name!r} has dtype {dt}, which safetensors cannot store (supported: "
            f"{', '.join(str(d) for d in _DTYPE_NAMES)})."
        )
    return _Spec(name, shape, dt)


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    meta = {"format": "pt"}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(
                f"metadata must map str to str (safetensors __metadata__), got {k!r}: {v!r}."
            )
        meta[k] = v
    return meta


def _host(spec: _Spec, array: Any) -> np.ndarray:
    """``array`` on the host as a C-contiguous array of ``spec``'s dtype and shape.

    A floating array is cast to a floating ``spec.dtype`` (round to nearest); any other dtype
    difference, and any shape difference, is an error naming the tensor.
    """
    x = np.asarray(jax.device_get(array))
    if tuple(x.shape) != spec.shape:
        raise ValueError(f"tensor {spec.name!r} has shape {tuple(x.shape)}, planned {spec.shape}.")
    if x.dtype != spec.dtype:
        if not (_is_float(x.dtype) and _is_float(spec.dtype)):
            raise ValueError(
                f"tensor {spec.name!r} has dtype {x.dtype}, planned {spec.dtype} (only floating "
                "tensors are cast)."
            )
        x = x.astype(spec.dtype)
    return np.asarray(x, order="C")


def _write_array(f: IO[bytes], x: np.ndarray) -> None:
    if x.size:
        f.write(x.reshape(-1).view(np.uint8).data)


def _header_bytes(layout: Sequence[tuple[_Spec, int]], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length and the JSON header (space-padded to a multiple of 8), tensors in
    ``layout`` = ``[(spec, begin offset)]``."""
    h: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    for s, b in layout:
        h[s.name] = {
            "dtype": _DTYPE_NAMES[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [b, b + s.nbytes],
        }
    raw = json.dumps(h, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


_WRITEBACK_MIN = 1 << 20


@functools.cache
def _sync_file_range():
    """libc's ``sync_file_range`` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing ``[offset, offset + nbytes)`` of ``fd`` to disk without waiting
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, Linux; elsewhere nothing), so that the fsync
    before the atomic rename finds most of the file already on its way (as RocksDB's
    ``bytes_per_sync``). Durability still comes from that fsync; errors here are ignored."""
    fn = _sync_file_range()
    if fn is not None:
        fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE


def _close_quietly(f: IO[bytes]) -> None:
    try:
        f.close()
    except OSError:
        pass  # the file is being discarded; the first error is the one reported


_BLOCK = 4096
_DIRECT_CHUNK = 16 << 20


def _aligned_buffer(nbytes: int) -> np.ndarray:
    """``nbytes`` of page-aligned memory (an anonymous mmap), as uint8."""
    return np.frombuffer(mmap.mmap(-1, nbytes), np.uint8)


class _DirectFile:
    """A file of known size, written once in pieces at any offsets, with ``O_DIRECT``.

    Why: the output of a file merge is written once and not read back by this process, and
    copying it into the page cache costs more than the merge itself on some machines
    (measured on the project's VM: 1.6-1.7 s for 680 MB buffered, 0.31 s with O_DIRECT, whose
    data is then on disk: the fsync before the atomic rename has nothing left to do).

    O_DIRECT needs offsets, lengths and memory aligned to the device's blocks: the aligned
    middle of every piece is copied into one page-aligned 16 MiB buffer and written from
    there; the unaligned ends are kept in 4 KiB block buffers until the neighbouring pieces
    complete them (every byte of the file is written exactly once, so a block is complete when
    its byte count is); the last block is written padded and :meth:`finish` truncates the
    file to its size. :meth:`open` returns None where the filesystem has no O_DIRECT
    (tmpfs, some network filesystems, non-Linux): the caller writes through the page cache.
    """

    def __init__(self, fd: int, path: Path, size: int):
        self.fd, self.path, self.size = fd, path, size
        self.buffered = False  # after an EINVAL from an O_DIRECT write
        self.done = 0
        self.partial: dict[int, tuple[bytearray, int]] = {}
        self.buf = _aligned_buffer(_DIRECT_CHUNK)

    @classmethod
    def open(cls, path: Path, size: int) -> _DirectFile | None:
        flag = getattr(os, "O_DIRECT", 0)
        if not flag or size < _DIRECT_CHUNK:  # small files: the page cache is fine
            return None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flag, 0o644)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return None
            raise
        return cls(fd, path, size)

    def _pwrite(self, data, offset: int) -> None:
        view = memoryview(data)
        while view.nbytes:
            try:
                n = os.pwrite(self.fd, view, offset)
            except OSError as e:
                # A filesystem that takes O_DIRECT at open but wants another alignment:
                # go on through the page cache (what was written stays; blocks still held
                # are written as they are completed).
                if e.errno != errno.EINVAL or self.buffered:
                    raise
                self._reopen_buffered()
                continue
            view, offset = view[n:], offset + n

    def _reopen_buffered(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        os.close(self.fd)
        self.fd, self.buffered = fd, True

    def _block(self, offset: int, data: np.ndarray) -> None:
        """Bytes inside one block: into its buffer; written when the block is complete."""
        i, start = divmod(offset, _BLOCK)
        buf, filled = self.partial.pop(i, None) or (bytearray(_BLOCK), 0)
        buf[start : start + data.size] = data.tobytes()
        filled += data.size
        if filled < min(_BLOCK, self.size - i * _BLOCK):
            self.partial[i] = (buf, filled)
            return
        self.buf[:_BLOCK] = np.frombuffer(buf, np.uint8)
        self._pwrite(self.buf[:_BLOCK], i * _BLOCK)

    def pwrite(self, data: np.ndarray, offset: int) -> None:
        """Write the bytes ``data`` (uint8, 1-D) at ``offset``."""
        end = offset + data.size
        if end > self.size:
            raise CheckpointError(f"{self.path}: a write past the planned size {self.size}.")
        lo = -(-offset // _BLOCK) * _BLOCK  # first block boundary at or after offset
        hi = max(lo, end // _BLOCK * _BLOCK)  # last block boundary at or before end
        for a, b in ((offset, min(lo, end)), (max(hi, offset), end)):  # the unaligned ends
            while a < b:
                cut = min(b, (a // _BLOCK + 1) * _BLOCK)
                self._block(a, data[a - offset : cut - offset])
                a = cut
        for a in range(lo, hi, _DIRECT_CHUNK):  # the aligned middle
            b = min(hi, a + _DIRECT_CHUNK)
            self.buf[: b - a] = data[a - offset : b - offset]
            self._pwrite(self.buf[: b - a], a)
        self.done += data.size

    def finish(self) -> None:
        """Truncate to the size (the last block was written padded), fsync and close."""
        if self.partial or self.done != self.size:  # pragma: no cover - guarded by `pending`
            raise CheckpointError(f"{self.path}: wrote {self.done} of {self.size} bytes.")
        os.ftruncate(self.fd, self.size)  # the last block was written padded
        os.fsync(self.fd)
        self.close()

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class _Shard:
    """One file whose tensors are known in advance: the header goes first, each tensor is
    written straight to its place (in any order). Tensors are laid out by decreasing dtype
    size (stable), as the reference writer does, so that every tensor is aligned to its
    itemsize in the file."""

    def __init__(self, path: Path, specs: Sequence[_Spec], metadata: Mapping[str, str]):
        self.path = path
        self.specs = list(specs)
        order = sorted(self.specs, key=lambda s: -s.dtype.itemsize)
        layout, pos = [], 0
        for s in order:
            layout.append((s, pos))
            pos += s.nbytes
        self.offsets = {s.name: b for s, b in layout}
        self.header = _header_bytes(layout, metadata)
        self.size = len(self.header) + pos
        self.pending = {s.name for s in self.specs}
        self.f: IO[bytes] | None = None
        self.direct: _DirectFile | None = None

    def open(self, f: IO[bytes] | None = None) -> None:
        if f is None:
            self.direct = _DirectFile.open(self.path, self.size)
            if self.direct is not None:
                self.direct.pwrite(np.frombuffer(self.header, np.uint8), 0)
                return
        self.f = f if f is not None else open(self.path, "xb")  # noqa: SIM115
        self.f.write(self.header)

    def write(self, name: str, x: np.ndarray, start: int = 0) -> None:
        """Write ``x`` as tensor ``name``'s entries from flat index ``start`` on."""
        if self.f is None and self.direct is None:
            self.open()
        begin = len(self.header) + self.offsets[name] + start * x.itemsize
        if self.direct is not None:
            self.direct.pwrite(x.reshape(-1).view(np.uint8), begin)
            return
        assert self.f is not None
        self.f.seek(begin)
        _write_array(self.f, x)
        if x.nbytes >= _WRITEBACK_MIN:
            self.f.flush()
            _start_writeback(self.f.fileno(), begin, x.nbytes)

    def finish(self, own: bool = True) -> None:
        """Flush, fsync and (if ``own``) close; the file is then complete."""
        if self.f is None and self.direct is None:
            self.open()
        if self.direct is not None:
            direct, self.direct = self.direct, None
            direct.finish()
            return
        assert self.f is not None
        self.f.seek(0, os.SEEK_END)
        if self.f.tell() != self.size:  # pragma: no cover - guarded by `pending`
            raise CheckpointError(
                f"{self.path}: wrote {self.f.tell()} bytes, expected {self.size}."
            )
        self.f.flush()
        os.fsync(self.f.fileno())
        if own:
            self.f.close()
        self.f = None

    def close_quietly(self) -> None:
        """Close without raising: closing flushes the buffer, which fails again on a full disk
        and would hide the error that named the file and tensor."""
        if self.direct is not None:
            direct, self.direct = self.direct, None
            try:
                direct.close()
            except OSError:
                pass
        if self.f is not None:
            f, self.f = self.f, None
            _close_quietly(f)


def _split(specs: Sequence[_Spec], max_bytes: int) -> list[list[_Spec]]:
    """Hugging Face's shard split: in order, a new shard when the next tensor would take the
    current one over ``max_bytes``; a tensor larger than that gets a shard of its own."""
    shards: list[list[_Spec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def _shard_names(filename: str, n: int) -> list[str]:
    if n == 1:
        return [filename]
    stem = filename[: -len(".safetensors")] if filename.endswith(".safetensors") else filename
    return [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _index_bytes(total: int, weight_map: Mapping[str, str]) -> bytes:
    index = {"metadata": {"total_size": total}, "weight_map": dict(weight_map)}
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8")


class ShardedWriter:
    """Write a (sharded) safetensors checkpoint directory tensor by tensor, atomically.

    Everything is written into a hidden staging directory next to ``out``
    (:attr:`stage_dir`); on :meth:`close` (or leaving the ``with`` block without an error) the
    index is written and the directory is swapped in atomically
    (:class:`jmerge.io._atomic.StagedDir`); on an error (or :meth:`abort`) the staging
    directory is deleted and ``out`` is left as it was. The result has the layout Hugging Face
    transformers writes (module docstring): ``model.safetensors`` alone if everything fits in
    one shard, else ``model-0000i-of-0000N.safetensors`` and ``model.safetensors.index.json``.

    Two modes:

    * ``plan=[(name, shape, dtype), ...]`` (preferred): the shards and every header are known
      up front, so each tensor is written straight to its place in its shard file (in any
      order); memory is one tensor. Each shard file is fsync-ed and closed as soon as its last
      tensor arrives. :meth:`add` casts a floating array to the planned floating dtype (e.g.
      float32 results to bf16) and requires the planned shape.
    * no plan: tensors are appended to a temporary data file of the current shard; when the
      next tensor would overflow it, the shard file is made (header, then a copy of the data
      file). Same memory, one extra copy on disk; tensors keep their order (not aligned).

    Usage::

        plan = [(n, ckpt.shape(n), ckpt.dtype(n)) for n in ckpt.names]
        with ShardedWriter(out, plan=plan, max_shard_size="2GB", overwrite=True) as w:
            for n in ckpt.names:
                w.add(n, merge_one(n))
            w.copy_in(src_dir / "config.json")

    Args:
      out: the output directory.
      plan: the tensors to come, or None.
      max_shard_size: bytes of tensor data per shard, an int or a string (:func:`parse_size`),
        default ``"5GB"`` as transformers.
      metadata: extra ``__metadata__`` entries (str -> str) for every file, on top of
        ``{"format": "pt"}``.
      filename: the single-file name; shard and index names derive from it as in
        transformers (``model.safetensors`` -> ``model-00001-of-00002.safetensors``,
        ``model.safetensors.index.json``).
      overwrite: replace an existing non-empty ``out`` (as a whole; copy what must be kept into
        the stage with :meth:`copy_in`). If False that is a ``FileExistsError``, raised here.

    Raises:
      ValueError: an invalid plan (duplicate name, unsupported dtype), size or metadata.
      FileExistsError, NotADirectoryError: see ``overwrite``.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        *,
        plan: Iterable[tuple[str, Sequence[int], Any]] | None = None,
        max_shard_size: int | str = "5GB",
        metadata: Mapping[str, str] | None = None,
        filename: str = WEIGHTS_NAME,
        overwrite: bool = False,
    ):
        self.max_shard_size = parse_size(max_shard_size)
        self.metadata = _check_metadata(metadata)
        if not filename.endswith(".safetensors") or Path(filename).name != filename:
            raise ValueError(f"filename must be a '*.safetensors' file name, got {filename!r}.")
        self.filename = filename
        self._specs: dict[str, _Spec] | None = None
        if plan is not None:
            specs: dict[str, _Spec] = {}
            for item in plan:
                s = _spec(*item)
                if s.name in specs:
                    raise ValueError(f"plan: tensor {s.name!r} appears twice.")
                specs[s.name] = s
            self._specs = specs
        self._stage = StagedDir(out, overwrite=overwrite)
        self.out = self._stage.final
        self._done = False
        self._written: set[str] = set()
        self._parts: dict[str, int] = {}  # add_part: entries added so far, per open tensor
        self._reserved = {f"{filename}.index.json"}
        if self._specs is not None:
            groups = _split(list(self._specs.values()), self.max_shard_size)
            names = _shard_names(filename, len(groups))
            self._shards = [
                _Shard(self.stage_dir / fn, g, self.metadata)
                for fn, g in zip(names, groups, strict=True)
            ]
            self._shard_of = {s.name: sh for sh in self._shards for s in sh.specs}
            self._reserved |= set(names)
        else:
            self._shards = []
            self._cur: list[_Spec] = []
            self._cur_size = 0
            self._data: IO[bytes] | None = None
            self._free: list[tuple[Path, list[_Spec]]] = []

    @property
    def stage_dir(self) -> Path:
        """The staging directory: files put here (config.json, tokenizer files) are committed
        together with the tensors."""
        return self._stage.path

    def copy_in(self, src: str | os.PathLike, name: str | None = None) -> Path:
        """Copy the file ``src`` into the staging directory (as ``name``, default its name).

        Raises:
          ValueError: ``name`` is one of the checkpoint's own files.
        """
        name = name or Path(src).name
        if name in self._reserved or (self._specs is None and name.endswith(".safetensors")):
            raise ValueError(f"copy_in: {name!r} would clobber a file of the checkpoint.")
        return Path(shutil.copy2(src, self.stage_dir / name))

    def add(self, name: str, array: Any) -> None:
        """Write tensor ``name`` (any array: NumPy, JAX, memory-mapped view).

        Raises:
          ValueError: with a plan, ``name`` is not in it, was already added, or has another
            shape or a non-floating dtype that differs; without a plan, a duplicate name or an
            unsupported dtype. The error names the tensor.
          OSError: the disk is full or a file-size limit was hit (the file is named); the
            staging directory is then removed (``out`` is untouched) and the writer is closed.
        """
        self._check_open(name)
        try:
            if self._specs is not None:
                spec = self._planned(name)
                if name in self._parts:
                    raise ValueError(f"tensor {name!r}: {self._parts[name]} of "
                                     f"{math.prod(spec.shape)} entries were added with "
                                     "add_part.")
                self._write(spec, _host(spec, array), 0)
            else:
                x = np.asarray(jax.device_get(array), order="C")
                spec = _spec(name, x.shape, x.dtype)
                if self._cur and self._cur_size + spec.nbytes > self.max_shard_size:
                    self._flush_free()
                if self._data is None:
                    self._data = open(temp_name(self.stage_dir / "shard", "data"), "xb")  # noqa: SIM115
                _write_array(self._data, x)
                self._cur.append(spec)
                self._cur_size += spec.nbytes
        except OSError as e:
            self.abort()
            raise describe(e, self.out, name) from e
        self._written.add(name)

    def add_part(self, name: str, start: int, array: Any) -> None:
        """Write entries ``[start, start + array.size)`` of tensor ``name`` (flat, C order):
        a tensor streamed in pieces, with a plan only. Parts come in order: ``start`` is the
        number of entries added so far (the first part has ``start=0``); the tensor is added
        when its last entry is. A floating part is cast to the planned dtype, as in
        :meth:`add`.

        Raises:
          ValueError: no plan; ``name`` not in the plan or already added; ``start`` is not the
            count added so far, or the part runs past the tensor's end; a non-floating dtype
            that differs. The error names the tensor.
          OSError: as :meth:`add`.
        """
        self._check_open(name)
        if self._specs is None:
            raise ValueError("add_part needs a plan (ShardedWriter(..., plan=...)).")
        spec = self._planned(name)
        done, size = self._parts.get(name, 0), math.prod(spec.shape)
        x = np.asarray(jax.device_get(array)).reshape(-1)
        if start != done or done + x.size > size:
            raise ValueError(
                f"tensor {name!r}: a part of entries [{start}, {start + x.size}); expected one "
                f"starting at {done} and ending by {size} (parts come in order)."
            )
        part = _host(_Spec(name, (x.size,), spec.dtype), x)
        try:
            self._write(spec, part, start, complete=done + x.size == size)
        except OSError as e:
            self.abort()
            raise describe(e, self.out, name) from e
        if done + x.size == size:
            self._parts.pop(name, None)
            self._written.add(name)
        else:
            self._parts[name] = done + x.size

    def _check_open(self, name: str) -> None:
        if self._done:
            raise RuntimeError(f"ShardedWriter({self.out}) is closed.")
        if name in self._written:
            raise ValueError(f"tensor {name!r} was already added.")

    def _planned(self, name: str) -> _Spec:
        assert self._specs is not None
        spec = self._specs.get(name)
        if spec is None:
            raise ValueError(f"tensor {name!r} is not in the plan.")
        return spec

    def _write(self, spec: _Spec, x: np.ndarray, start: int, complete: bool = True) -> None:
        """Planned mode: ``x`` at entry ``start`` of ``spec``; finish its shard when done."""
        shard = self._shard_of[spec.name]
        shard.write(spec.name, x, start)
        if complete:
            shard.pending.discard(spec.name)
            if not shard.pending:
                shard.finish()

    def _flush_free(self) -> None:
        """No-plan mode: make the current shard's file (header + a copy of its data file)."""
        path = self.stage_dir / f".shard-{len(self._free):05d}.safetensors"
        layout, pos = [], 0
        for s in self._cur:
            layout.append((s, pos))
            pos += s.nbytes
        with open(path, "xb") as f:
            f.write(_header_bytes(layout, self.metadata))
            if self._data is not None:
                self._data.flush()
                data_path = Path(self._data.name)
                self._data.close()
                self._data = None
                with open(data_path, "rb") as d:
                    shutil.copyfileobj(d, f, 1 << 24)
                data_path.unlink()
            f.flush()
            os.fsync(f.fileno())
        self._free.append((path, self._cur))
        self._cur, self._cur_size = [], 0

    def close(self) -> Path:
        """Finish: check every planned tensor was added, write the index, commit atomically.

        Returns:
          The output directory.

        Raises:
          CheckpointError: planned tensors were never added (named); nothing is committed.
          OSError: writing failed; nothing is committed.
        """
        if self._done:
            return self.out
        try:
            if self._specs is not None:
                missing = [n for n in self._specs if n not in self._written]
                if missing:
                    raise CheckpointError(
                        f"{self.out}: planned tensors never added: {_short(missing)}; nothing "
                        "was written."
                    )
                for sh in self._shards:
                    if sh.f is not None or not sh.path.exists():
                        sh.finish()
                files = [(sh.path.name, sh.specs) for sh in self._shards]
            else:
                if self._cur or not self._free:
                    self._flush_free()
                names = _shard_names(self.filename, len(self._free))
                files = []
                for (tmp, specs), fn in zip(self._free, names, strict=True):
                    os.rename(tmp, self.stage_dir / fn)
                    files.append((fn, specs))
            if len(files) > 1:
                total = sum(s.nbytes for _, specs in files for s in specs)
                wm = {s.name: fn for fn, specs in files for s in specs}
                index = self.stage_dir / f"{self.filename}.index.json"
                index.write_bytes(_index_bytes(total, wm))
            self._stage.commit()
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise describe(e, self.out, None) from e
            raise
        self._done = True
        return self.out

    def abort(self) -> None:
        """Discard everything written; ``out`` is left as it was."""
        for sh in self._shards:
            sh.close_quietly()
        if self._specs is None and self._data is not None:
            data, self._data = self._data, None
            _close_quietly(data)
        self._stage.abort()
        self._done = True

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_safetensors(
    params_or_flat: PyTree,
    out: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    metadata: Mapping[str, str] | None = None,
    sep: str = ".",
    overwrite: bool = False,
    filename: str = WEIGHTS_NAME,
    dtype: Any = None,
) -> Path:
    """Save parameters as a Hugging Face safetensors checkpoint, atomically.

    ``out`` a directory: written as transformers' ``save_pretrained`` does (module docstring)
    through :class:`ShardedWriter`: ``model.safetensors``, or shards plus
    ``model.safetensors.index.json`` when the tensors exceed ``max_shard_size``. ``out`` a
    path ending in ``.safetensors``: one file, written atomically
    (:func:`jmerge.io._atomic.atomic_write`), whatever its size.

    Tensors keep their dtypes (bf16 stays bf16); JAX arrays are fetched to the host one at a
    time, so memory is one tensor beyond the inputs.

    Args:
      params_or_flat: a nested pytree (named by :func:`flatten`) or a flat ``{name: array}``
        dict (names used as they are).
      out: a directory, or a ``.safetensors`` file.
      max_shard_size: bytes of tensor data per shard (int, or ``"500MB"``, ``"5GB"``, ...).
      metadata: extra ``__metadata__`` (str -> str); ``{"format": "pt"}`` is always set.
      sep: the separator :func:`flatten` joins keys with.
      overwrite: replace an existing output (atomically); else ``FileExistsError``.
      filename: the file name in the directory (shard and index names derive from it).
      dtype: if given, floating tensors are stored in this dtype (cast one tensor at a time
        as it is written); integer and bool tensors are kept.

    Returns:
      ``out`` as a ``Path``.

    Raises:
      ValueError: keys that do not flatten, unsupported dtypes, invalid sizes or metadata.
      FileExistsError: ``out`` exists and ``overwrite`` is False.
      OSError: full disk or file-size limit (the previous output is untouched).
    """
    flat = _as_flat(params_or_flat, sep)
    specs = []
    for n, x in flat.items():
        dt = _dtype_of(x)
        specs.append(_spec(n, np.shape(x), dtype if dtype is not None and _is_float(dt) else dt))
    out = Path(out)
    if out.suffix == ".safetensors" and not out.is_dir():
        meta = _check_metadata(metadata)
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True to replace it atomically.")
        out.parent.mkdir(parents=True, exist_ok=True)
        shard = _Shard(out, specs, meta)
        name = None
        try:
            with atomic_write(out) as f:
                shard.open(f)
                for s in specs:
                    name = s.name
                    shard.write(s.name, _host(s, flat[s.name]))
                shard.finish(own=False)
        except OSError as e:
            raise describe(e, out, name) from e
        return out
    with ShardedWriter(
        out,
        plan=[tuple(s) for s in specs],
        max_shard_size=max_shard_size,
        metadata=metadata,
        filename=filename,
        overwrite=overwrite,
    ) as w:
        for s in specs:
            w.add(s.name, flat[s.name])
    return out
