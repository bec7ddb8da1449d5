"""The CPU histogram kernel (jmerge/_kernels/histogram.cc, an XLA FFI call) against NumPy.

Reference: ``np.bincount`` of each row's in-range digits. Also: the build works wherever a C++
compiler is on PATH, a missing compiler falls back to XLA's scatter-add with one warning (in a
fresh process, since the build is cached per process), and the automatic rule keeps the
kernel out of programs whose inputs may be sharded.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jmerge._kernels import histogram_target
from jmerge.merges import _select
from jmerge.merges.sparse import ties

needs_kernel = pytest.mark.skipif(
    histogram_target() is None, reason="the CPU kernel could not be built here"
)


def _reference(digit, bins, batch_ndim):
    rows = digit.reshape(int(np.prod(digit.shape[:batch_ndim])), -1)
    out = [np.bincount(r[(r >= 0) & (r < bins)], minlength=bins) for r in rows]
    return np.asarray(out, np.int32).reshape(*digit.shape[:batch_ndim], bins)


def test_kernel_builds_where_a_compiler_exists():
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx}) here")
    assert histogram_target() == "jmerge_histogram"


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(
    batch=st.sampled_from([(), (1,), (3,), (2, 2), (9,)]),
    rest=st.sampled_from([(1,), (7,), (300,), (4, 33)]),
    bins=st.sampled_from([1, 2, 16, 256, 65536]),
    seed=st.integers(0, 2**16),
)
def test_histogram_equals_bincount(batch, rest, bins, seed):
    rng = np.random.default_rng(seed)
    # In-range digits, the drop marker (bins), and out-of-range values on both sides.
    digit = rng.integers(-3, bins + 3, size=(*batch, *rest)).astype(np.int32)
    got = _select._histogram(jnp.asarray(digit), bins, len(batch), kernel=True)
    np.testing.assert_array_equal(got, _reference(digit, bins, len(batch)))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_histogram_of_long_rows_split_across_threads(rows):
    """Rows long enough to be split into blocks counted on the thread pool (>= 2^21 entries),
    skewed so that most entries hit a few bins."""
    rng = np.random.default_rng(rows)
    n = (1 << 21) + 12345
    digit = np.minimum(rng.geometric(0.3, size=(rows, n)), 65536).astype(np.int32)
    digit[:, ::7] = 65536  # dropped
    got = jax.jit(lambda d: _select._histogram(d, 65536, 1, kernel=True))(jnp.asarray(digit))
    np.testing.assert_array_equal(got, _reference(digit, 65536, 1))


@needs_kernel
def test_histogram_under_vmap_and_in_selection_equals_scatter():
    rng = np.random.default_rng(0)
    digit = jnp.asarray(rng.integers(0, 40, size=(4, 3, 500)), jnp.int32)
    got = jax.vmap(lambda d: _select._histogram(d, 32, 1, kernel=True))(digit)
    want = _select._histogram(digit, 32, 2, kernel=False)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, _reference(np.asarray(digit), 32, 2))


@needs_kernel
def test_automatic_rule_keeps_kernel_out_of_multi_device_programs():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4096)), jnp.float32)

    def hlo(kernel):
        old = _select._KERNEL_DEFAULT
        _select._KERNEL_DEFAULT = kernel
        try:
            return jax.jit(lambda x: _select.kth_largest(x, 100)).lower(x).as_text()
        finally:
            _select._KERNEL_DEFAULT = old

    assert "jmerge_histogram" in hlo(True)
    assert "jmerge_histogram" not in hlo(False)
    # This test process has 8 host devices (conftest), so an input may be sharded: the default
    # rule uses XLA's scatter-add, which the partitioner splits without gathering the input.
    if jax.device_count() > 1:
        assert "jmerge_histogram" not in hlo(None)


def _abs_diff_reference(a, b, k):
    """lax.top_k's k-th of |a_t − b| computed by XLA (its denormal flushing included)."""
    f = jax.jit(lambda a, b: jax.lax.top_k(
        jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)[None]).reshape(a.shape[0], -1),
        k)[0][:, k - 1])
    return np.asarray(f(a, b))


def _kernel_kth(a, b, k, radix_only=False):
    old = _select._RADIX_ONLY
    _select._RADIX_ONLY = radix_only
    try:
        f = jax.jit(lambda a, b: _select.kth_largest_abs_diff(a, b, k, kernel=True))
        return np.asarray(f(a, b))
    finally:
        _select._RADIX_ONLY = old


