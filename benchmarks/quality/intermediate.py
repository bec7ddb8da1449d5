"""Intermediate-task merging (MaTS paper's second setting; issue 12, item 3): a model fine-tuned
on an intermediate task is merged into the model fine-tuned on a low-resource target task, the
target weighted more, and the merge is scored on the target alone.

Tam, Bansal & Raffel (2023), "Merging by Matching Models in Task Parameter Subspaces", §5.2:
merging an intermediate-task model (trained on plenty of related data) into the target model.

Settings (both start from one θ0 and fine-tune every parameter):

* ``digits``: θ0 trained on plain digits (train + pool of
  :func:`benchmarks.quality.digits.load_splits`). Target: the ``rot90`` view's digits from only
  ``target_examples`` training images (own head). Intermediate: the same ``rot90`` images with
  parity labels (y mod 2, own head) on every training image — related inputs, different
  labels, as MNLI → RTE. Heads are kept unmerged; the merged backbone is scored with the
  target's head. Metric: target accuracy (val / test).
* ``text``: the text suite's θ0 (:mod:`benchmarks.quality.text`). Target: ``c_headers``
  fine-tuned on its first ``target_bytes`` training bytes; intermediate: ``python`` fine-tuned
  on its whole training split. Metric: target next-byte loss (val / test, lower is better).

Every method of :func:`benchmarks.quality.text.run_methods` merges [θ_target, θ_intermediate]
with weights (1, w) for w in ``weights`` (task arithmetic θ0 + α(τ_target + w τ_int), Fisher
merging / RegMean / MaTS with weights (1, w), ...); its other settings are chosen on the target's
validation score at each w, and w itself is also chosen on validation for the last column.

Run: ``python -m benchmarks.quality.intermediate [--quick] [--setting digits|text|both]
[--seeds N] [--markdown]``.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.quality import text as tx
from benchmarks.quality._common import (
    RESULTS,
    Candidate,
    best_per_method,
    format_setting,
    mean_std,
    plot_curves,
    select_by_validation,
    table,
)

PyTree = Any
WEIGHTS = (0.1, 0.2, 0.3, 0.5)


class Grid(NamedTuple):
    """The method grids read by :func:`benchmarks.quality.text.run_methods`."""

    ta_alphas: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25)
    fisher_alphas: tuple[float, ...] = (0.75, 1.0, 1.25)
    ties: tuple[tuple[float, float], ...] = ((0.2, 1.0), (0.5, 1.0))
    dare: tuple[tuple[float, float], ...] = ((0.3, 1.0), (0.6, 1.0))
    regmean_alphas: tuple[float, ...] = (0.9, 1.0)
    gm_alphas: tuple[float, ...] = (0.5, 1.0)
    gm_diag_priors: tuple[float, ...] = (0.1, 1.0)
    gm_mf_priors: tuple[float, ...] = (1e-1,)
    gm_mf_maxiter: int = 20
    mats_curvatures: tuple[str, ...] = ("diag", "kfac", "gram", "fisher_mf")
    mats_iters: tuple[int, ...] = (0, 10, 50)
    mats_dampings: tuple[float, ...] = (1e-2,)
    om_steps: tuple[int, ...] = (5, 10, 20)


QUICK_GRID = Grid(
    ta_alphas=(1.0,),
    fisher_alphas=(1.0,),
    ties=((0.5, 1.0),),
    dare=((0.5, 1.0),),
    regmean_alphas=(1.0,),
    gm_alphas=(1.0,),
    gm_diag_priors=(1.0,),
    gm_mf_priors=(1e-1,),
    gm_mf_maxiter=10,
    mats_iters=(0, 10),
    mats_dampings=(1e-2,),
    om_steps=(5,),
)


class Result(NamedTuple):
    """One seed of one setting: the target model alone (val, test) and, per w, candidates."""

    setting: str
    seed: int
    metric: str  # "accuracy" (higher is better) or "loss" (lower is better; scores are −loss)
    target: tuple[float, float]
    intermediate_on_target: tuple[float, float]
    candidates: dict[float, list[Candidate]]
    #: tr F_target / tr F_intermediate (diagonal Fisher, merged leaves): how much the
    #: curvature-weighted merges let each model pull
    fisher_trace_ratio: float = float("nan")
    #: per w: share of merged coordinates where w F_int > F_target (there the diagonal Fisher
    #: merge takes mostly the intermediate's value, its full task vector, not w of it)
    int_dominant: tuple[float, ...] = ()


def _dominant(fishers: Sequence[PyTree], exclude: str | None) -> tuple[float, ...]:
    """Per w in :data:`WEIGHTS`: the share of coordinates (leaves not matching ``exclude``)
    where w F_1 > F_0."""
    pairs = [
        (np.asarray(a).ravel(), np.asarray(b).ravel())
        for (p, a), b in zip(
            jax.tree_util.tree_leaves_with_path(fishers[0]),
            jax.tree_util.tree_leaves(fishers[1]),
            strict=True,
        )
        if exclude is None or not re.search(exclude, jax.tree_util.keystr(p))
    ]
    f0 = np.concatenate([a for a, _ in pairs])
    f1 = np.concatenate([b for _, b in pairs])
    return tuple(float(np.mean(w * f1 > f0)) for w in WEIGHTS)


def _trace_ratio(fishers: Sequence[PyTree], exclude: str | None) -> float:
    """Σ F_0 / Σ F_1 over the leaves whose path does not match ``exclude``."""

    def total(f):
        leaves = jax.tree_util.tree_leaves_with_path(f)
        return sum(
            float(jnp.sum(x))
            for p, x in leaves
            if exclude is None or not re.search(exclude, jax.tree_util.keystr(p))
        )

    return total(fishers[0]) / total(fishers[1])


# ---------------------------------------------------------------------------------------------
# Digits


def digits_setting(seed: int, quick: bool) -> Result:
    from benchmarks.quality.digits import load_splits
    from jmerge.examples import digits as dx

    sp = load_splits(seed)
    model = dx.make_model("mlp")
    init = dx.init_params(model, seed)
    steps = (300, 150) if quick else (1000, 300)
    x_pre = np.concatenate([sp["train"].x, sp["pool"].x])
    y_pre = np.concatenate([sp["train"].y, sp["pool"].y])
    kw = {"batch_size": 64, "progress": False}
    theta0 = dx.train(model, init, x_pre, y_pre, steps=steps[0], lr=1e-3, seed=seed, **kw)
    n_target = 60 if quick else 100
    x_rot = {k: dx.view("rot90", sp[k].x) for k in ("train", "val", "test")}
    y = {k: sp[k].y for k in ("train", "val", "test")}
    target = dx.train(
        model, theta0, x_rot["train"][:n_target], y["train"][:n_target],
        steps=steps[1], lr=1e-3, seed=seed + 1, **kw,
    )  # fmt: skip
    inter = dx.train(
        model, theta0, x_rot["train"], y["train"] % 2, steps=steps[1], lr=1e-3, seed=seed + 2, **kw
    )
    head = target["params"]["head"]

    def acc(params, split):
        return dx.accuracy(model, dx.with_head(params, head), x_rot[split], y[split])

    def score(params):
        return acc(params, "val"), acc(params, "test"), {}

    logits = dx.LogitsFn(model)
    n_int = min(128, x_rot["train"].shape[0])
    curv = tx.compute_curvatures(
        logits,
        [target, inter],
        [jnp.asarray(x_rot["train"][:n_target]), jnp.asarray(x_rot["train"][:n_int])],
        kinds=Grid().mats_curvatures,
        seed=seed,
        theta0=theta0,
        inputs0=jnp.asarray(x_pre[:256]),
        n0=float(x_pre.shape[0]),
        sizes=[float(n_target), float(x_rot["train"].shape[0])],
        kind="exact",
    )
    grid = QUICK_GRID if quick else Grid()
    cands = {
        w: tx.run_methods(
            theta0, [target, inter], curv, grid, score, weights=(1.0, w), exclude=r"head", seed=seed
        )
        for w in WEIGHTS
    }
    ratio, dom = _trace_ratio(curv.fisher, r"head"), _dominant(curv.fisher, r"head")
    return Result(
        "digits", seed, "accuracy", score(target)[:2], score(inter)[:2], cands, ratio, dom
    )


# ---------------------------------------------------------------------------------------------
# Text


def text_setting(
    seed: int, quick: bool, cache: Path | None, target: str = "c_headers", inter: str = "python"
) -> Result:
    cfg = tx.QUICK if quick else tx.FULL
    b, _ = tx.make_bench(seed, cfg, cache, log=lambda s: None)
    target_bytes = 8_000 if quick else 16_000
    theta_t = tx.train_lm(
        b.model,
        b.theta0,
        [b.corpus.text[target]["train"][:target_bytes]],
        steps=cfg.finetune_steps,
        lr=cfg.finetune_lr,
        batch_size=cfg.batch,
        seed=seed * 1000 + 99,
    )
    theta_i = b.finetuned[b.domains.index(inter)]

    def score(params):
        va = tx.mean_loss(b.model, params, b.seqs[target]["val"])
        te = tx.mean_loss(b.model, params, b.seqs[target]["test"])
        return -va, -te, {}

    curv = tx.text_curvatures(b, [theta_t, theta_i], [target, inter])
    # the target was trained on target_bytes only: its dataset size is that many windows
    curv = curv._replace(sizes=[float(target_bytes // (cfg.seq + 1)), curv.sizes[1]])
    grid = QUICK_GRID if quick else Grid()
    cands = {
        w: tx.run_methods(
            b.theta0, [theta_t, theta_i], curv, grid, score, weights=(1.0, w), seed=seed
        )
        for w in WEIGHTS
    }
    ratio, dom = _trace_ratio(curv.fisher, None), _dominant(curv.fisher, None)
    return Result("text", seed, "loss", score(theta_t)[:2], score(theta_i)[:2], cands, ratio, dom)


# ---------------------------------------------------------------------------------------------
# Reports


def _shown(r: Result, v: float) -> float:
    """A score as reported: accuracy as is, −loss back to loss."""
    return -v if r.metric == "loss" else v


def summarize(results: Sequence[Result], *, markdown: bool = False) -> str:
    """Target test metric per method (validation-chosen settings) per w, mean ± std over seeds;
    the last column also chooses w on validation."""
    r0 = results[0]
    rows = [
        ["target alone", *[_pm(results, lambda r: r.target[1])] * (len(WEIGHTS) + 1), "-"],
        [
            "intermediate alone",
            *[_pm(results, lambda r: r.intermediate_on_target[1])] * (len(WEIGHTS) + 1),
            "-",
        ],
    ]
    for m in best_per_method(r0.candidates[WEIGHTS[0]]):
        cells = [_pm(results, lambda r, w=w, m=m: _best(r, w)[m].test) for w in WEIGHTS]
        cells.append(_pm(results, lambda r, m=m: _chosen_w(r, m).test))
        picks = []
        for r in results:
            c = _chosen_w(r, m)
            w = next(w for w in WEIGHTS if any(x is c for x in r.candidates[w]))
            picks.append(format_setting({"w": w, **c.setting}))
        rows.append([m, *cells, " / ".join(picks)])
    header = ["method", *[f"w={w:g}" for w in WEIGHTS], "w chosen on val", "chosen (per seed)"]
    return table(header, rows, markdown=markdown)


def _best(r: Result, w: float) -> dict[str, Candidate]:
    return best_per_method(r.candidates[w])


def _chosen_w(r: Result, m: str) -> Candidate:
    return select_by_validation([_best(r, w)[m] for w in WEIGHTS])


def _pm(results: Sequence[Result], f) -> str:
    m, s = mean_std([_shown(r, f(r)) for r in results])
    return f"{m:.4f} ± {s:.4f}" if results[0].metric == "loss" else f"{m:.3f} ± {s:.3f}"


def _cg_only(r: Result, w: float, m: str) -> Candidate:
    """MaTS method ``m``'s validation-chosen candidate among those that ran CG (iters ≥ 1)."""
    return select_by_validation(
        [c for c in r.candidates[w] if c.method == m and c.setting["iters"] > 0]
    )


