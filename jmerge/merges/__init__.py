"""Merges: one module per family, each a pure function over pytrees (see DESIGN §1).

Data-free: :func:`average`, :func:`task_arithmetic`, :func:`negation`, :func:`ties`,
:func:`dare`, :func:`dare_ties`. Closed forms: :func:`fisher_merge`, :func:`regmean`.
Solves: :func:`mats` (MaTS, any curvature, CG) and :func:`gradient_matching` (Daheim et al.).
Beyond the quadratic model: :func:`output_matching` (the KL objective MaTS approximates,
minimised by Gauss-Newton steps).
"""


from typing import TYPE_CHECKING

from jmerge._lazy import attach

# Where each public name lives; imported on first use (jmerge._lazy).
_WHERE = {
    "MergeResult": "_common",
    "Absolute": "_scale",
    "absolute": "_scale",
    "SOLVER_CG": "_solve",
    "SOLVER_CLOSED_FORM": "_solve",
    "SOLVER_NAMES": "_solve",
    "MergeInfo": "_solve",
    "average": "basic",
    "negation": "basic",
    "task_arithmetic": "basic",
    "task_vectors": "basic",
    "fisher_merge": "closed_form",
    "regmean": "closed_form",
    "gradient_matching": "gradient_matching",
    "mats": "mats",
    "dare": "sparse",
    "dare_ties": "sparse",
    "ties": "sparse",
    "output_matching": "output_matching",
    "OutputMatchingInfo": "output_matching",
}
__getattr__, __dir__ = attach(__name__, _WHERE)

if TYPE_CHECKING:
    from jmerge.merges._common import MergeResult
    from jmerge.merges._scale import Absolute, absolute
    from jmerge.merges._solve import SOLVER_CG, SOLVER_CLOSED_FORM, SOLVER_NAMES, MergeInfo
    from jmerge.merges.basic import average, negation, task_arithmetic, task_vectors
    from jmerge.merges.closed_form import fisher_merge, regmean
    from jmerge.merges.gradient_matching import gradient_matching
    from jmerge.merges.mats import mats
    from jmerge.merges.output_matching import OutputMatchingInfo, output_matching
    from jmerge.merges.sparse import dare, dare_ties, ties

__all__ = [
    "MergeResult",
    "Absolute",
    "absolute",
    "MergeInfo",
    "SOLVER_CLOSED_FORM",
    "SOLVER_CG",
    "SOLVER_NAMES",
    "average",
    "task_vectors",
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
    "OutputMatchingInfo",
]
