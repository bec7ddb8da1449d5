"""Native CPU kernels, compiled on first use and called through XLA's FFI.

jmerge is pure JAX everywhere except one place where XLA:CPU is far from memory speed: the
exact k-th-magnitude selection of TIES, breadcrumbs, DELLA and the streaming file merges
(:mod:`jmerge.merges._select`), whose scatter-add histograms XLA:CPU lowers to a serial loop at
2.5-3.5 ns per entry. ``select.cc`` holds two XLA FFI handlers (:func:`jax.ffi.ffi_call`):

* ``jmerge_histogram``: that histogram, about 8x faster on the project's 2-core CPU;
* ``jmerge_kth_abs_diff``: the k-th largest |θ_t − θ0| per model, over one leaf or all of a
  model's leaves, in one pass over the models (a sample brackets the value; the entries
  inside the bracket are selected exactly), used by :func:`jmerge.ties`'s trim (both scopes).

GPU and TPU keep XLA's scatter-add (``jax.lax.platform_dependent``).

The library is compiled on first use with the system C++ compiler (``$CXX``, else ``c++``;
``-O3 -march=native``, retried without ``-march=native``) against jaxlib's FFI headers
(:func:`jax.ffi.include_dir`) into ``$JMERGE_KERNEL_CACHE`` (default
``~/.cache/jmerge/kernels``), keyed by the source, the jaxlib version, the compiler and the
CPU, and written atomically (compiled to a temporary name, then renamed), so concurrent
processes never load a half-written library. Where no compiler is found or the build fails,
a :class:`RuntimeWarning` says why once and the pure-XLA path is used; results are the same
either way (both paths are exact). ``JMERGE_CPU_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

__all__ = ["histogram_target", "kth_abs_diff_target"]

_SOURCE = Path(__file__).with_name("select.cc")
_TARGETS = {"jmerge_histogram": "JmergeHistogram", "jmerge_kth_abs_diff": "JmergeKthAbsDiff"}


def _cache_dir() -> Path:
    default = Path.home() / ".cache" / "jmerge" / "kernels"
    return Path(os.environ.get("JMERGE_KERNEL_CACHE", default)).expanduser()


def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or "c++"
    return shutil.which(cxx)


def _cpu_identity() -> bytes:
    """The CPU the library is built for (``-march=native``): model and feature flags."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            lines = [ln for ln in f.read().splitlines() if ln.startswith((b"model name", b"flags"))]
        return b"\n".join(lines[:2])
    except OSError:
        return platform.machine().encode() + platform.processor().encode()


def _build(source: Path, out_dir: Path) -> Path:
    """Compile ``source`` to a shared library in ``out_dir`` (atomic), or raise RuntimeError."""
    import jax
    import jaxlib

    cxx = _compiler()
    if cxx is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX') or 'c++'}) on PATH")
    text = source.read_bytes()
    ident = text + jaxlib.__version__.encode() + cxx.encode() + _cpu_identity()
    key = hashlib.sha256(ident).hexdigest()[:16]
    lib = out_dir / f"{source.stem}-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{lib.name}.", dir=out_dir)
    os.close(fd)
    base = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-w", "-I", jax.ffi.include_dir(),
            str(source), "-o", tmp]
    try:
        # The library is built for this machine's CPU (the cache key names it); a compiler
        # without -march=native gets a second try without it.
        for cmd in (base[:1] + ["-march=native"] + base[1:], base):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode == 0:
                break
        else:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def _registered() -> bool:
    """Build (or find) the library and register its FFI targets with JAX, once per process;
    False (with one RuntimeWarning saying why) where it cannot be built or is turned off by
    ``JMERGE_CPU_KERNELS=0``."""
    if os.environ.get("JMERGE_CPU_KERNELS", "1") == "0":
        return False
    try:
        import jax

        lib = ctypes.CDLL(str(_build(_SOURCE, _cache_dir())))
        for target, symbol in _TARGETS.items():
            capsule = jax.ffi.pycapsule(getattr(lib, symbol))
            jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    except Exception as e:  # any failure means: use the XLA path
        warnings.warn(
            f"jmerge: the CPU selection kernels are not available ({e}); TIES-style "
            "selections use XLA's scatter-add instead (same results, slower on CPU). "
            "Set JMERGE_CPU_KERNELS=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def histogram_target() -> str | None:
    """The FFI target name of the CPU histogram kernel (registered on first call), or None."""
    return "jmerge_histogram" if _registered() else None


def kth_abs_diff_target() -> str | None:
    """The FFI target name of the CPU k-th-largest-|a − b| kernel, or None."""
    return "jmerge_kth_abs_diff" if _registered() else None
