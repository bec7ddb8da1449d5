"""Exact order statistics without sorting, shared by the trimming merges (TIES, breadcrumbs, DELLA).

``kth_largest(x, k)`` is the k-th largest entry along the last axis of ``x``, equal to
``lax.top_k(x, k)[0][..., k - 1]``; ``kth_largest_over(leaves, k, batch_ndim=b)`` is the k-th
largest over all entries of several arrays at once (their trailing axes), without concatenating
them (TIES's global threshold over the leaves of a model).

Method: radix select (MSD) on an order-preserving integer key. Each value is mapped to an
unsigned integer of its width whose order is the total order of ``lax.sort``
(-NaN < -inf < … < -0.0 < +0.0 < … < +inf < +NaN for floats): the bit pattern with the sign
bit set for non-negative floats and all bits flipped for negative ones. The key is decided
from its top bits down, a digit of up to 16 bits per pass: each pass is a histogram (a
scatter-add into 2^digit bins) of the next digit over the entries whose higher digits equal
the ones decided so far, then a suffix sum over the bins picks the digit whose bin holds the
k-th largest. Counts are exact integers, so the result is exactly the k-th value of the sorted
order, ties included. Passes: 2 for 32-bit keys (float32, int32), 1 for 16-bit (bfloat16,
float16), 4 for 64-bit; each reads the input once and sorts nothing.

Cost and sharding: a pass reads the input once and scatter-adds one int32 per entry; the
histograms hold ``prod(batch) × 2^digit`` int32 counts (the digit is at most 16 bits and at
most about log2 of the entries per row, so they never outgrow the input by much). With the
input sharded over the reduced axes, each histogram is a local scatter-add plus an all-reduce
of those counts (256 KiB per row at 16 bits): the input is never gathered.

On CPU the histogram is a native kernel (``jmerge._kernels``, an XLA FFI call: 0.44 ns per
entry on the project's 2 cores against 3.5 ns for XLA:CPU's scatter-add, bf16 keys), used where
no input can be sharded (one device, no mesh in context; :func:`_use_cpu_kernel`); sharded
inputs and other platforms keep the scatter-add, whose partitioning is XLA's. Measured on
XLA:CPU before the kernel (2 cores, float32, 4 × 4e7 entries): one scatter-add pass costs about
1.2-2 times a copy of the input; a fused compare-and-count reduction about 1.3 copies per pass, so a
1-bit bisection (31 passes) is ~10x slower than the 2 histogram passes, and counting several
thresholds in one reduction did not fuse (cost grew with the number of thresholds). GPU/TPU
were not measured here: there, scatter-add histograms are the standard fast path of radix
select (shared-memory atomics on GPU).

Order: ``lax.sort``'s total order, so the result equals ``top_k``'s bit for bit, the sign of
a zero included, and a NaN counts as largest (+NaN) or smallest (-NaN) as in ``top_k`` (merge
inputs are validated finite before they get here). Subnormals and infinities are ordinary keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jmerge.sharding import explicit_sharding

__all__ = [
    "kth_largest",
    "kth_largest_abs_diff",
    "kth_largest_abs_diff_over",
    "kth_largest_over",
]

_MAX_DIGIT = 16  # bits decided per pass: histograms of at most 65536 bins


def _key_dtype(dtype: np.dtype) -> np.dtype:
    bits = np.dtype(dtype).itemsize * 8
    return np.dtype(f"uint{bits}")


def _to_key(x: jax.Array) -> jax.Array:
    """An unsigned integer of x's width whose order is ``lax.sort``'s total order of x."""
    kd = _key_dtype(x.dtype)
    sign = np.array(1 << (kd.itemsize * 8 - 1), kd)
    if jnp.issubdtype(x.dtype, jnp.floating):
        bits = jax.lax.bitcast_convert_type(x, kd)
        return jnp.where(bits >= sign, ~bits, bits | sign)
    if jnp.issubdtype(x.dtype, jnp.signedinteger):
        return jax.lax.bitcast_convert_type(x, kd) ^ sign
    if jnp.issubdtype(x.dtype, jnp.unsignedinteger):
        return x
    raise TypeError(f"kth_largest needs a float or integer array; got dtype {x.dtype}.")


def _from_key(key: jax.Array, dtype: np.dtype) -> jax.Array:
    """Inverse of :func:`_to_key`."""
    kd = key.dtype
    sign = np.array(1 << (kd.itemsize * 8 - 1), kd)
    if jnp.issubdtype(dtype, jnp.floating):
        bits = jnp.where(key >= sign, key ^ sign, ~key)
        return jax.lax.bitcast_convert_type(bits, dtype)
    if jnp.issubdtype(dtype, jnp.signedinteger):
        return jax.lax.bitcast_convert_type(key ^ sign, dtype)
    return key


def _digits(key_bits: int, n: int) -> list[int]:
    """Digit widths from the top: at most 16 bits, and about log2(n) when rows are short."""
    width = max(1, min(_MAX_DIGIT, key_bits, max(n - 1, 1).bit_length()))
    passes = -(-key_bits // width)
    base, extra = divmod(key_bits, passes)
    return [base + (i < extra) for i in range(passes)]


def _use_cpu_kernel(digit: jax.Array, kernel: bool | None) -> bool:
    """Whether a selection may use the CPU kernels (``jmerge._kernels``): the histogram of
    :func:`_histogram` and the one-pass k-th of :func:`kth_largest_abs_diff_over`.

    The kernel is an opaque custom call to XLA's partitioner, which would gather a sharded
    input to one device before it; so by default (``kernel=None``) it is used only where no
    input can be sharded: one device in the process and no mesh in context. Callers that
    know their arrays live on one device (the streaming file merge) pass ``kernel=True``.
    """
    if kernel is None:
        kernel = _KERNEL_DEFAULT
    if kernel is False:
        return False
    if kernel is None:
        if explicit_sharding(digit) is not None or not jax.sharding.get_abstract_mesh().empty:
            return False
        if jax.device_count() != 1:
            return False
    from jmerge._kernels import histogram_target

    return histogram_target() is not None


# None: the rule in _use_cpu_kernel; True / False: force the kernel on or off where the caller
# does not say (tests compare both paths; read when a merge is traced, not when it runs).
_KERNEL_DEFAULT: bool | None = None


def _kernel_histogram(digit: jax.Array, bins: int, batch_ndim: int) -> jax.Array:
    """:func:`_histogram` by the CPU kernel on CPU and by XLA's scatter-add elsewhere."""
    from jmerge._kernels import histogram_target

    batch, rows = digit.shape[:batch_ndim], math.prod(digit.shape[:batch_ndim])
    flat = digit.reshape(rows, -1)

    def cpu(d):
        call = jax.ffi.ffi_call(
            histogram_target(),
            jax.ShapeDtypeStruct((rows, bins), jnp.int32),
            vmap_method="broadcast_all",
        )
        return call(d, bins=np.int64(bins))

    def other(d):
        return _scatter_histogram(d, bins, 1)

    return jax.lax.platform_dependent(flat, cpu=cpu, default=other).reshape(*batch, bins)


