"""Native CPU kernels, compiled on first use and called through XLA's FFI.

jmerge is pure JAX everywhere except one place where XLA:CPU is far from memory speed: the
scatter-add histogram of radix select (:mod:`jmerge.merges._select`, used by TIES,
breadcrumbs, DELLA and the streaming file merges), which XLA:CPU lowers to a serial loop at
2.5-3.5 ns per entry. ``histogram.cc`` here is that histogram as an XLA FFI handler
(:func:`jax.ffi.ffi_call`), about 8x faster on the project's 2-core CPU; GPU and TPU keep
XLA's scatter-add (``jax.lax.platform_dependent``).

The kernel is compiled on first use with the system C++ compiler (``$CXX``, else ``c++``)
against jaxlib's FFI headers (:func:`jax.ffi.include_dir`) into
``$JMERGE_KERNEL_CACHE`` (default ``~/.cache/jmerge/kernels``), keyed by the source, the
jaxlib version and the compiler, and written atomically (compiled to a temporary name, then
renamed), so concurrent processes never load a half-written library. Where no compiler is
found or the build fails, a :class:`RuntimeWarning` says why once and the pure-XLA path is
used; results are the same either way (exact integer counts). ``JMERGE_CPU_KERNELS=0``
turns the kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

__all__ = ["histogram_target"]

_SOURCE = Path(__file__).with_name("histogram.cc")
_TARGET = "jmerge_histogram"


def _cache_dir() -> Path:
    default = Path.home() / ".cache" / "jmerge" / "kernels"
    return Path(os.environ.get("JMERGE_KERNEL_CACHE", default)).expanduser()


def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or "c++"
    return shutil.which(cxx)


def _build(source: Path, out_dir: Path) -> Path:
    """Compile ``source`` to a shared library in ``out_dir`` (atomic), or raise RuntimeError."""
    import jax
    import jaxlib

    cxx = _compiler()
    if cxx is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX') or 'c++'}) on PATH")
    text = source.read_bytes()
    key = hashlib.sha256(text + jaxlib.__version__.encode() + cxx.encode()).hexdigest()[:16]
    lib = out_dir / f"{source.stem}-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{lib.name}.", dir=out_dir)
    os.close(fd)
    cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-w", "-I", jax.ffi.include_dir(),
           str(source), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def histogram_target() -> str | None:
    """The FFI target name of the CPU histogram kernel, registered with JAX on first call;
    ``None`` (with one RuntimeWarning saying why) where it cannot be built or is turned off
    by ``JMERGE_CPU_KERNELS=0``."""
    if os.environ.get("JMERGE_CPU_KERNELS", "1") == "0":
        return None
    try:
        import jax

        lib = ctypes.CDLL(str(_build(_SOURCE, _cache_dir())))
        jax.ffi.register_ffi_target(
            _TARGET, jax.ffi.pycapsule(lib.JmergeHistogram), platform="cpu"
        )
    except Exception as e:  # any failure means: use the XLA path
        warnings.warn(
            f"jmerge: the CPU histogram kernel is not available ({e}); TIES-style "
            "selections use XLA's scatter-add instead (same results, slower on CPU). "
            "Set JMERGE_CPU_KERNELS=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return _TARGET
