"""Exact order statistics of magnitudes, shared by the trimming merges (TIES, breadcrumbs, DELLA).

``kth_largest(x, k)`` is the k-th largest entry along the last axis of ``x``: equal to
``lax.top_k(x, k)[0][..., k - 1]``. (Placeholder body; to be replaced by a sort-free selection
that uses only reductions, so that it runs at memory speed and on sharded arrays without a gather.)
"""

from __future__ import annotations

import jax


def kth_largest(x: jax.Array, k: int) -> jax.Array:
    """The k-th largest entry along the last axis of ``x`` (k static, 1 <= k <= x.shape[-1])."""
    return jax.lax.top_k(x, k)[0][..., k - 1]
