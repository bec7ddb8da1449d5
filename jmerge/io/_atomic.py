"""Atomic file and directory writes: a reader sees the previous output or the new one, never a
half-written file or a mix of old and new files.

* One file (:func:`atomic_write`): the bytes go to a temporary file ``.<name>.tmp-<random>``
  in the destination's directory (so that the final rename stays on one filesystem), which is
  flushed and ``os.fsync``-ed, then ``os.replace``-d onto the final name (atomic on POSIX),
  after which the directory is fsync-ed so that the rename itself survives a power loss.
* A directory of files (:class:`StagedDir`): everything is written into a sibling staging
  directory ``.<name>.tmp-<random>``; :meth:`StagedDir.commit` fsyncs it and swaps it in. If
  the destination does not exist this is one ``rename``. If it exists, the two directories are
  exchanged with Linux ``renameat2(RENAME_EXCHANGE)`` (one atomic step) and the old one, now
  under the staging name, is deleted. Where that call is unavailable (not Linux, an old kernel
  or glibc, a filesystem without it) the fallback is two renames, old → ``.<name>.old-<random>``
  then new → name: between the two the destination is briefly absent (a reader then sees
  nothing, and a crash in that window leaves the previous output under the ``.old-`` name),
  but the destination is never a half-written directory or a mix of old and new files.

On any error (including ``OSError`` for a full disk, ``ENOSPC``, or a file-size limit,
``EFBIG``) the temporary file or directory is removed and the destination is left untouched.
A process killed by ``SIGKILL`` cannot clean up: it leaves a hidden ``.<name>.tmp-*`` sibling
(never the final name), which :func:`remove_stale` deletes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = [
    "atomic_write",
    "StagedDir",
    "fsync_dir",
    "remove_stale",
    "temp_name",
    "describe",
]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def temp_name(path: Path, tag: str = "tmp") -> Path:
    """A fresh hidden sibling of ``path``: ``<parent>/.<name>.<tag>-<16 hex digits>``."""
    return path.parent / f".{path.name}.{tag}-{secrets.token_hex(8)}"


def fsync_dir(path: str | os.PathLike) -> None:
    """``fsync`` the directory ``path`` so that renames and creations in it are durable.

    Filesystems that cannot fsync a directory (``EINVAL``/``ENOTSUP``) are skipped silently.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # pragma: no cover - filesystem dependent
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def describe(e: OSError, what: str | os.PathLike, tensor: str | None = None) -> OSError:
    """``e`` as an ``OSError`` with the same errno whose message names the output (and the
    tensor being written) and spells out the usual causes (full disk, file-size limit)."""
    hint = {
        errno.ENOSPC: "the disk is full",
        errno.EFBIG: "the file size limit was reached (RLIMIT_FSIZE or the filesystem's)",
        errno.EDQUOT: "the disk quota is exhausted",
    }.get(e.errno or 0, e.strerror or str(e))
    of = f" tensor {tensor!r} of" if tensor else ""
    err = OSError(
        e.errno,
        f"writing{of} {what} failed: {hint}; nothing was committed and the previous output (if "
        "any) is untouched",
    )
    err.filename = str(what)
    return err


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Write the file ``path`` atomically: ``with atomic_write(p) as f: f.write(...)``.

    Yields a binary file open for writing on a temporary sibling ``.<name>.tmp-<random>``.
    On leaving the block without an exception the file is flushed, fsync-ed, renamed onto
    ``path`` (``os.replace``) and the directory fsync-ed. On an exception the temporary file is
    removed and ``path`` keeps its previous content (or stays absent).

    Exceptions (an ``OSError`` for a full disk, ``ENOSPC``, or a file-size limit, ``EFBIG``)
    propagate unchanged, after the clean-up; :func:`describe` words them for users.
    """
    path = Path(path)
    tmp = temp_name(path)
    f = open(tmp, "xb")  # noqa: SIM115 - closed below on every path
    try:
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False (nothing done) where the call is not available.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (files first, then their directories)."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


class StagedDir:
    """A directory built in a hidden sibling and swapped in atomically on :meth:`commit`.

    Usage::

        with StagedDir(out) as stage:       # stage.path: .<out>.tmp-<random>
            write files into stage.path ...
        # committed here; on an exception the staging directory is deleted instead

    Args:
      path: the destination directory.
      overwrite: if False (default), a destination that exists and is not an empty directory
        is an error, raised at construction (before anything is written); if True it is
        replaced as a whole (files in it that were not copied into the stage are gone).

    Raises:
      FileExistsError: the destination exists (not an empty directory) and ``overwrite`` is
        False.
      NotADirectoryError: the destination exists and is not a directory.
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False):
        self.final = Path(path).absolute()
        if self.final.exists() or self.final.is_symlink():
            if not self.final.is_dir():
                raise NotADirectoryError(f"{self.final} exists and is not a directory.")
            if not overwrite and any(self.final.iterdir()):
                raise FileExistsError(
                    f"{self.final} exists and is not empty; pass overwrite=True to replace it "
                    "(atomically, as a whole)."
                )
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.path = temp_name(self.final)
        self.path.mkdir()
        self.committed = False

    def commit(self) -> None:
        """fsync the staged files and swap the staging directory in (module docstring)."""
        if self.committed:
            raise RuntimeError(f"{self.final}: already committed.")
        _fsync_tree(self.path)
        parent = self.final.parent
        if not self.final.exists():
            os.rename(self.path, self.final)
        elif _exchange(self.path, self.final):
            shutil.rmtree(self.path)  # the previous output, now under the staging name
        else:  # pragma: no cover - depends on the kernel and filesystem
            old = temp_name(self.final, "old")
            os.rename(self.final, old)
            os.rename(self.path, self.final)
            fsync_dir(parent)
            shutil.rmtree(old)
        fsync_dir(parent)
        self.committed = True

    def abort(self) -> None:
        """Delete the staging directory (the destination is untouched)."""
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> StagedDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def remove_stale(path: str | os.PathLike) -> list[Path]:
    """Delete the hidden ``.<name>.tmp-*`` / ``.old-*`` / ``.new-*`` siblings of ``path`` that
    a killed writer left behind; returns what was deleted.

    Only call this when no other process is writing ``path``: a live writer's staging
    directory looks the same.
    """
    path = Path(path).absolute()
    gone = []
    for p in path.parent.glob(f".{path.name}.*-*"):
        tag = p.name[len(path.name) + 2 :].split("-", 1)[0]
        if tag in ("tmp", "old", "new"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            gone.append(p)
    return gone
