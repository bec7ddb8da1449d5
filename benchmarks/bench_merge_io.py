"""File merges side by side: `jmerge merge` against `mergekit-yaml` on the same checkpoints.

Generated Llama-shaped bf16 checkpoints (a base and 3 fine-tuned models, sharded safetensors
with config.json; ``jmerge.examples.checkpoints``), the same YAML for both tools (task
arithmetic, TIES, DARE-TIES), each tool run as its own process. Printed per method and tool:
wall time, peak anonymous memory (RssAnon of the process, sampled every 5 ms from outside, the
same way for both tools: memory-mapped checkpoint pages are page cache, not counted), the time
ratio mergekit / jmerge, throughput as a ratio to a plain copy (reading every input tensor byte
and writing one model's bytes: the I/O no merge can avoid), and how far the two outputs are
apart. Also orbax save and restore times of one model.

    python benchmarks/bench_merge_io.py                        # 4 x ~715 MB, with mergekit
    python benchmarks/bench_merge_io.py --mergekit /path/to/venv/bin/mergekit-yaml
    python benchmarks/bench_merge_io.py --layers 19 --methods task_arithmetic --no-mergekit
                                                               # 4 x ~2 GB: the memory bound
    python benchmarks/bench_merge_io.py --quick                # tiny, jmerge only (CI)

mergekit is an optional benchmark dependency (``pip install mergekit``, which pulls torch); it
is looked up as ``mergekit-yaml`` on PATH, next to this interpreter, or given by --mergekit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from jmerge.examples.checkpoints import LlamaShape, write_family
from jmerge.io import SafetensorsCheckpoint

METHODS = {
    "task_arithmetic": {"weight": [0.5, 0.3, 0.2]},
    "ties": {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.5, 0.5]},
    "dare_ties": {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.5, 0.5]},
}


def _config(root: Path, method: str, num_models: int) -> Path:
    params = METHODS[method]
    lines = [f"merge_method: {method}", f"base_model: {root / 'base'}", "models:"]
    for i in range(num_models):
        p = ", ".join(f"{k}: {v[i]}" for k, v in params.items())
        lines += [f"  - model: {root / f'ft{i}'}", f"    parameters: {{{p}}}"]
    lines.append("dtype: bfloat16")
    path = root / f"{method}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RssAnon bytes sampled every 5 ms, output) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _rss_anon(proc.pid))
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - start
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{out[-3000:]}")
    return seconds, peak[0], out


def plain_copy(inputs: list[Path], out_like: Path, tmp: Path) -> tuple[float, int]:
    """Seconds to read every input safetensors byte and write one model's bytes; bytes read."""
    buf = bytearray(64 << 20)
    start = time.perf_counter()
    total = 0
    for d in inputs:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    total += n
    dst = tmp / "copy"
    dst.mkdir(exist_ok=True)
    for f in sorted(out_like.glob("*.safetensors")):
        shutil.copyfile(f, dst / f.name)
        with open(dst / f.name, "rb+") as fh:
            os.fsync(fh.fileno())
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)
    return seconds, total


def compare(a: Path, b: Path) -> tuple[float, float]:
    """(max |a − b| / max |a| over tensors, share of differing entries) of two checkpoints."""
    ca, cb = SafetensorsCheckpoint(a), SafetensorsCheckpoint(b)
    worst, diff, count = 0.0, 0, 0
    for name in ca.names:
        x = np.asarray(ca.get(name), np.float32)
        y = np.asarray(cb.get(name), np.float32)
        scale = float(np.abs(x).max()) or 1.0
        worst = max(worst, float(np.abs(x - y).max()) / scale)
        diff += int((x != y).sum())
        count += x.size
    return worst, diff / max(count, 1)


def orbax_times(model: Path, tmp: Path) -> tuple[float, float]:
    import jax

    from jmerge.io import load_safetensors, restore_orbax, save_orbax

    params = jax.tree.map(jax.numpy.asarray, load_safetensors(model))
    start = time.perf_counter()
    save_orbax(params, tmp / "orbax")
    saved = time.perf_counter() - start
    start = time.perf_counter()
    restored = restore_orbax(tmp / "orbax")
    jax.block_until_ready(restored)
    return saved, time.perf_counter() - start


