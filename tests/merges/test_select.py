"""Sort-free exact selection (jmerge/merges/_select.py) against lax.top_k and numpy.

The reference is ``lax.top_k(x, k)[0][..., k - 1]`` (and ``np.partition`` for finite data):
the value must be equal bit for bit (``assert_array_equal``; the sign of a zero included).
The value tests run twice: with XLA's scatter-add histograms and with the CPU FFI kernel
(``jmerge._kernels``), each forced on for the whole selection.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jmerge
from jmerge._kernels import histogram_target
from jmerge.merges import _select
from jmerge.merges._select import kth_largest, kth_largest_over
from tests.helpers import collectives

select = jax.jit(kth_largest, static_argnums=1)  # one compile per k: used where k is fixed


PATHS = ["scatter", "cpu_kernel"]


@contextlib.contextmanager
def _histograms(path):
    """Force one histogram path for the selections traced inside the block."""
    if path == "cpu_kernel" and histogram_target() is None:
        pytest.skip("the CPU kernel could not be built here (see test_cpu_kernel.py)")
    old = _select._KERNEL_DEFAULT
    _select._KERNEL_DEFAULT = path == "cpu_kernel"
    try:
        yield
    finally:
        _select._KERNEL_DEFAULT = old


def _top_k(x, k):
    return np.asarray(jax.lax.top_k(x, k)[0][..., k - 1])


def _check(x, ks):
    for k in ks:
        got = np.asarray(kth_largest(x, k))  # eager: its ops are reused across k
        want = _top_k(x, k)
        np.testing.assert_array_equal(got, want, err_msg=f"k={k}")
        np.testing.assert_array_equal(np.signbit(got), np.signbit(want), err_msg=f"k={k}")


def _ks(n):
    return sorted({1, n // 3 + 1, n})


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16])
def test_random_rows_equal_top_k_and_partition(dtype, path):
    with _histograms(path):
        _random_rows(dtype)


def _random_rows(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 2, 1001)) * rng.lognormal(0, 3, (3, 2, 1)), dtype)
    _check(x, _ks(1001))
    # numpy's partition: the k-th largest is element n-k of the ascending order.
    x64 = np.asarray(x, np.float64)
    for k in (1, 500, 1001):
        np.testing.assert_array_equal(
            np.asarray(kth_largest(x, k), np.float64), np.partition(x64, 1001 - k, axis=-1)[..., -k]
        )


@pytest.mark.parametrize("path", PATHS)
def test_ties_zeros_subnormals_extremes(path):
    with _histograms(path):
        _ties_zeros_subnormals_extremes()


def _ties_zeros_subnormals_extremes():
    tiny = np.finfo(np.float32).smallest_subnormal
    vals = np.array(
        [0.0, -0.0, tiny, 2 * tiny, -tiny, 1e-38, 1e38, -1e38, 3.4e38, np.inf, -np.inf, 1.0],
        np.float32,
    )
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.choice(vals, size=(4, 300)))  # many repeated values
    _check(x, _ks(300))
    _check(jnp.zeros((2, 50), jnp.float32), _ks(50))
    _check(jnp.full((2, 50), -0.0, jnp.float32), _ks(50))
    _check(jnp.asarray(rng.choice([tiny, 2 * tiny, 0.0], size=(2, 64)), jnp.float32), _ks(64))
    _check(jnp.asarray(np.abs(rng.standard_normal((3, 257))), jnp.float32), _ks(257))


@pytest.mark.parametrize("path", PATHS)
def test_nan_ordered_as_top_k(path):
    x = jnp.array([0.0, -0.0, jnp.nan, -jnp.nan, jnp.inf, -1.0, 2.0], jnp.float32)
    with _histograms(path):
        got = [kth_largest(x, k) for k in range(1, 8)]
    for k in range(1, 8):
        g, want = got[k - 1], _top_k(x, k)
        assert np.isnan(g) == np.isnan(want) and np.signbit(g) == np.signbit(want), k
        if not np.isnan(want):
            assert g == want


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint32, jnp.int16, jnp.int64])
def test_integers(dtype, path):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.integers(info.min, info.max, size=(2, 200), endpoint=True), dtype)
    with _histograms(path):
        _check(x, _ks(200))
        _check(jnp.asarray(rng.integers(-3, 3, size=(2, 200)).astype(dtype)), _ks(200))


@settings(max_examples=10, deadline=None)
@given(
    shape=st.sampled_from([(), (3,), (2, 1)]),  # few shapes: compiled ops are reused
    n=st.sampled_from([1, 2, 3, 17, 256, 257, 3000]),
    k_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    repeats=st.booleans(),
    path=st.sampled_from(PATHS),
)
def test_hypothesis_shapes_and_k(shape, n, k_frac, seed, repeats, path):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*shape, n)).astype(np.float32)
    if repeats:
        x = np.round(x * 2) / 2
    k = 1 + int(k_frac * (n - 1))
    with _histograms(path):
        got = kth_largest(jnp.asarray(x), k)
    np.testing.assert_array_equal(got, _top_k(jnp.asarray(x), k))


@pytest.mark.parametrize("path", PATHS)
def test_over_leaves_equals_concatenation(path):
    rng = np.random.default_rng(3)
    leaves = [
        jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(4, 7, 5), (4, 1), (4, 300)]
    ]
    cat = jnp.concatenate([x.reshape(4, -1) for x in leaves], axis=1)
    for k in (1, 17, 200, 336):
        with _histograms(path):
            got = kth_largest_over(leaves, k, batch_ndim=1)
        np.testing.assert_array_equal(got, _top_k(cat, k), err_msg=f"k={k}")


def test_bad_arguments():
    x = jnp.ones((2, 5))
    for k in (0, 6, 2.0):
        with pytest.raises(ValueError, match="k must be"):
            kth_largest(x, k)
    with pytest.raises(ValueError, match="scalar"):
        kth_largest(jnp.float32(1.0), 1)
    with pytest.raises(TypeError, match="float or integer"):
        kth_largest(jnp.ones((3,), bool), 1)
    with pytest.raises(ValueError, match="leading shape"):
        kth_largest_over([jnp.ones((2, 3)), jnp.ones((3, 3))], 1, batch_ndim=1)
    with pytest.raises(ValueError, match="at least one"):
        kth_largest_over([], 1, batch_ndim=0)


def test_abs_diff_bad_arguments_name_the_pair():
    from jmerge.merges._select import kth_largest_abs_diff, kth_largest_abs_diff_over

    a, b = jnp.ones((3, 4, 5)), jnp.ones((4, 5))
    with pytest.raises(ValueError, match=r"pair 0: expected a of shape \(T, \*s\).*\(4, 6\)"):
        kth_largest_abs_diff(a, jnp.ones((4, 6)), 1)
    with pytest.raises(ValueError, match=r"pair 1: .*T = 3.*\(2, 5\)"):
        kth_largest_abs_diff_over([(a, b), (jnp.ones((2, 5)), jnp.ones(5))], 1)
    for k in (0, 21, 2.0):
        with pytest.raises(ValueError, match=r"k must be an int in \[1, 20\]"):
            kth_largest_abs_diff(a, b, k)
    with pytest.raises(ValueError, match="at least one"):
        kth_largest_abs_diff_over([], 1)


def _gathers(text):
    """All-gathers / all-to-alls of a non-scalar array in compiled HLO text."""
    return [
        c
        for c in collectives(text)
        if c.op.startswith(("all-gather", "all-to-all")) and np.prod(c.shape) > 1
    ]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (host) devices")
def test_sharded_selection_and_global_ties_have_no_gather():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((4, 8 * 500)), jnp.float32)
    xs = jax.device_put(x, NamedSharding(mesh, P(None, "x")))
    text = select.lower(xs, 700).compile().as_text()
    assert not _gathers(text), _gathers(text)
    assert any(c.op.startswith("all-reduce") for c in collectives(text))  # the histograms' counts
    np.testing.assert_array_equal(select(xs, 700), _top_k(x, 700))

    shapes = {"a": (64, 24), "b": (16,), "c": (8, 40, 3)}
    pre = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    stacked = {
        k: (v + rng.standard_normal((3, *v.shape))).astype(np.float32) for k, v in pre.items()
    }
    spec = {"a": P("x"), "b": P("x"), "c": P("x")}
    put = lambda t, lead: jax.tree.map(
        lambda v, s: jax.device_put(v, NamedSharding(mesh, P(*lead, *s))), t, spec
    )
    pre_s, stacked_s = put(pre, ()), put(stacked, (None,))
    ties = jax.jit(lambda p, s: jmerge.ties(p, s, density=0.3, scope="global"))
    text = ties.lower(pre_s, stacked_s).compile().as_text()
    assert not _gathers(text), _gathers(text)
    got, want = ties(pre_s, stacked_s), ties(pre, stacked)
    for k in shapes:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
