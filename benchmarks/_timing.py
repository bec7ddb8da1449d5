"""Timing helpers shared by the benchmark scripts.

Every benchmark measures the things it compares side by side in one run: each thunk is run
once to compile (warm-up), then ``repeats`` rounds run every thunk once in turn, so that drifts
in machine load hit all of them alike, and the median of each thunk's times is reported. Times
are wall-clock with ``jax.block_until_ready`` on the result.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax


def interleaved_medians(
    thunks: Mapping[Any, Callable[[], Any]],
    repeats: int,
    *,
    warmup: int = 1,
    first_call: dict | None = None,
) -> dict[Any, float]:
    """Median wall time in seconds of each zero-argument thunk.

    ``warmup`` calls of each thunk first (compilation), then ``repeats`` rounds that call every
    thunk once, in order, each timed up to ``jax.block_until_ready`` of its result. If
    ``first_call`` is a dict, the time of each thunk's first call (compile + run) is stored in it.
    """
    for k, fn in thunks.items():
        for i in range(warmup):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            if i == 0 and first_call is not None:
                first_call[k] = time.perf_counter() - t0
    times: dict[Any, list[float]] = {k: [] for k in thunks}
    for _ in range(max(repeats, 1)):
        for k, fn in thunks.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def machine_info() -> str:
    """One line naming the machine: jax version, devices, platform, CPU count."""
    devs = jax.devices()
    return (
        f"jax {jax.__version__}; devices {devs} (backend {devs[0].platform}); "
        f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPU(s)"
    )


def format_table(header: list[str], rows: list[list[Any]], aligns: str | None = None) -> str:
    """A plain-text table: columns padded to their widest cell, ``aligns`` one of ``<>`` each
    (default: first column left, the others right)."""
    aligns = aligns or "<" + ">" * (len(header) - 1)
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(f"{c:{a}{w}}" for c, a, w in zip(r, aligns, widths, strict=True))
    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)
