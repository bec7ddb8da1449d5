"""jmerge: model merging in JAX.

Every merge is a (weighted) least-squares solve,
(C0 + Σ_t w_t C_t) θ = C0 θ0 + Σ_t w_t C_t θ_t, with curvatures C from :mod:`jmerge.curvature`
and, where no closed form exists, the matrix-free conjugate-gradient solver :func:`cg`.
"""

from typing import TYPE_CHECKING

from jmerge._lazy import attach

__version__ = "0.1.0"

# Where each public name lives; imported on first use (jmerge._lazy).
_WHERE = {
    **{m: "" for m in ("curvature", "io", "merges", "sharding", "solvers", "tree")},
    **{f: "curvature" for f in ("fisher_diag", "fisher_vp", "ggn_vp", "hvp")},
    **{
        n: "merges"
        for n in (
            "SOLVER_CG",
            "SOLVER_CLOSED_FORM",
            "SOLVER_NAMES",
            "Absolute",
            "MergeInfo",
            "MergeResult",
            "absolute",
            "average",
            "dare",
            "dare_ties",
            "fisher_merge",
            "gradient_matching",
            "mats",
            "negation",
            "output_matching",
            "regmean",
            "task_arithmetic",
            "ties",
        )
    },
    "CGResult": "solvers",
    "cg": "solvers",
}
__getattr__, __dir__ = attach(__name__, _WHERE)

if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from jmerge import curvature, io, merges, sharding, solvers, tree
    from jmerge.curvature import fisher_diag, fisher_vp, ggn_vp, hvp
    from jmerge.merges import (
        SOLVER_CG,
        SOLVER_CLOSED_FORM,
        SOLVER_NAMES,
        Absolute,
        MergeInfo,
        MergeResult,
        absolute,
        average,
        dare,
        dare_ties,
        fisher_merge,
        gradient_matching,
        mats,
        negation,
        output_matching,
        regmean,
        task_arithmetic,
        ties,
    )
    from jmerge.solvers import CGResult, cg

__all__ = [
    "curvature",
    "io",
    "merges",
    "sharding",
    "solvers",
    "tree",
    "hvp",
    "ggn_vp",
    "fisher_vp",
    "fisher_diag",
    "cg",
    "CGResult",
    "MergeResult",
    "Absolute",
    "absolute",
    "MergeInfo",
    "SOLVER_CLOSED_FORM",
    "SOLVER_CG",
    "SOLVER_NAMES",
    "average",
    "task_arithmetic",
    "negation",
    "ties",
    "dare",
    "dare_ties",
    "fisher_merge",
    "regmean",
    "mats",
    "gradient_matching",
    "output_matching",
]
