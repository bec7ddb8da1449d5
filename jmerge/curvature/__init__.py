"""Curvature: how to get the C_t of a merge, as pure functions of (model, params, data).

* Matrix-free products: :func:`hvp`, :func:`ggn_vp`, :func:`fisher_vp`.
* Diagonal Fisher: :func:`fisher_diag` (exact / sampled / empirical; fast layer path).
* RegMean Gram matrices and K-FAC factors: :func:`gram`, :func:`kfac_factors`.
* Operators consumed by the merges and the CG solver: :class:`Diagonal`, :class:`MatrixFree`,
  :class:`BlockGram`, :class:`KFAC`, :class:`Sum`, :class:`Scaled`, :class:`Damped`, and the
  matrix-free constructors :func:`hessian_operator`, :func:`ggn_operator`,
  :func:`fisher_operator`.
"""

from jmerge.curvature.fisher import fisher_diag
from jmerge.curvature.gram import gram, kfac_factors
from jmerge.curvature.hvp import fisher_vp, ggn_vp, hvp
from jmerge.curvature.operators import (
    KFAC,
    BlockGram,
    CurvatureOperator,
    Damped,
    Diagonal,
    Identity,
    MatrixFree,
    Scaled,
    Sum,
    as_operator,
    damped,
    fisher_operator,
    ggn_operator,
    hessian_operator,
    jacobi_preconditioner,
    mean_diagonal,
)

__all__ = [
    "hvp",
    "ggn_vp",
    "fisher_vp",
    "fisher_diag",
    "gram",
    "kfac_factors",
    "CurvatureOperator",
    "Diagonal",
    "MatrixFree",
    "Identity",
    "BlockGram",
    "KFAC",
    "Sum",
    "Scaled",
    "Damped",
    "damped",
    "as_operator",
    "mean_diagonal",
    "jacobi_preconditioner",
    "hessian_operator",
    "ggn_operator",
    "fisher_operator",
]
