"""The ``jmerge`` command line: ``jmerge merge config.yaml --out DIR``.

mergekit's YAML (``merge_method``, ``base_model``, ``models`` with per-model ``parameters``,
top-level ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source``) over local Hugging
Face safetensors checkpoints, streamed tensor by tensor (:mod:`jmerge.io.streaming`); plus the
principled merges mergekit lacks (``fisher``, ``regmean``, ``mats``, ``gradient_matching``),
which read curvature files next to each model (:mod:`jmerge.io.curvature_files`).

Exit status: 0 on success, 2 for a usage or configuration error (nothing written), 1 for an
error during the merge, 130 when interrupted (Ctrl-C) (nothing written either: the output is
committed atomically at the end).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

if "numpy" not in sys.modules:  # the jmerge command's own process, before NumPy loads
    # The merges run in XLA; OpenBLAS's idle threads, started with NumPy, only took CPU from
    # them (6% of a task-arithmetic merge's samples were in blas_thread_server, under perf).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from jmerge.config import METHODS, ConfigError  # noqa: E402
from jmerge.merges.mergekit import REQUIRED

__all__ = ["main", "build_parser", "methods_help"]


def _param_line(name: str, p, scope: str) -> str:
    default = "required" if p.default is REQUIRED else f"default {p.default!r}"
    return f"      {name} ({scope}, {p.type.__name__}, {default}): {p.doc}"


def methods_help() -> str:
    """Every ``merge_method`` with its parameters, from the registry the config validator uses."""
    lines = ["merge methods and their parameters:"]
    for name, spec in METHODS.items():
        base = {"required": "needs base_model", "optional": "base_model optional",
                "input": "base_model is an ordinary input"}.get(spec.base, spec.base)
        lines.append(f"  {name}: {spec.doc} [{base}{'; random' if spec.random else ''}]")
        lines += [_param_line(n, p, "per model") for n, p in spec.per_model.items()]
        lines += [_param_line(n, p, "global") for n, p in spec.global_.items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jmerge",
        description="Model merging in JAX: mergekit-compatible YAML merges of safetensors "
        "checkpoints, streamed tensor by tensor, plus Fisher merging, RegMean, MaTS and "
        "gradient matching from curvature files.",
        epilog="Run `jmerge merge --help` for the methods and their parameters.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    merge = sub.add_parser(
        "merge",
        help="merge checkpoints as a YAML config says",
        description=textwrap.dedent(
            """\
            Merge local safetensors checkpoints as CONFIG (mergekit's YAML) says and write a
            Hugging Face checkpoint directory (sharded safetensors + index, config.json and
            tokenizer files of the base model). Tensors are read from memory-mapped files one
            at a time; the output appears atomically when the merge has finished."""
        ),
        epilog=methods_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("config", help="the merge configuration (YAML)")
    merge.add_argument("-o", "--out", help="output directory (replaced atomically)")
    merge.add_argument("--dry-run", action="store_true",
                       help="validate the config and the checkpoints; write nothing")
    merge.add_argument("--max-shard-size", default="5GB",
                       help="bytes of tensors per output shard, e.g. 2GB, 500MB (default 5GB)")
    merge.add_argument("--seed", type=int, default=0, help="seed of the random methods")
    merge.add_argument("--no-progress", action="store_true", help="no progress bar")
    merge.add_argument("--no-overwrite", action="store_true",
                       help="fail if the output directory exists and is not empty")
    merge.add_argument(
        "--compile-cache", default=None, metavar="DIR",
        help="JAX's persistent compilation cache: the merge's few XLA programs are compiled "
             "once and reused by later merges of the same shapes (default for the jmerge "
             "command: $JAX_COMPILATION_CACHE_DIR, else ~/.cache/jmerge/xla; 'none' turns it "
             "off)")
    return parser


def _compile_cache(arg: str | None, default: bool) -> None:
    """Point JAX's persistent compilation cache at ``arg`` (or, when ``default``, at
    ``$JAX_COMPILATION_CACHE_DIR`` or ``~/.cache/jmerge/xla``), caching every program however
    fast it compiled: a file merge compiles a handful of small programs (0.8 s of a 4.5 s TIES
    merge, measured), the same ones for every model of one shape.

    The programs go to a subdirectory per jax version and ``XLA_FLAGS`` (JAX leaves some
    flags, such as the forced host device count, out of its cache key). Only the ``jmerge``
    command (a process of its own) turns the cache on by default: ``main()`` called from
    Python leaves the caller's JAX configuration alone unless ``--compile-cache`` is given.
    """
    import hashlib

    import jax

    path = arg or (default and (os.environ.get("JAX_COMPILATION_CACHE_DIR")
                                or str(Path.home() / ".cache" / "jmerge" / "xla")))
    if not path or path.lower() == "none":
        return
    tag = hashlib.sha256(f"{jax.__version__}|{os.environ.get('XLA_FLAGS', '')}".encode())
    jax.config.update("jax_compilation_cache_dir", str(Path(path) / tag.hexdigest()[:12]))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: Sequence[str] | None = None, *, compile_cache: bool = False) -> int:
    """Run ``jmerge`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.
    ``compile_cache``: turn JAX's persistent compilation cache on without ``--compile-cache``
    (what the ``jmerge`` command does; :func:`_compile_cache`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if not args.dry_run and not args.out:
        parser.error("merge: --out/-o DIR is required (or --dry-run)")
    from jmerge.io._memory import reuse_freed_memory
    from jmerge.io.streaming import merge_checkpoints

    _compile_cache(args.compile_cache, default=compile_cache)
    reuse_freed_memory()  # same-sized buffers per tensor: reuse them, no page faults
    gc.freeze()  # the objects of the imports are never collected: no GC passes over them
    try:
        summary = merge_checkpoints(
            args.config, args.out, dry_run=args.dry_run, progress=not args.no_progress,
            max_shard_size=args.max_shard_size, seed=args.seed,
            overwrite=not args.no_overwrite,
        )
    except (ConfigError, FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"jmerge: error: {msg}", file=sys.stderr)
        print("jmerge: nothing was written.", file=sys.stderr)
        return 2
    except (OSError, FloatingPointError, RuntimeError) as e:
        print(f"jmerge: merge failed: {e}", file=sys.stderr)
        print("jmerge: nothing was written.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the staging directory is gone, the output untouched
        print("jmerge: interrupted; nothing was written.", file=sys.stderr)
        return 130
    print(summary.format())
    return 0


def console_main() -> int:
    """The ``jmerge`` command: :func:`main` in a process of its own, with the compilation
    cache on by default."""
    return main(compile_cache=True)


if __name__ == "__main__":
    sys.exit(console_main())