def _bits_equal(x, y):
    np.testing.assert_array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(
    t=st.integers(1, 4),
    s=st.sampled_from([(1,), (9,), (300,), (7, 40), (20000,)]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    k_frac=st.floats(0.0, 1.0),
    data=st.sampled_from(["normal", "repeats", "zeros", "denormals"]),
    radix_only=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kth_abs_diff_equals_top_k(t, s, dtype, k_frac, data, radix_only, seed):
    """The one-pass kernel (and its radix fallback alone) equals XLA's top_k of |a_t − b| bit
    for bit: repeated values, a_t = b entries, and denormal inputs and differences (which
    XLA:CPU flushes to zero) included."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(s))
    b = rng.standard_normal(s).astype(np.float32)
    d = rng.standard_normal((t, *s)).astype(np.float32)
    if data == "repeats":
        d = np.round(d * 2) / 2
    elif data == "zeros":
        d = d * (rng.random((t, *s)) < 0.3)
    elif data == "denormals":
        tiny = np.finfo(np.float32).smallest_normal
        b = rng.choice([0.0, 0.3 * tiny, tiny, 1.5 * tiny], size=s).astype(np.float32)
        d = rng.choice([0.0, -0.2 * tiny, 0.7 * tiny, 2 * tiny, 1e-30], size=(t, *s))
    a = jnp.asarray(b[None] + d, dtype)
    b = jnp.asarray(b, dtype)
    k = 1 + int(k_frac * (n - 1))
    _bits_equal(_kernel_kth(a, b, k, radix_only), _abs_diff_reference(a, b, k))


@needs_kernel
@settings(max_examples=15, deadline=None)
@given(
    shapes=st.lists(st.sampled_from([(1,), (5,), (64, 3), (3000,), (17, 2, 3)]), min_size=1,
                    max_size=4),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    k_frac=st.floats(0.0, 1.0),
    radix_only=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kth_abs_diff_over_leaves_equals_top_k_of_concatenation(shapes, dtype, k_frac,
                                                                 radix_only, seed):
    """Several leaves at once (TIES's global threshold): the k-th largest over the
    concatenated |a_t − b| of all leaves, bit for bit."""
    rng = np.random.default_rng(seed)
    pairs = []
    for s in shapes:
        b = rng.standard_normal(s).astype(np.float32)
        d = np.round(rng.standard_normal((3, *s)) * 4) / 4 * rng.choice([0.0, 1e-2, 1.0], (3, *s))
        pairs.append((jnp.asarray(b[None] + d, dtype), jnp.asarray(b, dtype)))
    n = sum(b.size for _, b in pairs)
    k = 1 + int(k_frac * (n - 1))
    old = _select._RADIX_ONLY
    _select._RADIX_ONLY = radix_only
    try:
        f = jax.jit(lambda *x: _select.kth_largest_abs_diff_over(_select._pairs(x), k,
                                                                  kernel=True))
        got = f(*[x for pair in pairs for x in pair])
    finally:
        _select._RADIX_ONLY = old
    mags = jnp.concatenate([jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)[None])
                            .reshape(3, -1) for a, b in pairs], axis=1)
    want = jax.jit(lambda m: jax.lax.top_k(m, k)[0][:, k - 1])(mags)
    _bits_equal(got, want)


@needs_kernel
@pytest.mark.parametrize("t", [1, 2, 5])
def test_kth_abs_diff_long_rows_in_parallel_blocks(t):
    """Rows of 2^21+ entries (split into blocks on the thread pool when T is small) with a
    heavy-tailed task vector, at TIES's usual density and at the extremes."""
    rng = np.random.default_rng(t)
    n = (1 << 21) + 777
    b = rng.standard_normal(n).astype(np.float32)
    a = jnp.asarray(b[None] + rng.standard_t(2, size=(t, n)).astype(np.float32) * 1e-2)
    b = jnp.asarray(b)
    for k in (1, n // 5, n - 3, n):
        _bits_equal(_kernel_kth(a, b, k), _abs_diff_reference(a, b, k))


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_ties_with_the_kernel_equals_ties_without(dtype, scope):
    rng = np.random.default_rng(5)
    pre = {"w": jnp.asarray(rng.standard_normal((64, 300)), dtype),
           "b": jnp.asarray(rng.standard_normal((300,)), dtype)}
    models = [jax.tree.map(lambda x: (x.astype(jnp.float32) + 0.1 * jnp.asarray(
        rng.standard_normal(x.shape), jnp.float32)).astype(x.dtype), pre) for _ in range(3)]
    outs = []
    for kernel in (False, True):
        old = _select._KERNEL_DEFAULT
        _select._KERNEL_DEFAULT = kernel
        try:
            # The choice is made when the merge is traced: drop the cached traces first.
            jax.clear_caches()
            f = jax.jit(lambda p, m: ties(p, m, density=0.3, scope=scope))
            text = f.lower(pre, models).as_text()
            assert ("jmerge_kth_abs_diff" in text) == kernel
            outs.append(f(pre, models))
        finally:
            _select._KERNEL_DEFAULT = old
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(
        np.asarray(x, np.float32), np.asarray(y, np.float32)), *outs)


def _run(code, **env):
    env = {**os.environ, **env}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_missing_compiler_falls_back_with_one_warning(tmp_path):
    code = """
        import warnings
        import jax, jax.numpy as jnp, numpy as np
        from jmerge._kernels import histogram_target
        from jmerge.merges._select import kth_largest
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert histogram_target() is None
            assert histogram_target() is None  # cached: one warning
        msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
        assert len(msgs) == 1 and "no C++ compiler" in msgs[0], msgs
        x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 999)), jnp.float32)
        got = kth_largest(x, 17)
        np.testing.assert_array_equal(got, jax.lax.top_k(x, 17)[0][:, 16])
    """
    _run(code, CXX=str(tmp_path / "no-such-compiler"), JMERGE_KERNEL_CACHE=str(tmp_path / "k"))
    assert not list((tmp_path / "k").glob("*.so"))


def test_kernels_off_by_environment(tmp_path):
    code = """
        import warnings
        warnings.simplefilter("error")
        from jmerge._kernels import histogram_target
        assert histogram_target() is None
    """
    _run(code, JMERGE_CPU_KERNELS="0", JMERGE_KERNEL_CACHE=str(tmp_path))
    assert not list(tmp_path.iterdir())
