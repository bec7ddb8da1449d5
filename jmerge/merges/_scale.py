"""Hyperparameters relative to the curvature's scale, and the marker for absolute ones.

A curvature-weighted merge is unchanged when every curvature C_t is multiplied by one c > 0
(the merge is a ratio of curvatures), unless a hyperparameter of the merge is an absolute
number in the curvature's units: damping δ, a prior δ·I, a cut-off eps, a ridge λ. Diagonal
Fishers of large networks are often 1e-12 to 1e-6 in float32, so an absolute default
(δ = 1e-3, eps = 1e-8) silently dominates or erases them. jmerge therefore reads a plain
number as *relative*: δ = value · s, with s the mean diagonal of the summed curvature
(trace / n over the merged parameters; see ``jmerge.curvature.mean_diagonal``); wrap the
number in :func:`absolute` to give it in the curvature's own units.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmerge.tree import is_traced

__all__ = ["Absolute", "absolute", "resolve", "is_static_zero"]


class Absolute(NamedTuple):
    """A hyperparameter in the curvature's own units, not relative to its scale.

    A pytree (its ``value`` may be traced), so it passes through ``jax.jit`` as an argument.
    """

    value: Any


def absolute(value: Any) -> Absolute:
    """Mark ``value`` (damping, prior δ, eps, ridge) as absolute: used as given.

    Example: ``jmerge.mats(θ0, θs, fishers, damping=jmerge.absolute(1e-3))`` adds 1e-3·I to
    Σ_t w_t F_t whatever the Fishers' scale, where ``damping=1e-3`` adds 1e-3 · mean diag.
    """
    if isinstance(value, Absolute):
        return value
    return Absolute(value)


def is_static_zero(value: Any) -> bool:
    """True when ``value`` (relative or :class:`Absolute`) is a concrete 0: the term is
    dropped at trace time and its scale need not be computed."""
    v = value.value if isinstance(value, Absolute) else value
    if isinstance(v, bool) or is_traced(v):
        return False
    if not isinstance(v, (int, float, np.generic, np.ndarray, jax.Array)) or np.ndim(v) != 0:
        return False
    return float(np.asarray(v)) == 0.0


def resolve(value: Any, scale: Any, dtype: Any) -> Any:
    """The absolute value of a hyperparameter: ``value.value`` if :class:`Absolute`, else
    ``value · scale`` (``scale`` is only read for a relative value), as a ``dtype`` scalar."""
    if isinstance(value, Absolute):
        return jnp.asarray(value.value, dtype)
    return jnp.asarray(value, dtype) * jnp.asarray(scale, dtype)
