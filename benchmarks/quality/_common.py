"""Shared pieces of the quality suites: model selection on validation, tables, plots.

Model selection is the one rule every suite follows: a method's hyperparameters (α, prior,
damping, density, CG iterations, ...) are chosen by the *validation* score, and the row it
reports is the *test* score of that choice. :func:`select_by_validation` is that rule, written
once and tested (``tests/test_quality_suites.py`` builds a case where validation and test
disagree).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

RESULTS = Path(__file__).resolve().parents[1] / "results"


class Candidate(NamedTuple):
    """One setting of one method, scored on both splits.

    Attributes:
      method: the method's row name (e.g. ``"task_arith"``).
      setting: the hyperparameters, ``{name: value}`` (printed in the table).
      val: the validation score (mean normalized accuracy on the validation split).
      test: the test score of the same merged model.
      extra: anything else to keep (per-task test accuracies, diagnostics).
    """

    method: str
    setting: Mapping[str, Any]
    val: float
    test: float
    extra: Mapping[str, Any] = {}


def select_by_validation(candidates: Sequence[Candidate]) -> Candidate:
    """The candidate with the highest validation score (ties: the first listed).

    The test score never enters the choice. NaN validation scores rank last.

    Raises:
      ValueError: no candidates.
    """
    if not candidates:
        raise ValueError("select_by_validation needs at least one candidate.")
    keys = [-math.inf if math.isnan(c.val) else c.val for c in candidates]
    return candidates[int(np.argmax(keys))]


def best_per_method(candidates: Sequence[Candidate]) -> dict[str, Candidate]:
    """``{method: select_by_validation(that method's candidates)}``, in first-seen order."""
    groups: dict[str, list[Candidate]] = {}
    for c in candidates:
        groups.setdefault(c.method, []).append(c)
    return {m: select_by_validation(cs) for m, cs in groups.items()}


def format_setting(setting: Mapping[str, Any]) -> str:
    """``"a=0.3, d=0.1"``: short and stable."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    return ", ".join(f"{k}={fmt(v)}" for k, v in setting.items())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation; std 0 for one value."""
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std()) if a.size > 1 else 0.0


def pm(values: Sequence[float], digits: int = 3) -> str:
    """``"0.812 ± 0.011"`` (mean ± std over seeds)."""
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, markdown: bool = False) -> str:
    """A plain-text (aligned) or markdown table of strings."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*cells[0]), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    out += [fmt.format(*r) for r in cells[1:]]
    return "\n".join(out)


def plot_curves(
    path: Path,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    reference: Mapping[str, float] | None = None,
    logx: bool = False,
) -> Path:
    """Write a PNG of ``{label: (x, mean y, std y or None)}`` lines with horizontal reference
    lines ``{label: y}``; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (x, y, s) in curves.items():
        x, y = np.asarray(x, float), np.asarray(y, float)
        ax.plot(x, y, marker="o", ms=3, label=label)
        if s is not None:
            s = np.asarray(s, float)
            ax.fill_between(x, y - s, y + s, alpha=0.2)
    for label, y in (reference or {}).items():
        ax.axhline(y, ls="--", lw=1, color="gray")
        ax.annotate(label, (0.01, y), xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
    if logx:
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(left=0.0)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