def _find_mergekit(given: str | None) -> str | None:
    if given:
        return given
    here = Path(sys.executable).parent / "mergekit-yaml"
    return str(here) if here.exists() else shutil.which("mergekit-yaml")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny checkpoints, jmerge only")
    ap.add_argument("--root", default=None, help="where the checkpoints are generated/cached")
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--mergekit", default=None, help="path of mergekit-yaml")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--no-orbax", action="store_true")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each tool per method, alternating; the median is reported "
                         "(the first write into fresh page cache is often the slowest)")
    args = ap.parse_args(argv)

    if args.quick:
        shape = LlamaShape(hidden=128, intermediate=352, layers=2, vocab=512, heads=4, kv_heads=2)
    else:
        shape = LlamaShape(hidden=2048, intermediate=5632, layers=args.layers, vocab=32000,
                           heads=16, kv_heads=4)
    tag = f"h{shape.hidden}-l{shape.layers}-v{shape.vocab}"
    root = Path(args.root or Path(tempfile.gettempdir()) / "jmerge_bench_io") / tag
    if not (root / "ft2" / "config.json").exists():
        print(f"generating 4 checkpoints under {root} ...", flush=True)
        write_family(root, shape, num_models=3, max_shard_size="2GB")
    models = [root / "base", *(root / f"ft{i}" for i in range(3))]
    model_bytes = sum(f.stat().st_size for f in models[0].glob("*.safetensors"))
    print(f"checkpoints: 4 x {model_bytes / 1e6:,.0f} MB bf16 ({tag})")
    mk = None if (args.quick or args.no_mergekit) else _find_mergekit(args.mergekit)

    tmp = Path(tempfile.mkdtemp(prefix="jmerge_bench_out_", dir=root))
    try:
        copy_s, copy_bytes = plain_copy(models, models[0], tmp)
        print(f"plain copy (read {copy_bytes / 1e6:,.0f} MB, write {model_bytes / 1e6:,.0f} MB):"
              f" {copy_s:.2f} s")
        rows = []
        for method in args.methods.split(","):
            cfg = _config(root, method, 3)
            out_j = tmp / f"jmerge_{method}"
            # A fresh persistent compilation cache per method: the first run compiles (cold,
            # reported as jmerge_cold_s), the later ones load the programs, as a user's
            # second merge of a model family does.
            cmd = [sys.executable, "-m", "jmerge.cli", "merge", str(cfg), "-o", str(out_j),
                   "--no-progress", "--compile-cache", str(tmp / f"xla_cache_{method}")]
            out_m = tmp / f"mergekit_{method}"
            runs_j, runs_m = [], []
            for _ in range(args.repeats):  # alternate the tools, so drift hits both alike
                shutil.rmtree(out_j, ignore_errors=True)
                runs_j.append(run_measured(cmd)[:2])
                if mk:
                    shutil.rmtree(out_m, ignore_errors=True)
                    runs_m.append(
                        run_measured([mk, str(cfg), str(out_m), "--copy-tokenizer"])[:2]
                    )
            js, jmem = float(np.median([s for s, _ in runs_j])), max(m for _, m in runs_j)
            row = {"method": method, "jmerge_s": js, "jmerge_anon_MB": jmem / 1e6,
                   "copy_ratio": copy_s / js}
            row["jmerge_cold_s"] = runs_j[0][0]
            if args.repeats > 1:
                row["jmerge_runs_s"] = [round(s, 2) for s, _ in runs_j]
            if mk:
                ms, mmem = float(np.median([s for s, _ in runs_m])), max(m for _, m in runs_m)
                worst, share = compare(out_m, out_j)
                row.update(mergekit_s=ms, mergekit_anon_MB=mmem / 1e6, speedup=ms / js,
                           max_rel_diff=worst, differing=share)
                if args.repeats > 1:
                    row["mergekit_runs_s"] = [round(s, 2) for s, _ in runs_m]
                shutil.rmtree(out_m, ignore_errors=True)
            shutil.rmtree(out_j, ignore_errors=True)
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                              for k, v in row.items()}), flush=True)
        print()
        print(f"{'method':16} {'jmerge s':>9} {'jmerge MB':>10} {'copy/jmerge':>12}"
              + (f" {'mergekit s':>11} {'mergekit MB':>12} {'speedup':>8} {'max rel diff':>13}"
                 if mk else ""))
        print("-" * (52 + (47 if mk else 0)))
        for r in rows:
            line = (f"{r['method']:16} {r['jmerge_s']:9.2f} {r['jmerge_anon_MB']:10.0f} "
                    f"{r['copy_ratio']:12.3g}")
            if mk:
                line += (f" {r['mergekit_s']:11.2f} {r['mergekit_anon_MB']:12.0f} "
                         f"{r['speedup']:8.1f} {r['max_rel_diff']:13.2e}")
            print(line)
        if not args.no_orbax:
            save_s, restore_s = orbax_times(models[0], tmp)
            print(f"\norbax, one model: save {save_s:.2f} s, restore {restore_s:.2f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