def claims(results: Sequence[Result]) -> list[str]:
    """Claim (b): MaTS with CG beats the closed-form diagonal Fisher merge and RegMean (test,
    validation-chosen settings and w). Zero CG iterations is the task-arithmetic
    initialisation, so the check takes MaTS among its CG settings only (iters ≥ 1)."""
    r0 = results[0]
    methods = list(best_per_method(r0.candidates[WEIGHTS[0]]))
    kinds = [m for m in methods if m.startswith("mats_") and m != "mats_diag"]

    def mean(m):
        return float(np.mean([_chosen_w(r, m).test for r in results]))

    def mean_cg(m):
        return float(
            np.mean(
                [select_by_validation([_cg_only(r, w, m) for w in WEIGHTS]).test for r in results]
            )
        )

    def shown(v):
        return -v if r0.metric == "loss" else v

    cg = {m: mean_cg(m) for m in kinds}
    best_cg = max(cg, key=cg.get)
    f, rm, ta = mean("fisher"), mean("regmean"), mean("task_arith")
    alone = float(np.mean([r.target[1] for r in results]))
    lines = [
        f"[{r0.setting}] (b) best MaTS with CG (iters ≥ 1; {best_cg}) {shown(cg[best_cg]):.4f} vs "
        f"Fisher {shown(f):.4f}, RegMean {shown(rm):.4f} ({r0.metric}, test, settings and w "
        f"chosen on val): {'HOLDS' if cg[best_cg] > max(f, rm) else 'FAILS'}; task arithmetic "
        f"(MaTS's init) {shown(ta):.4f}",
        f"[{r0.setting}] MaTS with CG per curvature: "
        + ", ".join(f"{m[5:]} {shown(v):.4f}" for m, v in cg.items()),
    ]
    if "output_match" in methods:
        quad = {m: mean(m) for m in methods if m.startswith(("mats_", "regmean", "fisher"))}
        bq = max(quad, key=quad.get)
        om = mean("output_match")
        lines.append(
            f"[{r0.setting}] (c) output matching {shown(om):.4f} vs the best quadratic-model "
            f"merge ({bq}) {shown(quad[bq]):.4f}: {'HOLDS' if om > quad[bq] else 'FAILS'}"
        )
    top = max(methods, key=mean)
    lines.append(
        f"[{r0.setting}] best merge {top} {shown(mean(top)):.4f} vs target alone "
        f"{shown(alone):.4f}: merging {'helps' if mean(top) > alone else 'does not help'}"
    )
    per_w = []
    for w in WEIGHTS:
        cgw = {m: np.mean([_cg_only(r, w, m).test for r in results]) for m in kinds}
        fw = np.mean([_best(r, w)["fisher"].test for r in results])
        rw = np.mean([_best(r, w)["regmean"].test for r in results])
        mb = max(cgw, key=cgw.get)
        per_w.append(
            f"w={w:g}: {mb[5:]} {shown(cgw[mb]):.4f} vs Fisher {shown(fw):.4f} / RegMean "
            f"{shown(rw):.4f} ({'yes' if cgw[mb] > max(fw, rw) else 'no'})"
        )
    lines.append(
        f"[{r0.setting}] MaTS-CG (iters ≥ 1) vs closed forms at each w: " + "; ".join(per_w)
    )
    ratios = [r.fisher_trace_ratio for r in results]
    lines.append(
        f"[{r0.setting}] tr F_target / tr F_intermediate (diagonal Fisher of each model on its "
        f"own curvature examples, merged leaves): {np.mean(ratios):.3g} (per seed "
        + ", ".join(f"{v:.3g}" for v in ratios)
        + ")"
    )
    if results[0].int_dominant:
        dom = np.mean([r.int_dominant for r in results], axis=0)
        lines.append(
            f"[{r0.setting}] share of coordinates where w F_int > F_target: "
            + ", ".join(f"w={w:g}: {v:.2f}" for w, v in zip(WEIGHTS, dom, strict=True))
        )
    return lines


