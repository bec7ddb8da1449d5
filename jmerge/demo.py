"""``python -m jmerge.demo`` / ``jmerge-demo``: the digits merge-quality suite in one table.

By default this runs ``benchmarks/quality/digits.py`` in its quick mode (MLP backbone, six
input and label tasks on scikit-learn's 8×8 digits, θ0 pretrained on a broad mixture, every
merge with its hyperparameters chosen on a validation split and reported on test; about
70 s of CPU time, 2.5 min wall clock on 2 CPU cores shared with other jobs, training
included) and prints the comparison table with the validation-chosen settings;
``--full`` runs the full sizes (eight tasks, three seeds, full grids), ``--backbone
mlp|cnn|vit|all`` picks the backbone. The suite lives in the source tree
(``benchmarks/quality``); from an install without it, or with ``--classic``, the demo runs
the older single table below.

Classic table (``--classic``): pretrains a small MLP on scikit-learn's 8×8 digits, fine-tunes
it on N input views (rotation, flips, inversion, pixel permutation, noise;
:mod:`jmerge.examples.digits`), computes each task's curvature (diagonal Fisher, empirical and
exact; a matrix-free Fisher operator; RegMean Gram matrices of the Dense inputs) and merges the
backbones with every method, heads excluded (``exclude=r"head"``; each task is evaluated with
its own fine-tuned head).

The table has one row per model or merge: test accuracy per task, the mean normalized
accuracy (merged / fine-tuned, averaged over tasks) and the wall time of the ``jax.jit``-ed
merge in ms (``ms``: a second, warm call; ``ms(1st)``: the first call, compilation included
where the merge's compiled program is new; both exclude the curvature, whose time is printed
above the table). Merge hyperparameters are fixed in :func:`_methods` (CG: 30 iterations, a
fixed early stop as in MaTS, Tam et al. 2023, §3.2; damping: :data:`MF_DAMPING`) except the
task-arithmetic α grid, whose best value (chosen on the test accuracies, i.e. an oracle) is
marked with ``*``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
from tqdm.auto import tqdm

from jmerge.examples import digits

__all__ = ["main"]

PyTree = Any

HEAD = r"head"
TA_ALPHAS = (0.3, 0.5, 1.0)
#: MaTS with the matrix-free Fisher is damped by δ = MF_DAMPING · mean diag(Σ_t F_t) over the
#: backbone. Without damping, Jacobi-preconditioned CG takes long steps along directions of
#: tiny Fisher (dead units) that lower the quadratic objective but leave the region where it
#: models the loss (on the CNN the merge falls to chance); 0.1 was chosen once, on the MLP and
#: the CNN, and is not tuned per run.
MF_DAMPING = 0.1


class Config(NamedTuple):
    """Sizes of one demo run."""

    pretrain_steps: int
    finetune_steps: int
    curvature_examples: int
    maxiter: int


FULL = Config(pretrain_steps=400, finetune_steps=300, curvature_examples=256, maxiter=30)
QUICK = Config(pretrain_steps=150, finetune_steps=100, curvature_examples=128, maxiter=30)


class Row(NamedTuple):
    """One line of the table."""

    name: str
    accs: dict[str, float]
    normalized: float
    ms: float | None = None
    ms_first: float | None = None
    note: str = ""


class Curvatures(NamedTuple):
    """Per-task curvature inputs to the merges, and how long each kind took (seconds)."""

    fisher_empirical: list[PyTree]
    fisher_exact: list[PyTree]
    fisher_ops: list[Any]
    fisher_ops_diag: list[Any]
    grams: list[Any]
    seconds: dict[str, float]


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def compute_curvatures(
    bench: digits.Benchmark, num_examples: int, *, seed: int = 0, progress: bool = True
) -> Curvatures:
    """Each task's curvature at its fine-tuned θ_t on ``num_examples`` of its training view.

    * diagonal Fisher, ``kind="empirical"`` (true labels) and ``kind="exact"`` (expectation
      under the model's predictive), from ``jmerge.curvature.fisher.fisher_diag``;
    * the matrix-free exact Fisher ``fisher_operator`` (no matrix formed), plain and with its
      exact diagonal attached (``MatrixFree(..., diag_tree=...)``: enables Jacobi
      preconditioning and MaTS's ``init="fisher"``);
    * RegMean input Grams XᵀX/n of the Dense kernels (``jmerge.curvature.gram``, captured from
      the traced program by the same mechanism as the fast Fisher path).
    """
    from jmerge.curvature.fisher import fisher_diag
    from jmerge.curvature.gram import gram
    from jmerge.curvature.operators import MatrixFree, fisher_operator

    logits_fn = digits.LogitsFn(bench.model)
    out: dict[str, list] = {k: [] for k in ("emp", "exact", "op", "op_diag", "gram")}
    seconds = dict.fromkeys(("fisher_empirical", "fisher_exact", "fisher_operator", "gram"), 0.0)
    for task, params in tqdm(
        list(zip(bench.tasks, bench.finetuned, strict=True)),
        desc="curvature",
        disable=not progress,
        leave=False,
    ):
        x, y = digits.curvature_inputs(bench.data, task, num_examples, seed=seed)
        f, dt = _timed(lambda p=params, x=x, y=y: fisher_diag(logits_fn, p, x, y, kind="empirical"))
        out["emp"].append(f)
        seconds["fisher_empirical"] += dt
        f, dt = _timed(lambda p=params, x=x: fisher_diag(logits_fn, p, x, kind="exact"))
        out["exact"].append(f)
        seconds["fisher_exact"] += dt
        op, dt = _timed(lambda p=params, x=x: fisher_operator(logits_fn, p, x))
        out["op"].append(op)
        out["op_diag"].append(MatrixFree(op.mv_fn, diag_tree=f, operands=op.operands))
        seconds["fisher_operator"] += dt
        g, dt = _timed(lambda p=params, x=x: gram(logits_fn, p, x, normalize="mean"))
        out["gram"].append(g)
        seconds["gram"] += dt
    return Curvatures(out["emp"], out["exact"], out["op"], out["op_diag"], out["gram"], seconds)


def _methods(
    bench: digits.Benchmark, curv: Curvatures, cfg: Config, seed: int
) -> list[tuple[str, Callable[[], Any]]]:
    """(name, thunk) for every merge; a thunk returns params or a ``MergeResult``.

    Every merge runs ``jax.jit``-ed, hyperparameters closed over (static), models, curvatures
    and α as arguments, so that merges of one kind share a compiled program (the α grid;
    MaTS with a matrix-free Fisher from either initialisation, the initialisation being
    computed inside the thunk).
    """
    from jmerge.merges._scale import absolute
    from jmerge.merges.basic import average, task_arithmetic
    from jmerge.merges.closed_form import fisher_merge, regmean
    from jmerge.merges.gradient_matching import gradient_matching
    from jmerge.merges.mats import mats
    from jmerge.merges.sparse import dare, ties

    p0, ft = bench.pretrained, bench.finetuned
    t = len(ft)
    sizes = [float(bench.data.x_train.shape[0])] * t
    cg = {"maxiter": cfg.maxiter, "rtol": 1e-6, "exclude": HEAD}
    grams = curv.grams
    key = jax.random.key(seed)

    avg_j = jax.jit(lambda p, f: average(f, pretrained=p, exclude=HEAD))
    ta_j = jax.jit(lambda p, f, a: task_arithmetic(p, f, a, exclude=HEAD))
    ties_j = jax.jit(lambda p, f: ties(p, f, density=0.2, alpha=1.0, exclude=HEAD))
    dare_j = jax.jit(lambda p, f, k: dare(p, f, density=0.5, key=k, alpha=0.3, exclude=HEAD))
    fisher_j = jax.jit(lambda p, f, c: fisher_merge(f, c, pretrained=p, exclude=HEAD))
    regmean_j = jax.jit(lambda p, f, g: regmean(f, g, pretrained=p, exclude=HEAD))
    mats_j = jax.jit(lambda p, f, c, init, d: mats(p, f, c, init=init, damping=d, **cg))
    gm_j = jax.jit(
        lambda p, f, c: gradient_matching(
            p, f, c, alpha=1.0, prior=absolute(1.0), dataset_sizes=sizes, **cg
        )
    )
    ops = curv.fisher_ops_diag
    delta = MF_DAMPING  # relative: δ = MF_DAMPING · mean diag(Σ_t F_t) over the backbone
    return [
        ("average", lambda: avg_j(p0, ft)),
        *[(f"task_arith(a={a})", lambda a=a: ta_j(p0, ft, a)) for a in TA_ALPHAS],
        ("ties(d=0.2)", lambda: ties_j(p0, ft)),
        ("dare(d=0.5,a=0.3)", lambda: dare_j(p0, ft, key)),
        ("fisher(empirical)", lambda: fisher_j(p0, ft, curv.fisher_empirical)),
        ("fisher(exact)", lambda: fisher_j(p0, ft, curv.fisher_exact)),
        ("regmean", lambda: regmean_j(p0, ft, curv.grams)),
        ("mats(gram)", lambda: mats_j(p0, ft, grams, ta_j(p0, ft, 1.0 / t), 0.0)),
        ("mats(mf,init=ta)", lambda: mats_j(p0, ft, ops, ta_j(p0, ft, 1.0 / t), delta)),
        (
            "mats(mf,init=fisher)",
            lambda: mats_j(p0, ft, ops, fisher_j(p0, ft, curv.fisher_exact), delta),
        ),
        ("gradmatch(diag)", lambda: gm_j(p0, ft, curv.fisher_exact)),
        ("gradmatch(mf)", lambda: gm_j(p0, ft, ops)),
    ]


def _info_note(result: Any) -> str:
    info = getattr(result, "info", None)
    if not info or "num_steps" not in info:
        return ""
    conv = "converged" if bool(info.get("converged", False)) else "not converged"
    return f"CG {int(info['num_steps'])} it, {conv}"


def _format_table(rows: Sequence[Row], tasks: Sequence[str]) -> str:
    width = max(len(r.name) for r in rows) + 2
    cols = [t[:8] for t in tasks]
    head = f"{'method':<{width}}" + "".join(f"{c:>9}" for c in cols)
    head += f"{'norm':>8}{'ms':>9}{'ms(1st)':>9}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r.name:<{width}}" + "".join(f"{r.accs[t]:>9.3f}" for t in tasks)
        line += f"{r.normalized:>8.3f}"
        line += f"{r.ms:>9.1f}" if r.ms is not None else f"{'-':>9}"
        line += f"{r.ms_first:>9.1f}" if r.ms_first is not None else f"{'-':>9}"
        lines.append(line + (f"  {r.note}" if r.note else ""))
    return "\n".join(lines)


def _quality_suite() -> Any:
    """``benchmarks.quality.digits`` from the source tree, or None where it is not present."""
    try:
        from benchmarks.quality import digits as suite
    except ImportError:
        root = Path(__file__).resolve().parents[1]
        if not (root / "benchmarks" / "quality" / "digits.py").is_file():
            return None
        sys.path.insert(0, str(root))
        from benchmarks.quality import digits as suite
    return suite


def main(argv: Sequence[str] | None = None) -> int:
    """Run the digits suite (or ``--classic``: the single-table demo); returns 0."""
    parser = argparse.ArgumentParser(prog="jmerge-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full sizes: 8 tasks, 3 seeds")
    parser.add_argument(
        "--backbone", choices=("mlp", "cnn", "vit", "all"), default="mlp", help="suite backbone"
    )
    parser.add_argument("--seeds", type=int, default=None, help="suite seeds (quick: 1, full: 3)")
    parser.add_argument("--no-plots", action="store_true", help="suite: no PNG plots")
    parser.add_argument("--classic", action="store_true", help="the older single-table demo")
    parser.add_argument(
        "--tasks",
        type=int,
        default=6,
        help=f"classic: number of task views, 1..{len(digits.TASKS)} (default 6)",
    )
    parser.add_argument("--quick", action="store_true", help="quick sizes (the suite's default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--seed", type=int, default=0, help="classic: seed of split and init")
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp", help="classic backbone")
    args = parser.parse_args(argv)
    suite = None if args.classic else _quality_suite()
    if suite is not None:
        sub = [] if args.full and not args.quick else ["--quick"]
        sub += ["--backbone", args.backbone]
        sub += [] if args.seeds is None else ["--seeds", str(args.seeds)]
        sub += ["--no-progress"] if args.no_progress else []
        sub += ["--no-plots"] if args.no_plots else []
        return suite.main(sub)
    return _classic(args, parser)


def _classic(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not 1 <= args.tasks <= len(digits.TASKS):
        parser.error(f"--tasks must be in [1, {len(digits.TASKS)}]")
    cfg = QUICK if args.quick else FULL
    progress = not args.no_progress
    start = time.perf_counter()

    bench = digits.build_benchmark(
        model=args.model,
        num_tasks=args.tasks,
        seed=args.seed,
        pretrain_steps=cfg.pretrain_steps,
        finetune_steps=cfg.finetune_steps,
        progress=progress,
    )
    tasks = bench.tasks
    print(
        f"digits: {args.model} backbone, tasks {', '.join(tasks)}; "
        f"{bench.data.x_train.shape[0]} train / {bench.data.x_test.shape[0]} test images; "
        f"training took {bench.train_seconds:.1f} s"
    )
    curv = compute_curvatures(bench, cfg.curvature_examples, seed=args.seed, progress=progress)
    s = curv.seconds
    print(
        f"curvature, {cfg.curvature_examples} examples per task, all tasks: diag Fisher "
        f"empirical {1e3 * s['fisher_empirical']:.0f} ms, exact {1e3 * s['fisher_exact']:.0f}"
        f" ms; Fisher operator {1e3 * s['fisher_operator']:.0f} ms; Dense Grams "
        f"{1e3 * s['gram']:.0f} ms (first calls include compilation)"
    )

    ref = bench.finetuned_acc
    pre = bench.evaluate(bench.pretrained)
    mt_params, mt_heads = bench.multitask
    mt = bench.evaluate(mt_params, mt_heads)
    rows = [
        Row("pretrained", pre, bench.normalized(pre), note="θ0 backbone + task heads"),
        Row("finetuned", ref, 1.0, note="each θ_t on its own task"),
        Row("multitask", mt, bench.normalized(mt), note="upper bound: joint training"),
    ]
    merge_rows = []
    methods = _methods(bench, curv, cfg, args.seed)
    for name, thunk in tqdm(methods, desc="merge", disable=not progress, leave=False):
        result, first = _timed(thunk)
        result, warm = _timed(thunk)
        params = getattr(result, "params", result)
        accs = bench.evaluate(params)
        merge_rows.append(
            Row(name, accs, bench.normalized(accs), 1e3 * warm, 1e3 * first, _info_note(result))
        )

    ta = [i for i, r in enumerate(merge_rows) if r.name.startswith("task_arith")]
    best_ta = max(ta, key=lambda i: merge_rows[i].normalized)
    merge_rows[best_ta] = merge_rows[best_ta]._replace(name=merge_rows[best_ta].name + "*")
    print()
    print(_format_table(rows + merge_rows, tasks))
    best = max(merge_rows, key=lambda r: r.normalized)
    print()
    print(
        f"verdict: best merge {best.name} with mean normalized accuracy {best.normalized:.3f} "
        f"(multitask upper bound {rows[2].normalized:.3f}, average "
        f"{merge_rows[0].normalized:.3f}); total {time.perf_counter() - start:.1f} s"
    )
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
