"""Linear solvers over pytrees: :func:`cg`, preconditioned conjugate gradients."""

from jmerge.solvers.cg import CONVERGED, INDEFINITE, MAXITER, NONFINITE, CGResult, cg

__all__ = ["cg", "CGResult", "CONVERGED", "MAXITER", "INDEFINITE", "NONFINITE"]
