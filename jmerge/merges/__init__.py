"""Merges: one module per family, each a pure function over pytrees (see DESIGN §1).

Data-free: :func:`average`, :func:`task_arithmetic`, :func:`negation`, :func:`ties`,
:func:`dare`, :func:`dare_ties`. Closed forms: :func:`fisher_merge`, :func:`regmean`.
Solves: :func:`mats` (MaTS, any curvature, CG) and :func:`gradient_matching` (Daheim et al.).
"""

from jmerge.merges._common import MergeResult
from jmerge.merges._scale import Absolute, absolute
from jmerge.merges._solve import SOLVER_CG, SOLVER_CLOSED_FORM, SOLVER_NAMES, MergeInfo
from jmerge.merges.basic import average, negation, task_arithmetic, task_vectors
from jmerge.merges.closed_form import fisher_merge, regmean
from jmerge.merges.gradient_matching import gradient_matching
from jmerge.merges.mats import mats
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
]
