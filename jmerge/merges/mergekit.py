"""mergekit 0.1.5's tensor merge methods, with mergekit's semantics, as pure JAX functions.

Each function merges one tensor: the stack ``tensors`` of shape ``(N, *s)`` (N models, in the
order mergekit receives them) and, where the method uses one, the ``base`` tensor of shape
``s``. Per-model parameters are arrays of shape ``(N,)`` (a scalar is broadcast), already
resolved for this tensor (:func:`jmerge.config.resolve_parameters`); global parameters are
keywords. The definitions follow mergekit 0.1.5 (PyPI wheel ``mergekit-0.1.5``) file by file;
every docstring names the file and function it follows.

Dtypes: mergekit's ``linear`` and ``slerp`` compute in float32 (float64 for float64 inputs);
its other methods compute in the inputs' (promoted) dtype, i.e. in bfloat16 for bfloat16
checkpoints unless the YAML sets ``dtype``. Here every method computes in float32 (float64 for
float64 inputs) and returns the promoted dtype of its inputs (mergekit's output dtype before
``out_dtype``), so results agree with mergekit to the rounding of the inputs' dtype. The
magnitude selections (``ties``, ``breadcrumbs*``) rank |δ| rounded to that dtype, as mergekit
does (its δ is a bfloat16 difference for bfloat16 checkpoints), so they keep mergekit's
entries, and for 16-bit inputs the k-th magnitude is one radix pass.

Ties at a magnitude threshold: mergekit's top-k (``torch.argsort``) keeps exactly k entries and
breaks ties in an unspecified order; here every entry whose magnitude equals the threshold is
kept (:func:`jmerge.merges._select.kth_largest`), so results differ only where magnitudes repeat
exactly at the threshold (never for continuous data; possible for low-precision deltas).

Every sparsifying method (TIES, DARE, breadcrumbs, DELLA) also takes ``masks`` (and, with
``rescale``, ``scales``: the per-model L1 factors) from :func:`sparsify_task_vector`, which
computes one model's mask over a whole tensor; with both given the merge is elementwise, so a
large tensor can be merged in pieces with the masks and factors of the whole.

Random methods (``dare_*``, ``della*``) take either ``key`` (a ``jax.random`` key; the mask is
Bernoulli with mergekit's keep probabilities, drawn from the counter-based :func:`uniforms`, not
torch's random stream, so a piece of a tensor draws what the whole tensor draws there) or
``masks`` (a boolean ``(N, *s)`` array, True = keep), so that a mask drawn elsewhere (e.g. by
torch) reproduces mergekit's result exactly.

Where mergekit differs from the papers (and from :func:`jmerge.ties`, :func:`jmerge.dare`,
:func:`jmerge.task_arithmetic`):

* DARE/DELLA ``rescale`` multiplies the kept entries by ‖τ‖₁ / ‖m ⊙ τ‖₁ (mergekit
  ``sparsify.rescaled_masked_tensor`` with the L1 norm), not by 1/p (the papers).
* TIES-family methods multiply each task vector by its ``weight`` *before* the sign election,
  and with ``normalize`` divide by Σ_t w_t over the models that agree with the elected sign
  (1 where that sum is 0); the elected sign is +1 where the weighted sum is exactly 0.
* ``ties`` keeps k = max(1, ⌊density·n⌋) entries per tensor (the paper: a global top-k).
* ``lambda`` scales the merged task vector.

All functions run under ``jax.jit``, ``vmap`` and ``grad``. Arguments that fix a number of
kept entries (``densities`` of ``ties``/``breadcrumbs*``, ``gammas``) must be concrete (Python or
NumPy values, or concrete arrays; each distinct value compiles its own program), and so must the
flags (``normalize``, ``rescale``, ``consensus``, ``filter_wise``, ``row_wise``, ``flatten``);
tensors, weights, ``lambda_``, ``t``, ``select_topk``, the densities and epsilons of the random
methods, keys and masks may be traced.

Selection costs: ``ties``/``breadcrumbs*`` call :func:`jmerge.merges._select.kth_largest` once
(twice) per model; ``della`` sorts each row once; ``sce`` sorts the variances of the whole
tensor (its k depends on the data).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmerge.merges._common import model_sum
from jmerge.merges._select import kth_largest
from jmerge.tree import compute_dtype, is_traced

__all__ = [
    "REQUIRED",
    "Param",
    "MethodSpec",
    "METHODS",
    "merge_tensor",
    "sparsify_task_vector",
    "SELECTING",
    "selection_ranks",
    "keep_within",
    "uniforms",
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "nuslerp",
    "model_stock",
    "sce",
]

ArrayLike = Any

_CONSENSUS = ("sum", "count")
_RESCALE_EPS = 1e-7  # sparsify.rescaled_masked_tensor(eps=1e-7)
_SLERP_DOT_THRESHOLD = 0.9995  # merge_methods/slerp.py slerp(dot_threshold=0.9995)
_SLERP_EPS = 1e-8  # merge_methods/slerp.py slerp(eps=1e-8)


# ---------------------------------------------------------------------------------------------
# Argument handling


def _stack(tensors: ArrayLike, name: str = "tensors") -> jax.Array:
    x = jnp.asarray(tensors) if not isinstance(tensors, (list, tuple)) else jnp.stack(tensors)
    if x.ndim < 1:
        raise ValueError(f"{name} must have a leading model axis, shape (N, *s); got a scalar.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point; got dtype {x.dtype}.")
    return x


def _base(base: ArrayLike, tensors: jax.Array) -> jax.Array:
    b = jnp.asarray(base)
    if b.shape != tensors.shape[1:]:
        raise ValueError(
            f"base has shape {tuple(b.shape)}, expected {tuple(tensors.shape[1:])} "
            f"(tensors without the model axis; tensors have shape {tuple(tensors.shape)})."
        )
    if not jnp.issubdtype(b.dtype, jnp.floating):
        raise TypeError(f"base must be floating point; got dtype {b.dtype}.")
    return b


def _per_model(value: ArrayLike, n: int, name: str) -> jax.Array:
    """A per-model parameter as a (N,) array (a scalar is broadcast)."""
    a = jnp.asarray(value)
    if a.ndim == 0:
        return jnp.broadcast_to(a, (n,))
    if a.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one per model) or be a scalar; "
                         f"got shape {tuple(a.shape)}.")
    return a


def _static_per_model(value: ArrayLike, n: int, name: str, method: str) -> tuple[float, ...]:
    """A per-model parameter that fixes a number of kept entries: concrete, as Python floats."""
    if is_traced(value):
        raise TypeError(
            f"{method}: {name} must be concrete (Python or NumPy values): it fixes the number "
            "of entries kept. Pass it as a static value, not a traced array."
        )
    a = np.asarray(jax.device_get(value), dtype=np.float64)
    if a.ndim == 0:
        a = np.full((n,), float(a))
    if a.shape != (n,):
        raise ValueError(f"{method}: {name} must have shape ({n},) (one per model) or be a "
                         f"scalar; got shape {a.shape}.")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{method}: {name} must be finite; got {a.tolist()}.")
    return tuple(float(v) for v in a)


def _check_consensus(consensus: str) -> None:
    if consensus not in _CONSENSUS:
        raise ValueError(f"consensus must be one of {_CONSENSUS}; got {consensus!r}.")


def _out_dtype(*arrays: jax.Array) -> Any:
    return jnp.result_type(*arrays)


def _bcast(v: jax.Array, ndim: int) -> jax.Array:
    """(N,) -> (N, 1, ..., 1) against a (N, *s) stack of ndim dimensions."""
    return v.reshape(v.shape + (1,) * (ndim - 1))


# ---------------------------------------------------------------------------------------------
# Sparsification (mergekit/sparsify.py): keep masks and the L1 rescaling


def _rescaled(x: jax.Array, keep: jax.Array, rescale: bool) -> jax.Array:
    """sparsify.rescaled_masked_tensor(x, keep, norm=l1 if rescale else None), per model.

    m ⊙ x, times ‖x‖₁ / ‖m ⊙ x‖₁ unless either norm is below 1e-7. ``x``: (N, *s).
    """
    masked = jnp.where(keep, x, jnp.zeros_like(x))
    if not rescale:
        return masked
    axes = tuple(range(1, x.ndim))
    before = jnp.sum(jnp.abs(x), axis=axes, keepdims=True)
    after = jnp.sum(jnp.abs(masked), axis=axes, keepdims=True)
    small = (before < _RESCALE_EPS) | (after < _RESCALE_EPS)
    return jnp.where(small, masked, masked * (before / jnp.where(small, 1, after)))


def _kth_per_model(mags: jax.Array, ks: tuple[int | None, ...]) -> jax.Array:
    """Row i's k_i-th largest entry of ``mags`` (N, n) -> (N,); rows with k_i None get 0.

    Rows sharing a k (the usual case: one density for all models) go through one batched
    :func:`kth_largest` call, so a merge compiles one selection per distinct k, not per model.
    """
    out = jnp.zeros(mags.shape[:1], mags.dtype)
    for k in sorted({k for k in ks if k is not None}):
        rows = np.asarray([i for i, ki in enumerate(ks) if ki == k])
        out = out.at[rows].set(kth_largest(mags[rows], k))
    return out


def _magnitudes(delta: jax.Array, select_dtype: Any) -> jax.Array:
    """|δ| in ``select_dtype``, the dtype mergekit computes δ in (bfloat16 for bfloat16
    checkpoints: its δ is the rounded difference, so its top-k ranks the rounded magnitudes).
    Ranking those makes the selection mergekit's, and a 16-bit key is one radix pass instead
    of two (jmerge.merges._select)."""
    mag = jnp.abs(delta)
    return mag if select_dtype is None else mag.astype(select_dtype)


def _within(mag: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """keep = lo_t ≤ |δ_t| ≤ hi_t per model: ``mag`` (N, *s), ``lo``/``hi`` (N,)."""
    return (mag >= _bcast(lo, mag.ndim)) & (mag <= _bcast(hi, mag.ndim))


def _magnitude_bounds(mag: jax.Array, densities: tuple[float, ...]) -> tuple[jax.Array, ...]:
    """(lo, hi), each (N,), with sparsify.magnitude's kept entries = those with
    lo ≤ |δ| ≤ hi (:func:`selection_ranks`), from the (N, *s) magnitudes ``mag``."""
    num, n = mag.shape[0], math.prod(mag.shape[1:])
    flat = mag.reshape(num, n)
    return _bounds_from_ranks(
        selection_ranks("magnitude", n, densities), lambda ks: _kth_per_model(flat, ks),
        mag.dtype)


def selection_ranks(
    kind: str, n: int, densities: Sequence[float], gammas: Sequence[float] | None = None
) -> tuple[tuple[int | None, ...], tuple[int | None, ...], tuple[bool, ...], tuple[bool, ...]]:
    """The ranks that bound a magnitude selection among ``n`` entries, per model:
    ``(lo_ranks, hi_ranks, keep_all, keep_none)``.

    The kept entries are those whose |δ| lies between the value of descending rank
    ``lo_ranks[t]`` (1-based, ties kept) and that of rank ``hi_ranks[t]`` (None: no upper
    bound), every entry where ``keep_all[t]``, none where ``keep_none[t]``.

    * ``kind="magnitude"`` (sparsify.magnitude, TIES): lo rank k = max(1, ⌊density·n⌋);
      density ≥ 1 keeps everything, density ≤ 0 nothing.
    * ``kind="outliers"`` (sparsify.magnitude_outliers, breadcrumbs): mergekit sorts |δ|
      ascending and keeps positions [n_bot, n_bot + target) with target = ⌊density·n⌋,
      n_top = ⌊γ·n⌋, n_bot = max(0, n − target − n_top): in descending rank the kept entries
      are those of rank in (n_top', n_top' + target], n_top' = n − n_bot − target =
      min(n_top, n − target); a target of 0 keeps nothing, density ≥ 1 everything.
    """
    if kind not in ("magnitude", "outliers"):
        raise ValueError(f"selection_ranks: kind must be 'magnitude' or 'outliers'; got {kind!r}.")
    if kind == "outliers" and (gammas is None or len(gammas) != len(densities)):
        raise ValueError("selection_ranks: kind='outliers' needs one gamma per density; got "
                         f"{None if gammas is None else len(gammas)} for {len(densities)}.")
    lo, hi, keep_all, keep_none = [], [], [], []
    for i, d in enumerate(densities):
        if kind == "magnitude":
            lo.append(max(1, int(d * n)) if 0 < d < 1 else None)
            hi.append(None)
            keep_all.append(d >= 1)
            keep_none.append(d <= 0)
            continue
        target = int(d * n)
        top = n - max(0, n - target - int(gammas[i] * n)) - target  # dropped from the top
        active = d < 1 and target > 0
        keep_all.append(d >= 1)
        keep_none.append(d < 1 and target <= 0)
        lo.append(top + target if active else None)
        hi.append(top + 1 if active and top > 0 else None)
    return tuple(lo), tuple(hi), tuple(keep_all), tuple(keep_none)


def _bounds_from_ranks(ranks, kth: Callable, dtype: Any, xp: Any = jnp) -> tuple[Any, Any]:
    """(lo, hi), each (N,) of ``dtype``, from :func:`selection_ranks` and ``kth(ks)``, the
    per-model values of descending ranks ``ks`` (0 where a rank is None). ``xp``: ``jnp``
    (traced, in memory) or ``np`` (host values, the streaming file merge)."""
    lo_ks, hi_ks, keep_all, keep_none = ranks
    inf = xp.asarray(np.inf, dtype)
    lo = xp.asarray(kth(lo_ks), dtype)
    hi = xp.where(xp.asarray([k is None for k in hi_ks]), inf, xp.asarray(kth(hi_ks), dtype))
    lo = xp.where(xp.asarray(keep_all), xp.zeros((), dtype), lo)
    hi = xp.where(xp.asarray(keep_all), inf, hi)
    lo = xp.where(xp.asarray(keep_none), inf, lo)
    hi = xp.where(xp.asarray(keep_none), inf, hi)
    return lo.astype(dtype), hi.astype(dtype)


def _magnitude_keep(
    delta: jax.Array, densities: tuple[float, ...], select_dtype: Any = None
) -> jax.Array:
    """sparsify.magnitude: keep the k = max(1, ⌊density·n⌋) largest |δ| of each model (ties kept).

    density ≥ 1 keeps everything, density ≤ 0 nothing. ``delta``: (N, *s) -> bool (N, *s).
    Magnitudes are ranked in ``select_dtype`` (:func:`_magnitudes`).
    """
    mag = _magnitudes(delta, select_dtype)
    if mag.size == 0:
        return jnp.zeros(delta.shape, bool)
    return _within(mag, *_magnitude_bounds(mag, densities))


def _outlier_bounds(
    mag: jax.Array, densities: tuple[float, ...], gammas: tuple[float, ...]
) -> tuple[jax.Array, ...]:
    """(lo, hi), each (N,), with sparsify.magnitude_outliers' kept entries = lo ≤ |δ| ≤ hi
    (:func:`selection_ranks`), from the (N, *s) magnitudes ``mag``."""
    num, n = mag.shape[0], math.prod(mag.shape[1:])
    flat = mag.reshape(num, n)
    return _bounds_from_ranks(
        selection_ranks("outliers", n, densities, gammas), lambda ks: _kth_per_model(flat, ks),
        mag.dtype)


def _outlier_keep(
    delta: jax.Array, densities: tuple[float, ...], gammas: tuple[float, ...],
    select_dtype: Any = None,
) -> jax.Array:
    """sparsify.magnitude_outliers: drop the ⌊γ·n⌋ largest |δ| and keep the next ⌊density·n⌋
    (:func:`_outlier_bounds`). Magnitudes are ranked in ``select_dtype``
    (:func:`_magnitudes`)."""
    mag = _magnitudes(delta, select_dtype)
    if mag.size == 0:
        return jnp.zeros(delta.shape, bool)
    return _within(mag, *_outlier_bounds(mag, densities, gammas))


def _della_probs(delta: jax.Array, density: jax.Array, epsilon: jax.Array) -> jax.Array:
    """sparsify.della_magprune's keep probabilities, per model: (N, *s) -> (N, *s).

    A 1-D tensor is read as one row; otherwise entries are ranked along axis 1 of the tensor
    (mergekit's ``argsort(dim=1)``; for a matrix: within each row). With r ∈ {1..m} the rank
    by |δ| (ascending) along that axis of length m, p = (density − ε) + 2ε·(r − 1)/(m − 1),
    so the smallest magnitude is kept with probability density − ε and the largest with
    density + ε. For m = 1 (where mergekit divides 0 by 0) the rank term is 0 here.
    """
    x = delta if delta.ndim > 2 else delta[:, None]  # 1-D tensor -> one row
    if x.ndim == 2:  # a 0-d tensor
        raise ValueError("della needs tensors of at least one dimension; got scalars.")
    m = x.shape[2]
    # rank of each entry = inverse permutation of the sort (one sort and a scatter, not two sorts)
    order = jnp.argsort(jnp.abs(x), axis=2)
    positions = jnp.broadcast_to(jnp.arange(m, dtype=jnp.float32), x.shape)
    ranks = jnp.put_along_axis(jnp.zeros(x.shape, jnp.float32), order, positions, axis=2,
                               inplace=False)
    rank_norm = jnp.clip(ranks / max(m - 1, 1), 0, 1)
    d = _bcast(density, x.ndim).astype(jnp.float32)
    e = _bcast(epsilon, x.ndim).astype(jnp.float32)
    return ((d - e) + rank_norm * 2 * e).reshape(delta.shape)


# ---------------------------------------------------------------------------------------------
# Generalized task arithmetic (merge_methods/generalized_task_arithmetic.py)


_GTA_STATIC = ("kind", "static_d", "static_g", "consensus", "normalize", "rescale")


def uniforms(key: jax.Array, shape: tuple[int, ...], start: Any = 0) -> jax.Array:
    """U[0, 1) (float32, multiples of 2⁻²⁴) for a stack of N models, shape (N, *s): model t's
    entry of row-major index i gets the top 24 bits of h(start + i) = mix(mix(start + i + s0)
    ⊕ s1) with (s0, s1) = ``jax.random.bits(key, (N, 2))[t]`` and mix the lowbias32 hash
    (a counter-based generator, as :func:`jmerge.dare`'s masks). Entry i's number depends on
    the key, the model and i only, so a piece of a tensor starting at entry ``start`` (may
    be traced) draws exactly the numbers of the whole tensor there: the random methods merge
    a tensor in chunks without a mask of its size. Fewer than 2³² entries per model."""
    from jmerge.merges.sparse import _mix32

    num, n = shape[0], math.prod(shape[1:])
    if n >= 2**32:
        raise ValueError(f"uniforms: fewer than 2^32 entries per model are supported; got "
                         f"shape {tuple(shape)}.")
    seeds = jax.random.bits(key, (num, 2), jnp.uint32)
    index = jnp.arange(n, dtype=jnp.uint32)[None] + jnp.asarray(start).astype(jnp.uint32)
    h = _mix32(_mix32(index + seeds[:, :1]) ^ seeds[:, 1:])
    return ((h >> np.uint32(8)).astype(jnp.float32) * jnp.float32(2.0**-24)).reshape(shape)


def _keep(delta, d, e, masks, key, *, kind, static_d, static_g, select_dtype=None):
    """The keep masks (N, *s) of a sparsification ``kind`` and which models it acts on (N,)."""
    if kind == "magnitude":
        keep = _magnitude_keep(delta, static_d, select_dtype) if masks is None else masks
        return keep, jnp.asarray(static_d) < 1
    if kind == "outliers":
        keep = (_outlier_keep(delta, static_d, static_g, select_dtype) if masks is None
                else masks)
        return keep, jnp.asarray(static_d) < 1
    # "random" (sparsify.bernoulli) or "della" (sparsify.della_magprune)
    if masks is None:
        u = uniforms(key, delta.shape)
        p = (_bcast(d, delta.ndim).astype(jnp.float32) if kind == "random"
             else _della_probs(delta, d, e))
        keep = u < p
    else:
        keep = masks
    if kind == "della":
        keep = keep & _bcast(d > 0, delta.ndim)  # density <= 0: zeros
    return keep, d < 1


@partial(jax.jit, static_argnames=_GTA_STATIC)
def _gta_kernel(base, tensors, weights, d, e, masks, key, lam, scales=None, *, kind, static_d,
                static_g, consensus, normalize, rescale):
    """GeneralizedTaskArithmeticMerge.merge_group (one compiled program per shape and
    static setting): sparsify each δ_t (``kind``), weight, elect signs, sum, normalise.

    ``scales`` (N,), with ``masks``: the L1 rescale factors computed elsewhere over the whole
    tensor (:func:`sparsify_task_vector`), so that the merge can run on pieces of a tensor."""
    out = _out_dtype(base, tensors)
    wd = compute_dtype(out)
    b = base.astype(wd)
    delta = tensors.astype(wd) - b
    if kind is not None:
        keep, active = _keep(delta, d, e, masks, key, kind=kind, static_d=static_d,
                             static_g=static_g, select_dtype=out)
        if scales is None:
            sparse = _rescaled(delta, keep, rescale)
        else:
            sparse = jnp.where(keep, delta, 0) * _bcast(scales.astype(wd), delta.ndim)
        delta = jnp.where(_bcast(active, delta.ndim), sparse, delta)
    w = _bcast(weights.astype(wd), delta.ndim)
    delta = delta * w
    if consensus is not None:
        mask = _sign_consensus(delta, consensus)
        mixed = model_sum(jnp.where(mask, delta, 0))
        divisor = model_sum(jnp.where(mask, w, 0))
        divisor = jnp.where(divisor == 0, 1, divisor)
    else:
        mixed = model_sum(delta)
        divisor = model_sum(w)
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1, divisor)
    if normalize:
        mixed = mixed / divisor
    mixed = mixed * jnp.asarray(lam, wd)
    return (b + mixed).astype(out)


def _sign_consensus(delta: jax.Array, method: str) -> jax.Array:
    """generalized_task_arithmetic.get_mask: sgn(δ_t) equals the elected sign (±1).

    ``"sum"``: elected +1 where Σ_t δ_t ≥ 0, else −1 (TIES); ``"count"``: +1 where
    Σ_t sgn(δ_t) ≥ 0. Zero entries never agree (their sign is 0).
    """
    sign = jnp.sign(delta)
    total = model_sum(delta if method == "sum" else sign)
    majority = jnp.where(total >= 0, 1, -1).astype(delta.dtype)
    return sign == majority


def _gta(
    method: str,
    base: ArrayLike,
    tensors: ArrayLike,
    weights: ArrayLike,
    *,
    kind: str | None = None,
    densities: ArrayLike = 1.0,
    gammas: ArrayLike = 0.0,
    epsilons: ArrayLike = 0.0,
    key: jax.Array | None = None,
    masks: ArrayLike | None = None,
    scales: ArrayLike | None = None,
    consensus: str | None,
    normalize: bool,
    rescale: bool,
    lambda_: ArrayLike,
) -> jax.Array:
    """Validate the arguments of a generalized-task-arithmetic method and run the kernel."""
    tensors = _stack(tensors)
    base = _base(base, tensors)
    n = tensors.shape[0]
    weights = _per_model(weights, n, f"{method}: weights")
    if consensus is not None:
        _check_consensus(consensus)
    if n == 0:
        return base.astype(_out_dtype(base, tensors))
    static_d = static_g = None
    d = e = None
    if kind in ("magnitude", "outliers"):
        static_d = _static_per_model(densities, n, "densities", method)
        if any(v < 0 for v in static_d):
            raise ValueError(f"{method}: densities must be >= 0; got {list(static_d)}.")
        if kind == "outliers":
            static_g = _static_per_model(gammas, n, "gammas", method)
    elif kind in ("random", "della"):
        d = _per_model(densities, n, f"{method}: densities")
        e = _per_model(epsilons, n, f"{method}: epsilons")
        if kind == "della" and not is_traced(d) and not is_traced(e):
            dn, en = np.asarray(d, np.float64), np.asarray(e, np.float64)
            bad = (dn > 0) & (dn < 1) & ((dn + en >= 1) | (dn - en <= 0))
            if np.any(bad):
                i = int(np.argmax(bad))
                raise ValueError(
                    f"{method}: epsilon must be chosen such that density ± epsilon is in "
                    f"(0, 1) (mergekit sparsify.della_magprune); model {i} has density "
                    f"{dn[i]:g}, epsilon {en[i]:g}."
                )
        if (key is None) == (masks is None):
            raise ValueError(f"{method} needs exactly one of key= (a jax.random key) or masks= "
                             f"(a boolean array of shape {tuple(tensors.shape)}); got "
                             f"{'both' if key is not None else 'neither'}.")
    if masks is not None:
        masks = jnp.asarray(masks)
        if masks.shape != tensors.shape:
            raise ValueError(f"{method}: masks must have shape {tuple(tensors.shape)} (one "
                             f"mask per model, like tensors); got {tuple(masks.shape)}.")
        masks = masks.astype(bool)
    if scales is not None:
        if masks is None:
            raise ValueError(f"{method}: scales= needs masks= (both from sparsify_task_vector).")
        scales = _per_model(scales, n, f"{method}: scales")
    return _gta_kernel(
        base, tensors, weights, d, e, masks, key, jnp.asarray(lambda_), scales, kind=kind,
        static_d=static_d, static_g=static_g, consensus=consensus,
        normalize=bool(normalize), rescale=bool(rescale),
    )


# ---------------------------------------------------------------------------------------------
# Public methods


def linear(tensors: ArrayLike, weights: ArrayLike, *, normalize: bool = True) -> jax.Array:
    """mergekit ``linear`` (merge_methods/linear.py ``linear_merge``).

    θ = Σ_t w_t θ_t, divided by Σ_t w_t when ``normalize`` (the default). The base model, when
    the YAML names one, is an ordinary input here (mergekit appends it to the models and it
    needs a ``weight``). With ``normalize`` and Σ_t w_t = 0 mergekit divides by zero (inf/NaN);
    here concrete weights raise ``ValueError`` instead (traced ones give mergekit's inf/NaN).

    Args:
      tensors: (N, *s) floating point.
      weights: (N,) (or a scalar).
      normalize: divide by the sum of the weights.

    Returns:
      (*s), dtype of ``tensors``.
    """
    tensors = _stack(tensors)
    if tensors.shape[0] == 0:
        raise ValueError("linear needs at least one model; got an empty stack.")
    w = _per_model(weights, tensors.shape[0], "linear: weights")
    if normalize and not is_traced(w) and float(np.sum(np.asarray(w, np.float64))) == 0.0:
        raise ValueError(f"linear: with normalize=True the weights must not sum to 0 (mergekit "
                         f"would divide by zero); got weights {np.asarray(w).tolist()}.")
    return _linear_kernel(tensors, w, normalize=bool(normalize))


@partial(jax.jit, static_argnames=("normalize",))
def _linear_kernel(tensors, w, *, normalize):
    wd = compute_dtype(tensors.dtype)
    w = w.astype(wd)
    out = model_sum(tensors.astype(wd) * _bcast(w, tensors.ndim))
    if normalize:
        out = out / jnp.sum(w)
    return out.astype(tensors.dtype)


def task_arithmetic(
    base: ArrayLike,
    tensors: ArrayLike,
    weights: ArrayLike,
    *,
    normalize: bool = False,
    lambda_: ArrayLike = 1.0,
) -> jax.Array:
    """mergekit ``task_arithmetic`` (generalized_task_arithmetic.py, no sparsification/consensus).

    θ = θ0 + λ · Σ_t w_t (θ_t − θ0) [/ Σ_t w_t if ``normalize``; a sum below 1e-8 in
    magnitude is replaced by 1].

    Args:
      base: θ0, shape s.
      tensors: (N, *s).
      weights: (N,) per-model ``weight``.
      normalize: mergekit default False for this method.
      lambda_: YAML ``lambda``.

    Returns:
      (*s), the promoted dtype of base and tensors.
    """
    return _gta("task_arithmetic", base, tensors, weights, consensus=None,
                normalize=normalize, rescale=False, lambda_=lambda_)


def ties(
    base: ArrayLike,
    tensors: ArrayLike,
    weights: ArrayLike,
    densities: ArrayLike,
    *,
    masks: ArrayLike | None = None,
    scales: ArrayLike | None = None,
    normalize: bool = True,
    rescale: bool = False,
    consensus: str = "sum",
    lambda_: ArrayLike = 1.0,
    int8_mask: bool = False,
) -> jax.Array:
    """mergekit ``ties`` (generalized_task_arithmetic.py with sparsify.magnitude, consensus sum).

    With δ_t = θ_t − θ0:

    1. trim: keep the k_t = max(1, ⌊density_t · n⌋) largest |δ_t| of the tensor (density ≥ 1:
       keep all; ≤ 0: none); with ``rescale``, times ‖δ_t‖₁/‖trimmed δ_t‖₁;
    2. weight: δ_t ← w_t δ_t;
    3. elect: γ = +1 where Σ_t δ_t ≥ 0 else −1 (``consensus="count"``: by Σ_t sgn δ_t);
       A = {t : sgn δ_t = γ};
    4. θ = θ0 + λ · Σ_{t∈A} δ_t [/ Σ_{t∈A} w_t if ``normalize``, 1 where that sum is 0].

    ``densities`` must be concrete (they fix k). ``int8_mask`` only changes mergekit's mask
    dtype, not the result; it is accepted and ignored.

    Returns:
      (*s), the promoted dtype of base and tensors.
    """
    del int8_mask
    return _gta("ties", base, tensors, weights, masks=masks, scales=scales,
                kind="magnitude", densities=densities,
                consensus=consensus, normalize=normalize, rescale=rescale, lambda_=lambda_)


def dare_linear(
    base: ArrayLike,
    tensors: ArrayLike,
    weights: ArrayLike,
    densities: ArrayLike,
    *,
    key: jax.Array | None = None,
    masks: ArrayLike | None = None,
    scales: ArrayLike | None = None,
    normalize: bool = False,
    rescale: bool = True,
    lambda_: ArrayLike = 1.0,
) -> jax.Array:
    """mergekit ``dare_linear`` (generalized_task_arithmetic.py with sparsify.bernoulli).

    δ_t = θ_t − θ0 keeps each entry with probability density_t (``masks`` given: where the
    mask is True), and with ``rescale`` (default) is multiplied by ‖δ_t‖₁/‖m_t ⊙ δ_t‖₁
    (mergekit; the DARE paper rescales by 1/density). density_t ≥ 1: δ_t unchanged.
    θ = θ0 + λ Σ_t w_t δ̃_t [/ Σ_t w_t if ``normalize``].

    Args:
      key: a ``jax.random`` key (one uniform draw of shape (N, *s)), or
      masks: boolean (N, *s), True = keep. Exactly one of the two.

    Returns:
      (*s), the promoted dtype of base and tensors.
    """
    return _gta("dare_linear", base, tensors, weights, kind="random", densities=densities,
                key=key, masks=masks, scales=scales, consensus=None,
                normalize=normalize, rescale=rescale, lambda_=lambda_)


def dare_ties(
    base: ArrayLike,
    tensors: ArrayLike,
    weights: ArrayLike,
    densities: ArrayLike,
    *,
    key: jax.Array | None = None,
    masks: ArrayLike | None = None,
    scales: ArrayLike | None = None,
    normalize: bool = False,
    rescale: bool = True,
    consensus: str = "sum",
    lambda_: ArrayLike = 1.0,
    int8_mask: bool = False,
) -> jax.Array:
    """mergekit ``dare_ties``: :func:`dare_linear`'s random drop, then :func:`ties`' weighting,
    sign election and (with ``normalize``, default False here) division by the agreeing weights.
    """
    del int8_mask
    return _gta("dare_ties", base, tensors, weights, kind="random", densities=densities,
                key=key, masks=masks, scales=scales, consensus=consensus,
                normalize=normalize, rescale=rescale, lambda_=lambda_)


def breadcrumbs(
    base: ArrayLike,
    tensors: ArrayLike,
    weights: ArrayLike,
    densities: ArrayLike,
    gammas: ArrayLike = 0.01,
    *,
    masks: ArrayLike | None = None,
    scales: ArrayLike | None = None,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: ArrayLike = 1.0,
) -> jax.Array:
    """mergekit ``breadcrumbs`` (generalized_task_arithmetic.py with sparsify.magnitude_outliers).

    Per model: drop the ⌊γ_t·n⌋ largest |δ_t| (fewer if needed to keep ⌊density_t·n⌋ entries),
    keep the next ⌊density_t·n⌋ and drop the rest; density ≥ 1 keeps all. Then
    θ = θ0 + λ Σ_t w_t δ̃_t [/ Σ_t w_t]. ``densities`` and ``gammas`` must be concrete.
    """
    return _gta("breadcrumbs", base, tensors, weights, masks=masks, scales=scales,
                kind="outliers", densities=densities,
                gammas=gammas, consensus=None,
                normalize=normalize, rescale=rescale, lambda_=lambda_)


def breadcrumbs_ties(
    base: ArrayLike,
    tensors: ArrayLike,
    weights: ArrayLike,
    densities: ArrayLike,
    gammas: ArrayLike = 0.01,
    *,
    masks: ArrayLike | None = None,
    scales: ArrayLike | None = None,
    normalize: bool = False,
    rescale: bool = False,
    consensus: str = "sum",
    lambda_: ArrayLike = 1.0,
    int8_mask: bool = False,
) -> jax.Array:
    """mergekit ``breadcrumbs_ties``: :func:`breadcrumbs`' trimming with :func:`ties`' sign
    election (``normalize`` default False, as in mergekit)."""
    del int8_mask
    return _gta("breadcrumbs_ties", base, tensors, weights, masks=masks, scales=scales,
                kind="outliers", densities=densities,
                gammas=gammas, consensus=consensus,
                normalize=normalize, rescale=rescale, lambda_=lambda_)


def della(
    base: ArrayLike,
    tensors: ArrayLike,
    weights: ArrayLike,
    densities: ArrayLike,
    epsilons: ArrayLike = 0.15,
    *,
    key: jax.Array | None = None,
    masks: ArrayLike | None = None,
    scales: ArrayLike | None = None,
    normalize: bool = True,
    rescale: bool = True,
    consensus: str = "sum",
    lambda_: ArrayLike = 1.0,
    int8_mask: bool = False,
) -> jax.Array:
    """mergekit ``della`` (generalized_task_arithmetic.py with sparsify.della_magprune).

    Each entry of δ_t is kept with probability p = (density_t − ε_t) + 2ε_t·(r − 1)/(m − 1),
    r the ascending rank of |δ_t| along axis 1 of the tensor (a 1-D tensor: along its only
    axis) of length m; with ``rescale`` (default) the kept entries are multiplied by
    ‖δ_t‖₁/‖m ⊙ δ_t‖₁ (mergekit; the paper rescales by 1/p). density ≥ 1: unchanged;
    density ≤ 0: zeros. Then :func:`ties`' weighting, sign election and normalisation.
    Raises ``ValueError`` unless density ± epsilon ∈ (0, 1) for 0 < density < 1 (when
    concrete), as mergekit does.
    """
    del int8_mask
    return _gta("della", base, tensors, weights, kind="della", densities=densities,
                epsilons=epsilons, key=key, masks=masks, scales=scales, consensus=consensus,
                normalize=normalize, rescale=rescale, lambda_=lambda_)


def della_linear(
    base: ArrayLike,
    tensors: ArrayLike,
    weights: ArrayLike,
    densities: ArrayLike,
    epsilons: ArrayLike = 0.15,
    *,
    key: jax.Array | None = None,
    masks: ArrayLike | None = None,
    scales: ArrayLike | None = None,
    normalize: bool = False,
    rescale: bool = True,
    lambda_: ArrayLike = 1.0,
) -> jax.Array:
    """mergekit ``della_linear``: :func:`della`'s drop without sign election; θ = θ0 +
    λ Σ_t w_t δ̃_t [/ Σ_t w_t if ``normalize``, default False]."""
    return _gta("della_linear", base, tensors, weights, kind="della", densities=densities,
                epsilons=epsilons, key=key, masks=masks, scales=scales, consensus=None,
                normalize=normalize, rescale=rescale, lambda_=lambda_)


def slerp(a: ArrayLike, b: ArrayLike, t: ArrayLike) -> jax.Array:
    """mergekit ``slerp`` (merge_methods/slerp.py ``slerp``), over the whole flattened tensor.

    With â = a/‖a‖, b̂ = b/‖b‖ (a norm ≤ 1e-8 is replaced by 1), c = clip(â·b̂, −1, 1) and
    θ = arccos c:  (sin((1−t)θ) a + sin(tθ) b) / sin θ, and (1−t) a + t b when |c| > 0.9995.
    ``a`` is the base model (t = 0 gives a). Computed in float32 (float64 for float64 a).

    Args:
      a: base tensor, any shape.
      b: the other model's tensor, same shape.
      t: scalar interpolation factor (may be traced).

    Returns:
      shape and dtype of ``a``.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"slerp: a and b must have the same shape; got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}.")
    t = jnp.asarray(t)
    if t.ndim != 0:
        raise ValueError(f"slerp: t must be a scalar; got shape {tuple(t.shape)}.")
    return _slerp_kernel(a, b, t)


@jax.jit
def _slerp_kernel(a, b, t):
    wd = jnp.float64 if a.dtype == jnp.float64 else jnp.float32
    x, y, t = a.astype(wd).reshape(-1), b.astype(wd).reshape(-1), t.astype(wd)
    if x.size == 0:
        return ((1 - t) * x + t * y).reshape(a.shape).astype(a.dtype)
    na, nb = jnp.linalg.norm(x), jnp.linalg.norm(y)
    na = jnp.where(na > _SLERP_EPS, na, 1)
    nb = jnp.where(nb > _SLERP_EPS, nb, 1)
    dot = jnp.clip(jnp.sum((x / na) * (y / nb)), -1, 1)
    lin = jnp.abs(dot) > _SLERP_DOT_THRESHOLD
    theta = jnp.arccos(jnp.where(lin, 0, dot))
    sin_theta = jnp.where(lin, 1, jnp.sin(theta))
    ca = jnp.where(lin, 1 - t, jnp.sin((1 - t) * theta) / sin_theta)
    cb = jnp.where(lin, t, jnp.sin(t * theta) / sin_theta)
    return (ca * x + cb * y).reshape(a.shape).astype(a.dtype)


def nuslerp(
    base: ArrayLike | None,
    tensors: ArrayLike,
    weights: ArrayLike,
    *,
    row_wise: bool = False,
    flatten: bool = True,
) -> jax.Array:
    """mergekit ``nuslerp`` (merge_methods/nuslerp.py ``nuslerp_merge_method``, ``nuslerp``).

    t = w_1/(w_0 + w_1) (0.5 if |w_0 + w_1| < 1e-6). With a base, slerp of the task vectors:
    θ = θ0 + S(t, θ_0 − θ0, θ_1 − θ0); without one, θ = S(t, θ_0, θ_1). S normalises along
    the last axis (``flatten``, default True: the whole tensor; ``row_wise``: axis 0 instead),
    each norm clamped below at 1e-7, c = clip(û·v̂, −1, 1), θ = arccos c:
    S = (sin((1−t)θ) u + sin(tθ) v) / sin θ, and (1−t) u + t v where 1 − c² ≤ 1e-16.
    ``flatten`` takes precedence over ``row_wise``. (YAML: ``nuslerp_flatten``,
    ``nuslerp_row_wise``.)

    Args:
      base: θ0 (shape s) or None.
      tensors: (2, *s), the two non-base models.
      weights: (2,) their ``weight``.

    Returns:
      (*s), the promoted dtype of the inputs.
    """
    tensors = _stack(tensors)
    if tensors.shape[0] != 2:
        raise ValueError(f"nuslerp merges exactly 2 models (besides the base); got "
                         f"{tensors.shape[0]}.")
    w = _per_model(weights, 2, "nuslerp: weights")
    b = None if base is None else _base(base, tensors)
    if tensors.ndim == 1 and not flatten:
        raise ValueError("nuslerp: scalar tensors need flatten=True.")
    return _nuslerp_kernel(b, tensors, w, row_wise=bool(row_wise), flatten=bool(flatten))


@partial(jax.jit, static_argnames=("row_wise", "flatten"))
def _nuslerp_kernel(base, tensors, w, *, row_wise, flatten):
    out = _out_dtype(tensors) if base is None else _out_dtype(base, tensors)
    wd = compute_dtype(out)
    w = w.astype(wd)
    total = w[0] + w[1]
    t = jnp.where(jnp.abs(total) < 1e-6, 0.5, w[1] / jnp.where(total == 0, 1, total))
    v0, v1 = tensors[0].astype(wd), tensors[1].astype(wd)
    if base is not None:
        v0, v1 = v0 - base.astype(wd), v1 - base.astype(wd)
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = jnp.swapaxes(v0, 0, -1), jnp.swapaxes(v1, 0, -1)

    def unit(x):
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-7)

    cos = jnp.clip(jnp.sum(unit(v0) * unit(v1), axis=-1, keepdims=True), -1, 1)
    colinear = (1 - cos**2) <= 1e-16
    theta = jnp.arccos(jnp.where(colinear, 0, cos))
    sin_theta = jnp.where(colinear, 1, jnp.sin(theta))
    res = (jnp.sin((1 - t) * theta) * v0 + jnp.sin(t * theta) * v1) / sin_theta
    res = jnp.where(colinear, (1 - t) * v0 + t * v1, res)
    if row_wise and not flatten:
        res = jnp.swapaxes(res, 0, -1)
    res = res.reshape(shape)
    if base is not None:
        res = base.astype(wd) + res
    return res.astype(out)


def model_stock(base: ArrayLike, tensors: ArrayLike, *, filter_wise: bool = False) -> jax.Array:
    """mergekit ``model_stock`` (merge_methods/model_stock.py ``model_stock_merge_method``).

    With δ_t = θ_t − θ0 (flattened; ``filter_wise``: per vector along the last axis, a 1-D
    tensor being one vector), cos θ = mean over pairs s < t of δ_s·δ_t / max(‖δ_s‖‖δ_t‖,
    1e-6) (each clipped to [−1, 1]); with N models τ = N cos θ / (1 + (N−1) cos θ) (τ = 0,
    i.e. the base, where |1 + (N−1) cos θ| < 1e-6) and θ = τ · mean_t θ_t + (1 − τ) θ0.

    Args:
      base: θ0, shape s.
      tensors: (N, *s), N ≥ 2.

    Returns:
      (*s), the promoted dtype of base and tensors.
    """
    tensors = _stack(tensors)
    base = _base(base, tensors)
    if tensors.shape[0] < 2:
        raise ValueError(f"model_stock needs at least 2 models besides the base; got "
                         f"{tensors.shape[0]}.")
    if base.ndim == 0:
        raise ValueError("model_stock needs tensors of at least one dimension; got scalars.")
    return _model_stock_kernel(base, tensors, filter_wise=bool(filter_wise))


@partial(jax.jit, static_argnames=("filter_wise",))
def _model_stock_kernel(base, tensors, *, filter_wise):
    out = _out_dtype(base, tensors)
    wd = compute_dtype(out)
    w0, ws = base.astype(wd), tensors.astype(wd)
    n = ws.shape[0]
    if not filter_wise:
        w0, ws = w0.reshape(-1), ws.reshape(n, -1)
    d = ws - w0
    norms = jnp.linalg.norm(d, axis=-1)  # (N, *rows)
    i, j = np.triu_indices(n, k=1)
    dots = jnp.sum(d[i] * d[j], axis=-1)
    cos = jnp.clip(dots / jnp.maximum(norms[i] * norms[j], 1e-6), -1, 1)
    cos = jnp.mean(cos, axis=0)[..., None]
    den = 1 + (n - 1) * cos
    singular = jnp.abs(den) < 1e-6
    t = jnp.where(singular, 0, (n * cos) / jnp.where(singular, 1, den))
    avg = model_sum(ws) / n
    return (t * avg + (1 - t) * w0).reshape(base.shape).astype(out)


def sce(
    base: ArrayLike,
    tensors: ArrayLike,
    *,
    select_topk: ArrayLike = 1.0,
    int8_mask: bool = False,
) -> jax.Array:
    """mergekit ``sce`` (merge_methods/sce.py ``sce_merge``, ``sce_mask``, ``sce_weight``).

    With τ_t = θ_t − θ0:

    1. select (only if ``select_topk`` < 1): keep the entries with the k largest variances
       across models, σ² = Var_t τ_t (population), k = ⌊z · ρ⌋ with z the number of entries
       of non-zero variance and ρ = ``select_topk`` (in float32, as torch); k = 0 or ρ ≤ 0:
       nothing is kept. Ties at the threshold are kept;
    2. weights: v_t = mean(τ_t²), w_t = v_t / Σ_s v_s (w_t = 1/N if |Σ_s v_s| < 1e-6);
    3. erase: A = {t : sgn τ_t = γ}, γ = +1 where Σ_t τ_t ≥ 0 else −1;
    4. θ = θ0 + Σ_{t∈A} w_t τ_t / max(Σ_{t∈A} w_t, 1e-6).

    mergekit's sce has no per-model parameters. ``int8_mask`` does not change the result.

    Returns:
      (*s), the promoted dtype of base and tensors.
    """
    del int8_mask
    tensors = _stack(tensors)
    base = _base(base, tensors)
    if tensors.shape[0] == 0:
        return base.astype(_out_dtype(base, tensors))
    rho = jnp.asarray(select_topk)
    if rho.ndim != 0:
        raise ValueError(f"sce: select_topk must be a scalar; got shape {tuple(rho.shape)}.")
    return _sce_kernel(base, tensors, rho)


@jax.jit
def _sce_kernel(base, tensors, rho):
    out = _out_dtype(base, tensors)
    wd = compute_dtype(out)
    b = base.astype(wd)
    tv = tensors.astype(wd) - b
    n = tv.shape[0]
    # sce_mask (applied only when select_topk < 1)
    mean = model_sum(tv) / n
    var = (model_sum(jnp.square(tv - mean)) / n).reshape(-1)
    nonzero = jnp.count_nonzero(var)
    k = jnp.floor(nonzero.astype(jnp.float32) * rho.astype(jnp.float32)).astype(jnp.int32)
    desc = -jnp.sort(-var) if var.size else var
    thr = desc[jnp.clip(k - 1, 0, max(var.size - 1, 0))] if var.size else jnp.zeros((), wd)
    select = (var >= thr) & (k > 0) & (rho > 0)
    select = jnp.where(rho >= 1, True, select).reshape(tv.shape[1:])
    tv = jnp.where((rho < 1) & select[None], tv, jnp.where(rho < 1, 0, tv))
    # sce_weight
    v = jnp.mean(jnp.square(tv.reshape(n, -1)), axis=1)
    s = jnp.sum(v)
    small = jnp.abs(s) < 1e-6
    w = jnp.where(small, 1.0 / n, v / jnp.where(small, 1, s))
    w = _bcast(w, tv.ndim)
    erased = jnp.where(_sign_consensus(tv, "sum"), w, 0)
    merged = model_sum(tv * erased) / jnp.maximum(model_sum(erased), 1e-6)
    return (b + merged).astype(out)


# ---------------------------------------------------------------------------------------------
# Registry


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default of a parameter the YAML must give (mergekit raises "Missing required parameter")."""


class Param(NamedTuple):
    """A method parameter as mergekit declares it (merge_methods/base.py ``ParameterSpec``).

    Attributes:
      type: ``float`` or ``bool`` (values are validated to it).
      default: the default, or :data:`REQUIRED`.
      doc: one line for ``--help``.
    """

    type: type
    default: Any
    doc: str


class MethodSpec(NamedTuple):
    """One merge method of the YAML.

    Attributes:
      fn: the public function (for the tensor methods in this module; ``None`` for the
        principled merges registered in :mod:`jmerge.config`, which the executor runs).
      needs_base: the YAML must set ``base_model``.
      per_model: per-model parameter names (as in the YAML) -> :class:`Param`.
      global_: global parameter names (as in the YAML) -> :class:`Param`.
      random: the method draws random masks (takes ``key=`` or ``masks=``).
      doc: one line.
      base: how a ``base_model`` is used: ``"required"``, ``"optional"`` (used if given),
        or ``"input"`` (mergekit appends it to the models as an ordinary input).
      num_models: (min, max) number of non-base models; max None = unbounded.
      apply: ``apply(base, tensors, per_model, global_, key=None, masks=None)`` with the
        parameter dictionaries keyed by YAML names (see :func:`merge_tensor`).
    """

    fn: Callable[..., jax.Array] | None
    needs_base: bool
    per_model: Mapping[str, Param]
    global_: Mapping[str, Param]
    random: bool
    doc: str
    base: str = "required"
    num_models: tuple[int, int | None] = (1, None)
    apply: Callable[..., jax.Array] | None = None


_WEIGHT = Param(float, REQUIRED, "weight of the model's task vector (mergekit: required)")
_DENSITY = Param(float, 1.0, "fraction of the task vector kept")
_GAMMA = Param(float, 0.01, "fraction of the largest magnitudes dropped")
_EPSILON = Param(float, 0.15, "keep probabilities span density ± epsilon by magnitude rank")
_INT8 = Param(bool, False, "mergekit's mask dtype (no effect on the result)")
_LAMBDA = Param(float, 1.0, "scale of the merged task vector")


def _gta_globals(normalize: bool, rescale: bool) -> dict[str, Param]:
    return {
        "int8_mask": _INT8,
        "normalize": Param(bool, normalize, "divide by the sum of the (agreeing) weights"),
        "rescale": Param(bool, rescale, "rescale kept entries to the task vector's L1 norm"),
        "lambda": _LAMBDA,
    }


def _gta_apply(fn, extra=(), random=False):
    def apply(base, tensors, per_model, global_, key=None, masks=None, scales=None):
        kwargs = dict(normalize=global_["normalize"], lambda_=global_["lambda"])
        if fn is not task_arithmetic:  # sparsifying methods
            kwargs.update(rescale=global_["rescale"], masks=masks, scales=scales)
        if random:
            kwargs.update(key=key)
        if fn in (ties, dare_ties, breadcrumbs_ties, della):
            kwargs["int8_mask"] = global_["int8_mask"]
        args = [per_model["weight"]]
        if fn is not task_arithmetic:
            args.append(per_model["density"])
        args += [per_model[name] for name in extra]
        return fn(base, tensors, *args, **kwargs)

    return apply


def _gta_spec(fn, doc, *, normalize, rescale, extra=(), random=False) -> MethodSpec:
    per_model = {"weight": _WEIGHT, "density": _DENSITY}  # task_arithmetic: declared, unused
    per_model.update({name: {"gamma": _GAMMA, "epsilon": _EPSILON}[name] for name in extra})
    return MethodSpec(fn, True, per_model, _gta_globals(normalize, rescale), random, doc,
                      apply=_gta_apply(fn, extra, random))


def _apply_linear(base, tensors, per_model, global_, key=None, masks=None, scales=None):
    del base, key, masks, scales
    return linear(tensors, per_model["weight"], normalize=global_["normalize"])


def _apply_slerp(base, tensors, per_model, global_, key=None, masks=None, scales=None):
    del per_model, key, masks, scales
    return slerp(base, _stack(tensors)[0], global_["t"])


def _apply_nuslerp(base, tensors, per_model, global_, key=None, masks=None, scales=None):
    del key, masks, scales
    return nuslerp(base, tensors, per_model["weight"], row_wise=global_["nuslerp_row_wise"],
                   flatten=global_["nuslerp_flatten"])


def _apply_model_stock(base, tensors, per_model, global_, key=None, masks=None, scales=None):
    del per_model, key, masks, scales
    return model_stock(base, tensors, filter_wise=global_["filter_wise"])


def _apply_sce(base, tensors, per_model, global_, key=None, masks=None, scales=None):
    del per_model, key, masks, scales
    return sce(base, tensors, select_topk=global_["select_topk"],
               int8_mask=global_["int8_mask"])


METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec(
        linear, False, {"weight": Param(float, REQUIRED, "weight of the model (mergekit: "
                                        "required; also for the base model if one is named)")},
        {"normalize": Param(bool, True, "divide by the sum of the weights")}, False,
        "weighted average of the models (base_model, if given, is one more input)",
        base="input", apply=_apply_linear),
    "task_arithmetic": _gta_spec(
        task_arithmetic, "θ0 + λ Σ w_t (θ_t − θ0)", normalize=False, rescale=False),
    "ties": _gta_spec(
        ties, "TIES: top-density magnitudes, sign election (sum), mean of agreeing",
        normalize=True, rescale=False),
    "dare_ties": _gta_spec(
        dare_ties, "DARE drop (keep prob. density, L1 rescale) + TIES sign election",
        normalize=False, rescale=True, random=True),
    "dare_linear": _gta_spec(
        dare_linear, "DARE drop (keep prob. density, L1 rescale) + weighted sum",
        normalize=False, rescale=True, random=True),
    "breadcrumbs": _gta_spec(
        breadcrumbs, "Model Breadcrumbs: drop the largest gamma and the smallest magnitudes",
        normalize=False, rescale=False, extra=("gamma",)),
    "breadcrumbs_ties": _gta_spec(
        breadcrumbs_ties, "Model Breadcrumbs + TIES sign election",
        normalize=False, rescale=False, extra=("gamma",)),
    "della": _gta_spec(
        della, "DELLA: magnitude-ranked random drop (density ± epsilon) + TIES sign election",
        normalize=True, rescale=True, extra=("epsilon",), random=True),
    "della_linear": _gta_spec(
        della_linear, "DELLA's magnitude-ranked random drop + weighted sum",
        normalize=False, rescale=True, extra=("epsilon",), random=True),
    "slerp": MethodSpec(
        slerp, True, {}, {"t": Param(float, REQUIRED, "interpolation factor (0: base_model)")},
        False, "spherical interpolation between base_model and one other model",
        num_models=(1, 1), apply=_apply_slerp),
    "nuslerp": MethodSpec(
        nuslerp, False, {"weight": _WEIGHT},
        {"nuslerp_row_wise": Param(bool, False, "slerp along axis 0 instead of the last"),
         "nuslerp_flatten": Param(bool, True, "slerp the flattened tensor")},
        False, "slerp of two models (of their task vectors if base_model is given), "
               "t = w_1/(w_0 + w_1)",
        base="optional", num_models=(2, 2), apply=_apply_nuslerp),
    "model_stock": MethodSpec(
        model_stock, True, {}, {"filter_wise": Param(bool, False, "one ratio per row")},
        False, "Model Stock: interpolate base and the average by the task vectors' angle",
        num_models=(2, None), apply=_apply_model_stock),
    "sce": MethodSpec(
        sce, True, {}, {"int8_mask": _INT8,
                        "select_topk": Param(float, 1.0, "fraction of highest-variance entries")},
        False, "SCE: variance top-k select, squared-magnitude weights, sign erase",
        apply=_apply_sce),
}
"""mergekit 0.1.5's methods (merge_methods/registry.py) implemented here, by YAML name."""


def merge_tensor(
    method: str,
    base: ArrayLike | None,
    tensors: ArrayLike,
    per_model: Mapping[str, ArrayLike],
    global_: Mapping[str, Any],
    *,
    key: jax.Array | None = None,
    masks: ArrayLike | None = None,
    scales: ArrayLike | None = None,
) -> jax.Array:
    """Merge one tensor with a method of :data:`METHODS`, parameters keyed by YAML names.

    Missing parameters take the method's defaults (``ValueError`` naming a missing required
    one); unknown names raise ``ValueError`` listing the allowed ones.

    Args:
      method: a key of :data:`METHODS`.
      base: the base tensor (shape s) or None (methods whose ``base`` is ``"input"`` ignore
        it: the caller puts the base model among ``tensors``).
      tensors: (N, *s), the models in config order (:attr:`jmerge.config.MergeConfig.stack`).
      per_model: name -> (N,) array.
      global_: name -> value.
      key, masks: for random methods (one of the two); ``masks`` (and ``scales``, see
        :func:`sparsify_task_vector`) also for the other sparsifying methods.
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; allowed: {', '.join(METHODS)}.")
    spec = METHODS[method]
    resolved = []
    for kind, given, declared in (("per-model", per_model, spec.per_model),
                                  ("global", global_, spec.global_)):
        unknown = sorted(set(given) - set(declared))
        if unknown:
            raise ValueError(f"{method}: unknown {kind} parameter(s) {unknown}; allowed: "
                             f"{sorted(declared) or 'none'}.")
        values = {}
        for name, p in declared.items():
            if name in given:
                values[name] = given[name]
            elif p.default is REQUIRED:
                raise ValueError(f"{method}: missing required {kind} parameter {name!r}.")
            else:
                values[name] = p.default
        resolved.append(values)
    if spec.needs_base and base is None:
        raise ValueError(f"{method} needs a base tensor.")
    if not spec.random and key is not None:
        raise ValueError(f"{method} is not random; it takes no key.")
    if (masks is not None or scales is not None) and _GTA_KIND.get(method) is None:
        raise ValueError(f"{method} does not sparsify; it takes no masks or scales.")
    return spec.apply(base, tensors, resolved[0], resolved[1], key=key, masks=masks,
                      scales=scales)


_GTA_KIND = {
    "ties": "magnitude", "breadcrumbs": "outliers", "breadcrumbs_ties": "outliers",
    "dare_linear": "random", "dare_ties": "random", "della": "della", "della_linear": "della",
}
"""The sparsification (mergekit sparsify.py) of each sparsifying method."""


def sparsify_task_vector(
    method: str,
    base: ArrayLike,
    tensor: ArrayLike,
    per_model: Mapping[str, Any],
    global_: Mapping[str, Any],
    *,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One model's keep mask and L1 rescale factor under ``method``'s sparsification.

    For δ = ``tensor`` − ``base`` (one model, the whole tensor) returns ``(keep, scale)``:
    ``keep`` (bool, shape s) as the method draws or selects it (mergekit sparsify.py:
    magnitude top-k for ``ties``, outliers for ``breadcrumbs*``, Bernoulli for ``dare_*``,
    rank-dependent Bernoulli for ``della*``), and ``scale`` = ‖δ‖₁ / ‖keep ⊙ δ‖₁ when the
    method's ``rescale`` is on (1 if either norm is below 1e-7, as mergekit), else 1.
    :func:`merge_tensor` with ``masks`` = the stacked ``keep`` and ``scales`` = the factors
    equals the merge that computes them itself; being elementwise, it can run on any piece of
    the tensor — the streaming file merge holds one model's task vector at a time this way.

    Args:
      method: a sparsifying method (``ties``, ``breadcrumbs``, ``breadcrumbs_ties``,
        ``dare_linear``, ``dare_ties``, ``della``, ``della_linear``).
      base, tensor: shape s.
      per_model: this model's parameters (scalars) by YAML name (``density``, ``gamma``,
        ``epsilon``; ``weight`` is ignored).
      global_: the method's global parameters (``rescale``; defaults apply).
      key: for the random methods (this model's key).
    """
    if method not in _GTA_KIND:
        raise ValueError(f"{method!r} does not sparsify; sparsifying methods: "
                         f"{', '.join(_GTA_KIND)}.")
    spec = METHODS[method]
    kind = _GTA_KIND[method]
    value = lambda name: float(np.asarray(per_model.get(name, spec.per_model[name].default)))
    density = value("density")
    gamma = value("gamma") if "gamma" in spec.per_model else 0.0
    epsilon = value("epsilon") if "epsilon" in spec.per_model else 0.0
    rescale = bool(global_.get("rescale", spec.global_["rescale"].default))
    if spec.random and key is None:
        raise ValueError(f"{method} needs key= (this model's jax.random key).")
    static = (density,) if kind in ("magnitude", "outliers") else None
    return _sparsify_one(
        jnp.asarray(base), jnp.asarray(tensor), jnp.asarray([density]), jnp.asarray([epsilon]),
        key, kind=kind, static_d=static, static_g=(gamma,) if kind == "outliers" else None,
        rescale=rescale)


SELECTING = frozenset(m for m, k in _GTA_KIND.items() if k in ("magnitude", "outliers"))
"""The sparsifying methods whose masks are magnitude selections: ``lo ≤ |δ| ≤ hi`` per model
(:func:`selection_ranks`, :func:`keep_within`)."""


def keep_within(base: ArrayLike, tensors: ArrayLike, lo: ArrayLike, hi: ArrayLike) -> jax.Array:
    """The keep masks ``lo_t ≤ |θ_t − θ_base| ≤ hi_t`` (bool, (N, *s)) of ``tensors`` (N, *s),
    |δ| in the inputs' promoted dtype (as mergekit ranks it), for ``lo``/``hi`` (N,): the
    values of the ranks :func:`selection_ranks` gives, found over the whole tensor (the
    streaming file merge finds them chunk by chunk and merges each chunk with these masks).

    Raises:
      ValueError: ``base`` is not shaped like one model of ``tensors``, or ``lo`` / ``hi``
        are not one value per model.
    """
    base, tensors = jnp.asarray(base), jnp.asarray(tensors)
    if tensors.ndim < 1 or base.shape != tensors.shape[1:]:
        raise ValueError(f"keep_within: base must have shape tensors.shape[1:] = "
                         f"{tuple(tensors.shape[1:])}; got {tuple(base.shape)}.")
    for name, b in (("lo", lo), ("hi", hi)):
        if jnp.shape(b) != tensors.shape[:1]:
            raise ValueError(f"keep_within: {name} must have one value per model, shape "
                             f"{tuple(tensors.shape[:1])}; got {tuple(jnp.shape(b))}.")
    out = _out_dtype(base, tensors)
    wd = compute_dtype(out)
    mag = _magnitudes(tensors.astype(wd) - base.astype(wd), out)
    return _within(mag, jnp.asarray(lo).astype(out), jnp.asarray(hi).astype(out))


@partial(jax.jit, static_argnames=("kind", "static_d", "static_g", "rescale"))
def _sparsify_one(base, tensor, d, e, key, *, kind, static_d, static_g, rescale):
    out = _out_dtype(base, tensor[None])
    wd = compute_dtype(out)
    delta = (tensor.astype(wd) - base.astype(wd))[None]
    keep, _ = _keep(delta, d, e, None, key, kind=kind, static_d=static_d, static_g=static_g,
                    select_dtype=out)
    if not rescale:
        return keep[0], jnp.ones((), wd)
    before = jnp.sum(jnp.abs(delta))
    after = jnp.sum(jnp.abs(jnp.where(keep, delta, 0)))
    small = (before < _RESCALE_EPS) | (after < _RESCALE_EPS)
    return keep[0], jnp.where(small, 1, before / jnp.where(small, 1, after)).astype(wd)