def load_json(path: Path) -> list[Result]:
    """Results saved by :func:`main` (``--report`` reprints their tables)."""
    with open(path) as fh:
        raw = json.load(fh)
    out = []
    for d in raw:
        cands = {
            float(w): [
                Candidate(
                    c["method"], c["setting"], c["val"], c["test"],
                    {k: v for k, v in c.items() if k not in ("method", "setting", "val", "test")},
                )
                for c in cs
            ]
            for w, cs in d["candidates"].items()
        }  # fmt: skip
        out.append(
            Result(
                d["setting"],
                d["seed"],
                d["metric"],
                tuple(d["target"]),
                tuple(d["intermediate_on_target"]),
                cands,
                d.get("fisher_trace_ratio", float("nan")),
                tuple(d.get("int_dominant", ())),
            )
        )
    return out


def make_plot(results: Sequence[Result], out: Path, tag: str) -> Path:
    r0 = results[0]
    curves = {}
    for m in best_per_method(r0.candidates[WEIGHTS[0]]):
        ys = np.array([[_shown(r, _best(r, w)[m].test) for w in WEIGHTS] for r in results])
        curves[m] = (list(WEIGHTS), ys.mean(0), ys.std(0))
    alone = float(np.mean([_shown(r, r.target[1]) for r in results]))
    return plot_curves(
        out / f"{tag}.png",
        curves,
        xlabel="intermediate weight w (target weight 1)",
        ylabel=f"target {r0.metric} (test)",
        title=f"intermediate-task merging ({r0.setting})",
        reference={"target alone": alone},
    )