def _histogram(
    digit: jax.Array, bins: int, batch_ndim: int, *, kernel: bool | None = None
) -> jax.Array:
    """Counts of each digit value 0..bins-1 (``bins`` drops the entry) over the trailing axes.

    ``digit`` has shape ``(*batch, *rest)``; returns int32 ``(*batch, bins)``. On CPU the
    counts come from jmerge's FFI kernel where :func:`_use_cpu_kernel` allows (about 8x
    faster than XLA:CPU's scatter-add), else from a scatter-add; both are exact.
    """
    if digit.size and _use_cpu_kernel(digit, kernel):
        return _kernel_histogram(digit, bins, batch_ndim)
    return _scatter_histogram(digit, bins, batch_ndim)


def _scatter_histogram(digit: jax.Array, bins: int, batch_ndim: int) -> jax.Array:
    """:func:`_histogram` as an XLA scatter-add (every platform, any sharding)."""

    dnums = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(), inserted_window_dims=(0,), scatter_dims_to_operand_dims=(0,)
    )

    # Under an Explicit mesh the counts are replicated (each device's local histogram plus
    # an all-reduce); under Auto sharding XLA's partitioner does the same on its own.
    explicit = explicit_sharding(digit) is not None

    def one(d):
        # Indices keep d's own shape (no reshape to a vector): flattening an array sharded on
        # a minor axis would make XLA's partitioner all-gather it before the scatter.
        if explicit:
            return jnp.zeros((bins,), jnp.int32).at[d].add(
                1, mode="drop", out_sharding=PartitionSpec(None)
            )
        return jax.lax.scatter_add(
            jnp.zeros((bins,), jnp.int32),
            d[..., None],
            jnp.ones(d.shape, jnp.int32),
            dnums,
            mode=jax.lax.GatherScatterMode.FILL_OR_DROP,
        )

    for _ in range(batch_ndim):
        one = jax.vmap(one)
    return one(digit)


