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
