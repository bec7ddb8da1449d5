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
