"""rankdata and spearmanr against scipy.stats, plus the private sorting machinery against numpy / brute force."""

import warnings

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats as ss
from hypothesis import given
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from corrjax.stats import _sorting, rankdata, spearmanr

METHODS = ("average", "min", "max", "dense", "ordinal")
_rank = jax.jit(rankdata, static_argnames=("method", "axis"))
_spear = jax.jit(spearmanr)
_argsort = jax.jit(_sorting.stable_argsort, static_argnames="key_bits")
_search = jax.jit(_sorting.searchsorted_left)
_inversions = jax.jit(lambda v, below: jnp.sum(_sorting.count_inversions(v, below)))
_inversions_perm = jax.jit(lambda v: jnp.sum(_sorting.count_inversions(v)))


@jax.jit(static_argnames="axis")
def _all_methods(x, axis):
    return tuple(rankdata(x, method=m, axis=axis) for m in METHODS)


def _data(draw, n, d, ties):
    """float32 data with exact ties (few distinct values) or continuous values, sometimes with -0.0/+0.0."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if ties:
        x = rng.integers(-2, 3, (n, d)).astype(np.float32)
        x[rng.random((n, d)) < 0.2] = -0.0
    else:
        x = rng.standard_normal((n, d)).astype(np.float32)
    return x


@st.composite
def tied_or_not(draw, ns=(1, 2, 3, 8, 31), ds=(1, 3)):
    n, d = draw(st.sampled_from(ns)), draw(st.sampled_from(ds))
    return _data(draw, n, d, draw(st.booleans()))


# ----------------------------------------------------------------------------------------------- private machinery


def test_order_key_orders_special_values():
    vals = np.array([-np.inf, -3.5, -1e-40, -0.0, 0.0, 1e-45, 2.0, 3e38, np.inf, np.nan], np.float32)
    keys = np.asarray(_sorting.order_key(jnp.asarray(vals)))
    assert keys.dtype == np.uint32
    assert keys[3] == keys[4]  # -0.0 ties with +0.0
    assert np.all(np.diff(keys.astype(np.int64))[[0, 1, 2, 4, 5, 6, 7, 8]] > 0)
    ints = np.array([-(2**31), -1, 0, 1, 2**31 - 1], np.int32)
    assert np.all(np.diff(np.asarray(_sorting.order_key(jnp.asarray(ints))).astype(np.int64)) > 0)


@given(st.integers(0, 2**31 - 1), st.sampled_from([1, 2, 5, 40, 300]), st.sampled_from([2, 7, 32]))
def test_stable_argsort_matches_numpy(seed, n, hi):
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, hi, (2, n)).astype(np.uint32)
    bits = max(1, (hi - 1).bit_length())
    got = np.asarray(_argsort(jnp.asarray(keys), key_bits=bits))
    np.testing.assert_array_equal(got, np.argsort(keys, axis=-1, kind="stable"))
    got32 = np.asarray(_argsort(jnp.asarray(keys)))
    np.testing.assert_array_equal(got32, np.argsort(keys, axis=-1, kind="stable"))


@given(st.integers(0, 2**31 - 1), st.sampled_from([1, 3, 17, 100]), st.booleans())
def test_count_inversions_brute_force(seed, n, ties):
    rng = np.random.default_rng(seed)
    v = rng.integers(0, 4, n) if ties else rng.permutation(n)
    mr = np.searchsorted(np.sort(v), v).astype(np.int32)  # min-ranks
    below = np.searchsorted(np.sort(mr), np.arange(n + 1)).astype(np.int32)
    brute = int(np.sum(mr[:, None] > mr[None, :], where=np.triu(np.ones((n, n), bool), 1)))
    assert int(_inversions(jnp.asarray(mr), jnp.asarray(below))) == brute
    if not ties:
        assert int(_inversions_perm(jnp.asarray(mr))) == brute


@pytest.mark.parametrize("n", [100, 4096, 5001])
def test_searchsorted_left_matches_numpy(n):
    # n >= 4096 takes the two-level (splitters, then one 64-entry block) path.
    rng = np.random.default_rng(n)
    for hi in (7, 2**32 - 1):
        s = np.sort(rng.integers(0, hi, (2, n), dtype=np.uint64).astype(np.uint32), axis=-1)
        q = np.concatenate([s[:, ::-3], rng.integers(0, hi, (2, 40), dtype=np.uint64).astype(np.uint32)], axis=1)
        q[:, :2] = [0, 2**32 - 1]
        got = np.asarray(_search(jnp.asarray(s), jnp.asarray(q)))
        np.testing.assert_array_equal(got, np.stack([np.searchsorted(s[i], q[i]) for i in range(2)]))


@pytest.mark.parametrize("method", ["average", "min", "max", "dense", "ordinal"])
def test_rankdata_long_slices_are_ranked_one_at_a_time(method):
    """From 4096 observations on, slices are ranked in a lax.map: same result as scipy for every method, for 2-D
    and 3-D input, under vmap, and with a NaN slice."""
    rng = np.random.default_rng(11)
    x = np.round(rng.standard_normal((2, 4100, 3)) * 20).astype(np.float32)  # heavy ties
    x[1, 7, 2] = np.nan
    got = jax.jit(lambda a: rankdata(a, method=method, axis=1))(x)
    np.testing.assert_array_equal(got, ss.rankdata(x, method=method, axis=1))
    vm = jax.jit(jax.vmap(lambda a: rankdata(a, method=method)))(x)
    np.testing.assert_array_equal(vm, got)


def test_wide_sum_does_not_wrap():
    v = jnp.full((5000,), 2**20, jnp.int32)  # total 5.2e9 > 2**31
    assert float(_sorting.wide_sum(v, 2**20 + 1, jnp.float32)) == pytest.approx(5000 * 2**20, rel=1e-7)


# -------------------------------------------------------------------------------------------------------- rankdata


@given(tied_or_not(ns=(1, 31), ds=(3,)), st.sampled_from([0, -1, None]))
def test_rankdata_matches_scipy(x, axis):
    for method, got in zip(METHODS, _all_methods(jnp.asarray(x), axis), strict=True):
        want = ss.rankdata(x, method=method, axis=axis)
        assert got.dtype == jnp.float32 and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("method", METHODS)
def test_rankdata_nan_propagates_per_slice(method):
    x = np.array([[1.0, np.nan], [2.0, 3.0], [2.0, 0.0]], np.float32)
    got = np.asarray(_rank(x, method=method))
    np.testing.assert_array_equal(got, ss.rankdata(x, method=method, axis=0))
    assert np.isnan(got[:, 1]).all() and not np.isnan(got[:, 0]).any()


def test_rankdata_integers_are_exact():
    # 2**24 and 2**24 + 1 collapse in float32; integer input must keep them apart.
    x = np.array([2**24 + 1, 2**24, -5, 2**24 + 1, 7], np.int32)
    np.testing.assert_array_equal(np.asarray(_rank(x)), ss.rankdata(x))
    b = x > 10
    np.testing.assert_array_equal(np.asarray(_rank(b, method="dense")), ss.rankdata(b, method="dense"))


def test_rankdata_large_offset_float32_and_float64(x64):
    rng = np.random.default_rng(0)
    x = (1e4 + rng.integers(0, 50, 200) * np.float32(1e-3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(_rank(x)), ss.rankdata(x))
    x64_ = rng.standard_normal(300)
    got = _rank(jnp.asarray(x64_), method="average")
    assert got.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(got), ss.rankdata(x64_))


@pytest.mark.slow
def test_rankdata_larger_n_matches_scipy():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3000, (20000, 2)).astype(np.float32)
    for method in METHODS:
        np.testing.assert_array_equal(
            np.asarray(_rank(jnp.asarray(x), method=method, axis=0)), ss.rankdata(x, method=method, axis=0)
        )


def test_rankdata_vmap_grad_and_empty():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 9)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(rankdata))(x)), ss.rankdata(np.asarray(x), axis=1))
    g = jax.jit(jax.grad(lambda v: jnp.sum(rankdata(v) * v)))(x[0])
    np.testing.assert_allclose(np.asarray(g), np.asarray(_rank(x[0])))  # ranks are locally constant
    assert _rank(jnp.zeros((0, 3))).shape == (0, 3)


def test_rankdata_bad_input():
    with pytest.raises(ValueError, match="method"):
        rankdata([1.0, 2.0], method="mean")
    with pytest.raises(ValueError, match="axis"):
        _rank(np.ones((3, 2)), axis=2)
    with pytest.raises(ValueError, match="shape"):
        _rank(jnp.float32(1.0))
    with pytest.raises(TypeError, match="real"):
        _rank(jnp.ones(3, jnp.complex64))


# ------------------------------------------------------------------------------------------------------- spearmanr


def _scipy_pair(a, b):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ss.spearmanr(a, b)


@given(tied_or_not(ns=(2, 3, 31), ds=(3,)))
def test_spearmanr_matrix_matches_scipy_pairs(x):
    rho, p = (np.asarray(v) for v in _spear(jnp.asarray(x)))
    d = x.shape[1]
    assert rho.shape == p.shape == (d, d)
    for i in range(d):
        for j in range(d):
            if i == j:
                const = np.all(x[:, i] == x[0, i])
                assert np.isnan(rho[i, i]) if const else rho[i, i] == 1.0
                continue
            ref = _scipy_pair(x[:, i].astype(np.float64), x[:, j].astype(np.float64))
            np.testing.assert_allclose(rho[i, j], ref.statistic, atol=2e-6, equal_nan=True)
            # JAX's float32 betainc is accurate to ~2e-5; the float64 test below checks the formula tightly.
            np.testing.assert_allclose(p[i, j], ref.pvalue, atol=1e-4, equal_nan=True)


def test_spearmanr_float64_tight(x64):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 6, (40, 3)).astype(np.float64)
    x[:, 2] = rng.standard_normal(40)
    y = rng.standard_normal((40, 2))
    rho, p = _spear(jnp.asarray(x))
    ref = ss.spearmanr(x)
    np.testing.assert_allclose(np.asarray(rho), ref.statistic, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(p), ref.pvalue, rtol=1e-9, atol=1e-14)
    rho_xy, p_xy = _spear(jnp.asarray(x), jnp.asarray(y))
    full = ss.spearmanr(x, y)
    np.testing.assert_allclose(np.asarray(rho_xy), full.statistic[:3, 3:], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(p_xy), full.pvalue[:3, 3:], rtol=1e-9, atol=1e-14)


def test_spearmanr_1d_cross_block_and_exact_extremes():
    rng = np.random.default_rng(4)
    a = rng.standard_normal(50).astype(np.float32)
    b = (a + rng.standard_normal(50)).astype(np.float32)
    rho, p = _spear(a, b)
    ref = _scipy_pair(a, b)
    assert rho.shape == () and p.shape == ()
    np.testing.assert_allclose([float(rho), float(p)], [ref.statistic, ref.pvalue], atol=1e-5)
    r_col, _ = _spear(np.stack([a, b], 1), b)
    assert r_col.shape == (2,)
    np.testing.assert_allclose(np.asarray(r_col), [ref.statistic, 1.0], atol=1e-6)
    # Monotone transforms and reversals are exactly +-1 with p = 0, even in float32.
    r, p = _spear(np.stack([a, np.exp(a), -a], 1))
    np.testing.assert_array_equal(np.asarray(r), [[1, 1, -1], [1, 1, -1], [-1, -1, 1]])
    np.testing.assert_array_equal(np.asarray(p)[0], [0, 0, 0])
    assert float(_spear(a)[0]) == 1.0


def test_spearmanr_undefined_cases():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, 3)).astype(np.float32)
    x[:, 1] = 4.0  # constant column
    x[3, 2] = np.nan  # NaN column
    rho, p = _spear(x)
    rho, p = np.asarray(rho), np.asarray(p)
    assert rho[0, 0] == 1.0 and np.isnan(rho[1]).all() and np.isnan(rho[:, 2]).all() and np.isnan(p[1]).all()
    rho1, p1 = _spear(x[:1])
    assert np.isnan(np.asarray(rho1)).all() and np.isnan(np.asarray(p1)).all()
    rho2, p2 = _spear(np.array([1.0, 2.0]), np.array([2.0, 1.0]))
    ref = _scipy_pair([1.0, 2.0], [2.0, 1.0])
    assert float(rho2) == pytest.approx(ref.statistic) and np.isnan(float(p2)) and np.isnan(ref.pvalue)


def test_spearmanr_large_offset_and_integers():
    rng = np.random.default_rng(6)
    base = rng.integers(0, 100, (500, 2))
    x32 = (1e4 + base * np.float32(0.01)).astype(np.float32)  # mean 1e4 times the spread
    ref = _scipy_pair(base[:, 0], base[:, 1])
    rho, p = _spear(x32[:, 0], x32[:, 1])
    np.testing.assert_allclose([float(rho), float(p)], [ref.statistic, ref.pvalue], atol=1e-5)
    rho_i, _ = _spear(base.astype(np.int32))
    np.testing.assert_allclose(np.asarray(rho_i)[0, 1], ref.statistic, atol=1e-6)


def test_spearmanr_vmap_grad_and_errors():
    rng = np.random.default_rng(7)
    xb = jnp.asarray(rng.standard_normal((3, 30, 2)), jnp.float32)
    rho = jax.jit(jax.vmap(lambda v: spearmanr(v)[0]))(xb)
    for k in range(3):
        ref = _scipy_pair(np.asarray(xb[k, :, 0]), np.asarray(xb[k, :, 1]))
        np.testing.assert_allclose(float(rho[k, 0, 1]), ref.statistic, atol=1e-6)
    g = jax.jit(jax.grad(lambda v: spearmanr(v)[0][0, 1]))(xb[0])
    assert np.all(np.asarray(g) == 0)
    with pytest.raises(ValueError, match=r"x.shape=\(30, 2\).*y.shape=\(29"):
        _spear(xb[0], xb[0, :29, 0])
    with pytest.raises(ValueError, match="1-D"):
        _spear(xb)


def test_spearmanr_axis_name_shard_map(mesh8):
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.integers(0, 7, (64, 3)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((64, 2)), jnp.float32)
    f = jax.jit(
        jax.shard_map(
            lambda a, b: spearmanr(a, b, axis_name="data"), mesh=mesh8, in_specs=(P("data"), P("data")), out_specs=P()
        )
    )
    sharding = NamedSharding(mesh8, P("data"))
    got = f(jax.device_put(x, sharding), jax.device_put(y, sharding))
    want = _spear(x, y)
    np.testing.assert_allclose(np.asarray(got.statistic), np.asarray(want.statistic), atol=1e-6)
    np.testing.assert_allclose(np.asarray(got.pvalue), np.asarray(want.pvalue), atol=1e-6)


def test_spearmanr_small_pvalues_keep_relative_accuracy():
    # The t-test p-value must not come from 1 - betainc(...) (0 or a few float32 ulps below ~1e-7): scipy gives
    # 1.9e-9 for rho = 0.06 at n = 10000 and 1.5e-8 for rho = 0.7 at n = 50.
    rng = np.random.default_rng(11)
    for n, rho in ((10000, 0.06), (1000, 0.15), (100, 0.5), (50, 0.7), (20, 0.3)):
        a = rng.standard_normal(n)
        b = rho * a + np.sqrt(1 - rho * rho) * rng.standard_normal(n)
        ref = ss.spearmanr(a, b)
        got_rho, got_p = _spear(a.astype(np.float32), b.astype(np.float32))
        np.testing.assert_allclose(float(got_rho), ref.statistic, rtol=1e-5)
        # 2e-4: XLA's float32 betainc with shape parameters ~n/2 (see moments._F32_BETAINC_MAX_N)
        np.testing.assert_allclose(float(got_p), ref.pvalue, rtol=2e-4, err_msg=f"n={n}")
    with jax.enable_x64(True):
        a = rng.standard_normal(100)
        b = 0.8 * a + 0.6 * rng.standard_normal(100)
        ref = ss.spearmanr(a, b)  # p ~ 1e-19: below float64's eps, so 1 - betainc(...) would give 0
        np.testing.assert_allclose(float(spearmanr(a, b).pvalue), ref.pvalue, rtol=1e-10)
