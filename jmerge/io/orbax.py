"""orbax-checkpoint save and restore of parameter pytrees, restoring onto a target sharding.

Arrays are written by orbax's ``StandardCheckpointer`` (tensorstore/OCDBT, one process per
host writing its own shards), so a sharded ``jax.Array`` is saved without being gathered, and
:func:`restore_orbax` with a target of ``jax.ShapeDtypeStruct`` leaves carrying a ``sharding``
reads each device's slice straight onto that device: no full host copy of a parameter is made,
whatever the sharding it was saved with.

Atomicity. orbax itself writes into ``<path>.orbax-checkpoint-tmp[-<n>]`` and renames it to
``<path>`` when every array is written (``orbax/checkpoint/_src/path/atomicity.py``,
``AtomicRenameTemporaryPath``; ``Checkpointer.save`` finalizes with
``atomicity.on_commit_callback``): a killed save leaves no ``<path>``. Overwriting is not
atomic in orbax (``force=True`` deletes the old checkpoint *before* writing), so
:func:`save_orbax` saves into a hidden sibling and swaps it in with
:class:`jmerge.io._atomic.StagedDir`: ``<path>`` holds the previous checkpoint or the new
one. (With several processes, ``jax.process_count() > 1``, the swap is skipped and orbax's own
overwrite is used.)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp

from jmerge.io._atomic import StagedDir, temp_name

__all__ = ["save_orbax", "restore_orbax"]


def save_orbax(params: chex.ArrayTree, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a pytree of arrays (``jax.Array`` of any sharding, NumPy, scalars) with orbax.

    Dtypes are kept (bf16 stays bf16). The call blocks until the checkpoint is committed.

    Args:
      params: the pytree.
      path: the checkpoint directory (made absolute, as orbax requires).
      overwrite: replace an existing checkpoint atomically (module docstring).

    Returns:
      The absolute path.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it atomically.")
    if jax.process_count() > 1:  # pragma: no cover - multi-host only
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path, params, force=overwrite)
            ckptr.wait_until_finished()
        return path
    if not path.exists():
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path, params)
            ckptr.wait_until_finished()
        return path
    # Overwrite: orbax writes (atomically) into a sibling, which then replaces `path`.
    staged = StagedDir(path, overwrite=True)
    inner = temp_name(path, "new")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(inner, params)
            ckptr.wait_until_finished()
        os.rmdir(staged.path)
        os.rename(inner, staged.path)
        staged.commit()
    except BaseException:
        shutil.rmtree(inner, ignore_errors=True)
        staged.abort()
        raise
    return path


def _as_abstract(x: Any) -> Any:
    """A target leaf for orbax: arrays become ``ShapeDtypeStruct`` (keeping a jax.Array's
    sharding), ``ShapeDtypeStruct`` leaves stay."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, np.ndarray | np.generic):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype)
    return x


def restore_orbax(path: str | os.PathLike, target: chex.ArrayTree | None = None) -> chex.ArrayTree:
    """Restore a checkpoint written by :func:`save_orbax` (or any orbax StandardCheckpointer).

    Args:
      path: the checkpoint directory.
      target: None to restore as saved (structure, dtypes, and the saved shardings where the
        same devices exist); or a pytree of the checkpoint's structure whose leaves are
        ``jax.ShapeDtypeStruct`` (with ``sharding=NamedSharding(mesh, spec)`` to restore each
        array directly onto that sharding, each device reading only its slice) or arrays (whose
        shape, dtype and sharding are used). A dtype in the target differing from the saved one
        is a cast on restore.

    Returns:
      The restored pytree: ``jax.Array`` leaves (on the target's sharding, or as saved), and
      ``np.ndarray`` where the target leaf has no sharding or the leaf was saved from NumPy.

    Raises:
      FileNotFoundError: no checkpoint at ``path``.
      ValueError: (from orbax) the target's structure or shapes differ from the checkpoint's.
    """
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no orbax checkpoint there.")
    with ocp.StandardCheckpointer() as ckptr:
        if target is None:
            return ckptr.restore(path)
        return ckptr.restore(path, jax.tree_util.tree_map(_as_abstract, target))
