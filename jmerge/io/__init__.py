"""Checkpoint I/O: safetensors (Hugging Face layout), orbax, curvature files; atomic writes.

* Names: :func:`flatten` / :func:`unflatten` map nested parameter dicts to Hugging Face flat
  names (``model.layers.0.mlp.up_proj.weight``) and back.
* safetensors: :class:`SafetensorsCheckpoint` (zero-copy memory-mapped reading of a file, a
  sharded directory or an index), :func:`load_safetensors`, :func:`save_safetensors`, and
  :class:`ShardedWriter` for writing tensor by tensor. Corrupt or truncated files raise
  :class:`CheckpointError` naming the file and the tensor.
* orbax: :func:`save_orbax`, :func:`restore_orbax` (onto a target sharding).
* curvature next to a model: :func:`save_curvature`, :func:`load_curvature`,
  :func:`compute_and_save_curvature`.

Every write is atomic (:mod:`jmerge.io._atomic`): a killed process or a full disk leaves the
previous output or nothing under the final name, never a half-written file.
"""


from typing import TYPE_CHECKING

from jmerge._lazy import attach

# Where each public name lives; imported on first use (jmerge._lazy).
_WHERE = {
    "remove_stale": "_atomic",
    "CURVATURE_KINDS": "curvature_files",
    "SavedCurvature": "curvature_files",
    "compute_and_save_curvature": "curvature_files",
    "curvature_path": "curvature_files",
    "load_curvature": "curvature_files",
    "save_curvature": "curvature_files",
    "restore_orbax": "orbax",
    "save_orbax": "orbax",
    "DTYPES": "safetensors",
    "INDEX_NAME": "safetensors",
    "WEIGHTS_NAME": "safetensors",
    "CheckpointError": "safetensors",
    "SafetensorsCheckpoint": "safetensors",
    "ShardedWriter": "safetensors",
    "flatten": "safetensors",
    "load_safetensors": "safetensors",
    "parse_size": "safetensors",
    "save_safetensors": "safetensors",
    "unflatten": "safetensors",
}
__getattr__, __dir__ = attach(__name__, _WHERE)

if TYPE_CHECKING:
    from jmerge.io._atomic import remove_stale
    from jmerge.io.curvature_files import (
        CURVATURE_KINDS,
        SavedCurvature,
        compute_and_save_curvature,
        curvature_path,
        load_curvature,
        save_curvature,
    )
    from jmerge.io.orbax import restore_orbax, save_orbax
    from jmerge.io.safetensors import (
        DTYPES,
        INDEX_NAME,
        WEIGHTS_NAME,
        CheckpointError,
        SafetensorsCheckpoint,
        ShardedWriter,
        flatten,
        load_safetensors,
        parse_size,
        save_safetensors,
        unflatten,
    )

__all__ = [
    "flatten",
    "unflatten",
    "CheckpointError",
    "DTYPES",
    "INDEX_NAME",
    "WEIGHTS_NAME",
    "parse_size",
    "SafetensorsCheckpoint",
    "load_safetensors",
    "save_safetensors",
    "ShardedWriter",
    "remove_stale",
    "save_orbax",
    "restore_orbax",
    "CURVATURE_KINDS",
    "SavedCurvature",
    "curvature_path",
    "save_curvature",
    "load_curvature",
    "compute_and_save_curvature",
]
