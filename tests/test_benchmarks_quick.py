"""The benchmark scripts run at CI sizes and print complete tables (no timing assertions).

Each script runs in its own process (``--quick --repeats 1``), both at once, with the test
session's float64 / 8-device settings removed from the environment (the benchmarks measure
float32 on the default device) and XLA's backend optimisations turned down: at CI sizes the
run is almost all compilation, and the timings are not checked.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

CURVATURE_OPS = [
    "grad",
    "fisher fast empirical",
    "fisher fast sampled",
    "fisher fast exact",
    "fisher fast empirical, eager",
    "fisher generic empirical",
    "hvp",
    "ggn_vp",
]
MERGES = [
    "copy",
    "average",
    "task_arithmetic",
    "ties",
    "dare",
    "fisher_merge",
    "gradient_matching",
]
MATS = ["diag", "matrix-free", "matrix-free+jacobi"]


@pytest.fixture(scope="module")
def outputs():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(BENCH / f"{name}.py"), "--quick",
             *(() if name == "bench_merge_io" else ("--repeats", "1"))],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("bench_curvature", "bench_merges", "bench_sharding", "bench_merge_io")
    }
    out = {}
    for name, p in procs.items():
        text, _ = p.communicate(timeout=900)
        assert p.returncode == 0, f"{name} failed:\n{text}"
        out[name] = text
    return out


def _table(text: str, first_header: str) -> list[list[str]]:
    """Rows of the table whose header line starts with ``first_header``: cells split on runs
    of two or more spaces, up to the first blank line."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(first_header + " "))
    rows = []
    for ln in lines[start + 2 :]:
        if not ln.strip():
            break
        rows.append(re.split(r"\s{2,}", ln.strip()))
    return rows


def _positive(cell: str) -> float:
    value = float(cell)
    assert value > 0, cell
    return value


@pytest.mark.slow
def test_bench_curvature_quick(outputs):
    text = outputs["bench_curvature"]
    assert "CPU(s)" in text  # machine line
    rows = _table(text, "model")
    seen = {(r[0], r[1]): r for r in rows}
    for model in ("mlp", "cnn", "transformer"):
        for op in CURVATURE_OPS:
            row = seen[(model, op)]
            _positive(row[2])  # ms
            _positive(row[3])  # ratio to grad
        assert float(seen[(model, "grad")][3]) == 1.0
    targets = [ln for ln in text.splitlines() if ln.startswith(("PASS", "MISS"))]
    assert len(targets) == 3 * 3 + 1


@pytest.mark.slow
def test_bench_merges_quick(outputs):
    text = outputs["bench_merges"]
    rows = {r[0]: r for r in _table(text, "merge")}
    assert list(rows) == MERGES
    for name in MERGES:
        _positive(rows[name][3])  # ms
        _positive(rows[name][4])  # GB/s
        _positive(rows[name][5])  # ratio to copy
    assert float(rows["copy"][5]) == 1.0
    mats_rows = {r[0]: r for r in _table(text, "curvature")}
    assert list(mats_rows) == MATS
    for name in MATS:
        _positive(mats_rows[name][2])  # solve ms
        int(mats_rows[name][3].split()[0])  # CG steps
        _positive(mats_rows[name][4])  # solve / steps
        _positive(mats_rows[name][6])  # one summed mat-vec


@pytest.mark.slow
def test_bench_sharding_quick(outputs):
    text = outputs["bench_sharding"]
    assert "PASS collectives per CG iteration all scalar" in text
    assert {r[0] for r in _table(text, "merge")} >= {"average", "ties", "mats (CG)"}


@pytest.mark.slow
def test_bench_merge_io_quick(outputs):
    text = outputs["bench_merge_io"]
    rows = {r[0]: r for r in _table(text, "method")}
    assert set(rows) == {"task_arithmetic", "ties", "dare_ties"}
    for row in rows.values():
        _positive(row[1])  # jmerge seconds
        _positive(row[2])  # peak anonymous MB
        _positive(row[3])  # copy time / jmerge time
    assert re.search(r"orbax, one model: save [\d.]+ s, restore [\d.]+ s", text)
