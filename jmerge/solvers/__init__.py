"""Linear solvers over pytrees."""

from jmerge.solvers.cg import (
    CONVERGED,
    INDEFINITE,
    MAXITER,
    NONFINITE,
    STAGNATED,
    STATUS_NAMES,
    CGResult,
    cg,
)

__all__ = [
    "cg",
    "CGResult",
    "CONVERGED",
    "MAXITER",
    "INDEFINITE",
    "NONFINITE",
    "STAGNATED",
    "STATUS_NAMES",
]
