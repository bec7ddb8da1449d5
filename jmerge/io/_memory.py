"""Peak anonymous memory of this process, sampled: what a streaming merge is judged by.

``RssAnon`` (Linux ``/proc/self/status``) counts the pages a process owns itself: its arrays,
JAX's buffers, Python objects. Pages of memory-mapped checkpoint files are ``RssFile`` (page
cache: the kernel drops them under pressure), so a merge that reads tensors from ``np.memmap``
views and writes each result out at once keeps ``RssAnon`` near (models + 2) × the largest
tensor however large the checkpoints are. The kernel keeps no high-water mark of ``RssAnon``
alone (``VmHWM`` includes file pages), hence the sampling thread.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

_STATUS = Path("/proc/self/status")
_FIELD = re.compile(r"^(RssAnon|VmHWM|VmRSS):\s+(\d+) kB", re.MULTILINE)


def rss() -> dict[str, int]:
    """``{"RssAnon": bytes, "VmRSS": bytes, "VmHWM": bytes}`` now; empty where /proc is absent."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return {}
    return {k: int(v) * 1024 for k, v in _FIELD.findall(text)}


class PeakMemory:
    """Context manager sampling ``RssAnon`` every ``interval`` seconds; ``.peak`` in bytes.

    ``peak`` is the largest sample (a lower bound of the true peak; at the default 2 ms a
    buffer that lives for less than that can be missed). ``baseline`` is ``RssAnon`` on entry,
    so ``peak - baseline`` is what the work inside the block added. On systems without
    ``/proc`` both stay 0.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        value = rss().get("RssAnon", 0)
        if value > self.peak:
            self.peak = value

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self.baseline = rss().get("RssAnon", 0)
        self.peak = self.baseline
        self._thread = threading.Thread(target=self._run, name="jmerge-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()


_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc <malloc.h>


def reuse_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse instead of returning it to the
    kernel: no ``mmap`` for large blocks (``M_MMAP_MAX = 0``), no trimming of the heap
    (``M_TRIM_THRESHOLD`` = 2^31 - 1 bytes) and one arena for all threads (``M_ARENA_MAX =
    1``: a thread's own arena is an ``mmap``'d heap that is trimmed and faulted in again).
    Returns whether it applied (Linux with glibc only).

    A streaming merge allocates and frees buffers of the same sizes for every tensor and
    chunk (JAX's host buffers on CPU come from ``malloc``). By default each large one is a
    fresh ``mmap`` (or lives in a worker thread's own arena, itself an ``mmap``), so every
    page is faulted in and zeroed by the kernel again. Measured with ``jmerge merge`` on
    4 × 713 MB bf16 checkpoints (2 cores, quiet machine): task arithmetic 5.7 -> 2.9 s wall,
    TIES 10.9 -> 6.0 s, minor page faults 1.5 M -> 0.12 M and 4.8 M -> 0.16 M, peak anonymous
    memory about the same (500-520 MiB). The cost is that the process keeps its peak heap
    until it exits, and it changes allocation for the whole process: ``jmerge merge`` (a
    process of its own) calls it, library users opt in.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
    ok = mallopt(_M_ARENA_MAX, 1) == 1 and ok  # XLA's worker threads: one heap, not one each
    return ok
