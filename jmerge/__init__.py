"""jmerge: model merging in JAX.

Every merge is a (weighted) least-squares solve,
(C0 + Σ_t w_t C_t) θ = C0 θ0 + Σ_t w_t C_t θ_t, with curvatures C from ``jmerge.curvature`` and,
where no closed form exists, the matrix-free conjugate-gradient solver ``jmerge.cg``.
"""

from jmerge import tree

__version__ = "0.1.0"

__all__ = ["tree"]