def pick_digit(hist: jax.Array, k_rem: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One radix-select step: from the counts ``hist`` (..., bins) of the next digit among
    the entries that share the digits decided so far, the digit d of the ``k_rem``-th largest
    (...,) of them and its rank among the entries with digit d. Shared by
    :func:`kth_largest_over` and the streaming file merge (which sums ``hist`` over chunks)."""
    # at_least[j] = number of entries (with this prefix) whose digit is >= j.
    at_least = jnp.flip(jnp.cumsum(jnp.flip(hist, -1), axis=-1), -1)
    d = jnp.sum(at_least >= k_rem[..., None], axis=-1) - 1  # largest j with at_least >= k
    at_d = jnp.take_along_axis(at_least, d[..., None], -1)[..., 0]
    in_d = jnp.take_along_axis(hist, d[..., None], -1)[..., 0]
    return d, k_rem - (at_d - in_d)


def kth_largest_over(leaves: Sequence[jax.Array], k: int, *, batch_ndim: int) -> jax.Array:
    """The k-th largest entry over all trailing-axis entries of several arrays together.

    Each leaf has shape ``(*batch, *rest_i)`` with the same ``batch`` (the first
    ``batch_ndim`` axes) and dtype; for every batch index the result is the k-th largest of the
    ``N = Σ_i prod(rest_i)`` entries of all leaves at that index, i.e. equal to
    ``lax.top_k(concatenate([leaf.reshape(*batch, -1) for leaf in leaves], -1), k)[0][..., k-1]``
    but computed from per-leaf histograms (radix select, see the module docstring), without
    concatenating, sorting or gathering the leaves.

    Args:
      leaves: non-empty sequence of arrays of one float or integer dtype.
      k: static int, ``1 <= k <= N``.
      batch_ndim: number of leading axes kept (rows).

    Returns:
      An array of shape ``batch`` and the leaves' dtype.

    Raises:
      ValueError: no leaves, different batch shapes or dtypes, k out of range, or N >= 2^31
        without ``jax_enable_x64`` (counts would overflow int32).
      TypeError: a dtype that is neither float nor integer.
    """
    leaves = list(leaves)
    if not leaves:
        raise ValueError("kth_largest_over needs at least one array.")
    batch = leaves[0].shape[:batch_ndim]
    dtype = leaves[0].dtype
    for i, x in enumerate(leaves):
        if x.shape[:batch_ndim] != batch or x.dtype != dtype:
            raise ValueError(
                f"leaf {i}: expected leading shape {batch} and dtype {dtype}; "
                f"got shape {x.shape} and dtype {x.dtype}."
            )
    n = sum(math.prod(x.shape[batch_ndim:]) for x in leaves)
    if not isinstance(k, int | np.integer) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, {n}] (the number of entries); got {k!r}.")
    count_dtype = jnp.int32
    if n >= 2**31:
        if not jax.config.jax_enable_x64:
            raise ValueError(
                f"selecting among {n} >= 2^31 entries needs 64-bit counts: enable "
                "jax_enable_x64, or select per tensor."
            )
        count_dtype = jnp.int64
    keys = [_to_key(x) for x in leaves]
    kd = keys[0].dtype
    key_bits = kd.itemsize * 8
    prefix = jnp.zeros(batch, kd)  # the digits decided so far, as an integer
    k_rem = jnp.full(batch, k, count_dtype)  # rank of the target among entries with that prefix
    decided = 0
    for width in _digits(key_bits, n):
        shift = key_bits - decided - width
        bins = 1 << width
        mask = np.array(bins - 1, kd)
        hist = jnp.zeros((*batch, bins), count_dtype)
        for key in keys:
            expand = (...,) + (None,) * (key.ndim - batch_ndim)
            digit = ((key >> np.array(shift, kd)) & mask).astype(jnp.int32)
            if decided:
                same = (key >> np.array(shift + width, kd)) == prefix[expand]
                digit = jnp.where(same, digit, bins)
            hist = hist + _histogram(digit, bins, batch_ndim).astype(count_dtype)
        d, k_rem = pick_digit(hist, k_rem)
        prefix = (prefix << np.array(width, kd)) | d.astype(kd)
        decided += width
    return _from_key(prefix, dtype)


def kth_largest(x: jax.Array, k: int) -> jax.Array:
    """The k-th largest entry along the last axis of ``x``, without sorting.

    Equal to ``lax.top_k(x, k)[0][..., k - 1]`` (the k-th value in descending sorted order,
    repeated values counted with multiplicity), computed by radix select on the values' order
    keys (module docstring): 2 histogram passes for 32-bit dtypes, 1 for 16-bit, 4 for 64-bit.
    Works on arrays sharded along any axis (the counts are all-reduced, the input is not
    gathered).

    Args:
      x: float or integer array of shape ``(..., n)``.
      k: static int, ``1 <= k <= n``.

    Returns:
      Shape ``x.shape[:-1]``, dtype of ``x``.

    Raises:
      ValueError: k out of range (or n >= 2^31 without x64). TypeError: x neither float nor int.
    """
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError("kth_largest needs at least one axis; got a scalar.")
    return kth_largest_over([x], k, batch_ndim=x.ndim - 1)


_ABS_DIFF_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16))


def _pairs(flat: Sequence[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
    """(a_0, b_0, a_1, b_1, ...) -> [(a_0, b_0), (a_1, b_1), ...]."""
    return list(zip(flat[::2], flat[1::2], strict=True))


_RADIX_ONLY = False  # tests: the kernel's fallback (two histogram passes) for every row


def kth_largest_abs_diff(
    a: jax.Array, b: jax.Array, k: int, *, kernel: bool | None = None
) -> jax.Array:
    """The k-th largest of |a_t − b| over the entries of each model t, without sorting.

    ``a`` has shape ``(T, *s)`` and ``b`` shape ``s``; both are widened to their compute
    dtype first (bf16/fp16 → float32, as :func:`jmerge.merges.basic.task_vectors`). Equal to
    ``kth_largest_over([abs(a − b[None])], k, batch_ndim=1)``, i.e. to ``lax.top_k``'s k-th
    value bit for bit, XLA's flushing of denormals included. This is TIES's per-tensor
    threshold κ_t of the task vectors τ_t = θ_t − θ0 (Yadav et al. 2023, §3.1). One pair of
    :func:`kth_largest_abs_diff_over`, which says how it is computed.

    Args:
      a: ``(T, *s)`` float array (the models θ_t).
      b: ``s`` float array (θ0).
      k: static int, ``1 <= k <= prod(s)``.
      kernel: force the CPU kernel on (True) or off (False); None: :func:`_use_cpu_kernel`.

    Returns:
      ``(T,)`` in the compute dtype.

    Raises:
      ValueError: shapes that do not match or k out of range.
    """
    return kth_largest_abs_diff_over([(a, b)], k, kernel=kernel)


def kth_largest_abs_diff_over(
    pairs: Sequence[tuple[jax.Array, jax.Array]], k: int, *, kernel: bool | None = None
) -> jax.Array:
    """The k-th largest of |a_t − b| over the entries of all pairs (a, b) together, per t.

    Each pair is ``a`` of shape ``(T, *s_i)`` (the same T for all) and ``b`` of shape ``s_i``,
    widened to the compute dtype. Equal to ``kth_largest_over([abs(a − b[None]) for a, b in
    pairs], k, batch_ndim=1)``: TIES's global threshold over a model's leaves (the paper's
    code) when the pairs are (θ_t leaf, θ0 leaf).

    On CPU, when every array is float32 or every one bfloat16, the CPU kernel
    ``jmerge_kth_abs_diff`` (``jmerge._kernels``) computes it in one pass over the models
    (a 16384-entry sample brackets the value, the entries inside the bracket are selected
    exactly, radix select where the bracket misses) instead of materialising the magnitudes
    and making two histogram passes; :func:`_use_cpu_kernel` says where (``kernel`` forces
    it on or off). Elsewhere :func:`kth_largest_over` on the magnitudes.

    Args:
      pairs: non-empty sequence of (a, b).
      k: static int, ``1 <= k <= Σ_i prod(s_i)``.
      kernel: as in :func:`kth_largest_abs_diff`.

    Returns:
      ``(T,)`` in the compute dtype.

    Raises:
      ValueError: no pairs, shapes that do not match or k out of range.
    """
    pairs = [(jnp.asarray(a), jnp.asarray(b)) for a, b in pairs]
    if not pairs:
        raise ValueError("kth_largest_abs_diff_over needs at least one (a, b) pair.")
    rows = pairs[0][0].shape[:1]
    for i, (a, b) in enumerate(pairs):
        if a.ndim < 1 or a.shape[1:] != b.shape or a.shape[:1] != rows:
            raise ValueError(
                f"pair {i}: expected a of shape (T, *s) with T = {rows[0] if rows else '?'} "
                f"and b of shape s; got {a.shape}, {b.shape}."
            )
    n = sum(math.prod(b.shape) for _, b in pairs)
    if not isinstance(k, int | np.integer) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, {n}] (the number of entries); got {k!r}.")
    from jmerge.tree import compute_dtype

    wd = compute_dtype(jnp.result_type(*(x for pair in pairs for x in pair)))
    live = [(a, b) for a, b in pairs if b.size]

    def generic(*flat):
        # No reshape: flattening an array sharded on a minor axis would gather it.
        mags = [jnp.abs(a.astype(wd) - b.astype(wd)[None]) for a, b in _pairs(flat)]
        return kth_largest_over(mags, k, batch_ndim=1)

    flat = [x for pair in live for x in pair]
    dtypes = {np.dtype(x.dtype) for x in flat}
    use = (
        len(dtypes) == 1
        and dtypes <= set(_ABS_DIFF_DTYPES)
        and rows[0] > 0
        and _use_cpu_kernel(flat[0], kernel)
    )
    if not use:
        return generic(*flat)
    from jmerge._kernels import kth_abs_diff_target

    def cpu(*flat):
        call = jax.ffi.ffi_call(
            kth_abs_diff_target(),
            jax.ShapeDtypeStruct((rows[0],), jnp.float32),
            vmap_method="sequential",
        )
        operands = []
        for a, b in _pairs(flat):
            operands += [a.reshape(rows[0], b.size), b.reshape(b.size)]
        return call(*operands, k=np.int64(k), radix_only=np.int64(_RADIX_ONLY))

    return jax.lax.platform_dependent(*flat, cpu=cpu, default=generic)