def _jsonable(r: Result) -> dict:
    d = r._asdict()
    d["candidates"] = {
        str(w): [
            {
                "method": c.method,
                "setting": dict(c.setting),
                "val": c.val,
                "test": c.test,
                **c.extra,
            }
            for c in cs
        ]
        for w, cs in r.candidates.items()
    }
    return d


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--setting", choices=("digits", "text", "both"), default="both")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (quick: 1)")
    parser.add_argument("--cache", default=tx.default_cache(), help="orbax cache ('' disables)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--report", default=None, help="reprint tables from a saved JSON")
    args = parser.parse_args(argv)
    if args.report:
        results = load_json(Path(args.report))
        print(summarize(results, markdown=args.markdown))
        print("\n".join(claims(results)))
        return 0
    seeds = range(args.seeds or (1 if args.quick else 3))
    cache = Path(args.cache) if args.cache else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tx.use_compilation_cache(cache)
    settings = ("digits", "text") if args.setting == "both" else (args.setting,)
    for name in settings:
        start = time.perf_counter()
        if name == "digits":
            results = [digits_setting(s, args.quick) for s in seeds]
        else:
            results = [text_setting(s, args.quick, cache) for s in seeds]
        tag = f"intermediate_{name}{'_quick' if args.quick else ''}"
        what = (
            "target rot90 digits (few examples) ← intermediate rot90 parity; test accuracy"
            if name == "digits"
            else "target c_headers (16 KB) ← intermediate python; test loss (nats/byte)"
        )
        text = "\n".join(
            [
                f"## intermediate-task merging, {name}: {what}; seeds {list(seeds)}",
                "",
                summarize(results, markdown=args.markdown),
                "",
                *claims(results),
                f"time {time.perf_counter() - start:.1f} s",
            ]
        )
        print(text)
        if args.markdown:
            (out / f"{tag}.md").write_text(text + "\n")
        if not args.no_plots:
            print(f"plot: {make_plot(results, out, tag)}")
        with open(out / f"{tag}.json", "w") as fh:
            json.dump([_jsonable(r) for r in results], fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
