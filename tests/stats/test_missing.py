"""nancov / nancorrcoef against pandas' pairwise-complete DataFrame.cov/corr."""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corrjax.stats as cs

_SUPPRESS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
X64 = settings(suppress_health_check=_SUPPRESS)

_nancov = jax.jit(cs.nancov, static_argnames=("ddof", "min_periods"))
_nancorr = jax.jit(cs.nancorrcoef, static_argnames=("min_periods",))


@st.composite
def nan_data(draw, shapes=((3, 2), (8, 3), (25, 4))):
    n, d = draw(st.sampled_from(shapes))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["normal", "ties", "offset"]))
    if kind == "ties":
        x = rng.integers(-2, 3, size=(n, d)).astype(np.float64)
    else:
        x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
        if kind == "offset":
            x = x + 1e4
    frac = draw(st.sampled_from([0.0, 0.1, 0.3, 0.6]))
    x[rng.random((n, d)) < frac] = np.nan
    if draw(st.booleans()):
        x[:, draw(st.integers(0, d - 1))] = np.nan  # an all-missing column
    return x


@X64
@given(x=nan_data(), min_periods=st.sampled_from([1, 2, 5]))
def test_nancorrcoef_matches_pandas(x64, x, min_periods):
    got = np.asarray(_nancorr(x, min_periods=min_periods))
    ref = pd.DataFrame(x).corr(min_periods=min_periods).to_numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)
    diag = np.diagonal(got)
    assert np.all((diag == 1.0) | np.isnan(diag))
    np.testing.assert_array_equal(got, got.T)


def _pairwise_cov_reference(x, ddof, min_periods):
    """Brute force: each pair (i, j) uses the rows where both are finite; NaN below min_periods or n - ddof <= 0."""
    d = x.shape[1]
    out = np.full((d, d), np.nan)
    for i in range(d):
        for j in range(d):
            rows = np.isfinite(x[:, i]) & np.isfinite(x[:, j])
            n = int(rows.sum())
            if n >= min_periods and n - ddof > 0:
                a, b = x[rows, i], x[rows, j]
                out[i, j] = np.sum((a - a.mean()) * (b - b.mean())) / (n - ddof)
    return out


@X64
@given(x=nan_data(), min_periods=st.sampled_from([1, 4]), ddof=st.sampled_from([0, 1, 2]))
def test_nancov_matches_pairwise_reference_with_any_ddof(x64, x, min_periods, ddof):
    got = np.asarray(_nancov(x, ddof=ddof, min_periods=min_periods))
    ref = _pairwise_cov_reference(x, ddof, min_periods)
    if ddof == 1:  # pandas' own semantics
        np.testing.assert_allclose(ref, pd.DataFrame(x).cov(min_periods=min_periods).to_numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9 * (1 + np.nanmax(np.abs(ref), initial=0)))


def test_nancov_single_complete_pair_with_ddof0_is_zero(x64):
    # One common row: with ddof=0 the pair's covariance is 0 (numpy's np.cov of one point), not NaN.
    x = np.array([[np.nan, 1.0], [0.0, -1.0], [-1.0, np.nan]])
    got = np.asarray(_nancov(x, ddof=0))
    np.testing.assert_allclose(got, [[0.25, 0.0], [0.0, 1.0]], rtol=1e-12)
    assert np.isnan(np.asarray(_nancov(x, ddof=1))[0, 1])


@X64
@given(x=nan_data(shapes=((8, 3), (25, 4))))
def test_cross_blocks_match_joint_frame(x64, x):
    d = x.shape[1]
    xa, ya = x[:, :2], x[:, 2:]
    ref_r = pd.DataFrame(x).corr().to_numpy()[:2, 2:]
    ref_c = pd.DataFrame(x).cov().to_numpy()[:2, 2:]
    np.testing.assert_allclose(_nancorr(xa, ya), ref_r, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(_nancov(xa, ya), ref_c, rtol=1e-9, atol=1e-9 * (1 + np.nanmax(np.abs(ref_c), initial=0)))
    assert d >= 3


def test_without_missing_values_equals_corrcoef_and_cov(x64):
    x = np.random.default_rng(0).standard_normal((30, 4))
    np.testing.assert_allclose(_nancorr(x), np.corrcoef(x, rowvar=False), rtol=1e-12)
    np.testing.assert_allclose(_nancov(x, ddof=0), np.cov(x, rowvar=False, ddof=0), rtol=1e-12)


def test_inf_counts_as_missing_like_pandas(x64):
    x = np.random.default_rng(1).standard_normal((12, 3))
    x[2, 0] = np.inf
    x[5, 1] = -np.inf
    x[7, 2] = np.nan
    np.testing.assert_allclose(_nancorr(x), pd.DataFrame(x).corr().to_numpy(), rtol=1e-12)


def test_float32_large_offset_matches_float64_reference():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((2000, 4)) @ rng.standard_normal((4, 4))
    x = (1e4 + z).astype(np.float32)
    x[rng.random(x.shape) < 0.15] = np.nan
    ref_r = pd.DataFrame(x.astype(np.float64)).corr().to_numpy()
    ref_c = pd.DataFrame(x.astype(np.float64)).cov().to_numpy()
    got_r, got_c = _nancorr(x), _nancov(x)
    assert got_r.dtype == jnp.float32
    np.testing.assert_allclose(got_r, ref_r, atol=3e-5)
    np.testing.assert_allclose(got_c, ref_c, rtol=3e-5, atol=3e-5 * np.abs(ref_c).max())


def test_constant_on_shared_rows_gives_nan():
    # Column 0 is not constant, but it is on the rows where column 1 is present: pandas gives NaN there.
    x = np.array(
        [[0.3, 1.0, 2.0], [0.3, 2.0, 1.0], [0.3, 3.0, 5.0], [7.1, np.nan, 3.0], [2.9, np.nan, 0.0]], np.float32
    )
    got = np.asarray(_nancorr(x))
    ref = pd.DataFrame(x.astype(np.float64)).corr().to_numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert np.isnan(got[0, 1]) and np.isfinite(got[0, 2])


def test_integer_input_and_one_dimensional():
    x = np.array([1, 2, 4, 3, 6])
    y = np.array([2.0, np.nan, 5.0, 4.0, 9.0])
    r = _nancorr(x, y)
    assert r.shape == () and r.dtype == jnp.float32
    ref = pd.Series(x, dtype=float).corr(pd.Series(y))
    assert float(r) == pytest.approx(ref, abs=1e-6)


def test_grad_and_vmap():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 16, 3)).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = np.nan
    batched = jax.jit(jax.vmap(cs.nancorrcoef))(x)
    for b in range(4):
        np.testing.assert_allclose(batched[b], pd.DataFrame(x[b].astype(np.float64)).corr().to_numpy(), atol=1e-5)
    g = jax.jit(jax.grad(lambda a: jnp.nansum(cs.nancorrcoef(a) ** 2)))(x[0])
    assert np.all(np.isfinite(g[np.isfinite(x[0])]))


def test_shift_falls_back_when_a_column_starts_missing():
    """A column with nothing observed in the first rows (a late-starting series) and a large offset, float32."""
    rng = np.random.default_rng(4)
    x = (1e4 + rng.standard_normal((1500, 3)) @ rng.standard_normal((3, 3))).astype(np.float32)
    x[:700, 0] = np.nan
    x[0, 1] = 1e4 + 40.0  # a leading outlier must not be the shift either
    ref = pd.DataFrame(x.astype(np.float64)).corr().to_numpy()
    np.testing.assert_allclose(_nancorr(x), ref, atol=3e-5)
    ref_c = pd.DataFrame(x.astype(np.float64)).cov().to_numpy()
    np.testing.assert_allclose(_nancov(x), ref_c, rtol=3e-5, atol=3e-5 * np.abs(ref_c).max())


@pytest.mark.parametrize("n", [2 * 256, 3 * 256 + 5])
def test_row_blocks_equal_one_block(x64, monkeypatch, n):
    """Long inputs are reduced in row blocks (a fori_loop plus a remainder block): same values and gradients as the
    one-block computation, for the symmetric and the cross case."""
    from corrjax.stats import missing

    rng = np.random.default_rng(5)
    x = rng.standard_normal((n, 4)) + 50.0
    y = x[:, :2] + rng.standard_normal((n, 2))
    x[rng.random(x.shape) < 0.15] = np.nan
    y[rng.random(y.shape) < 0.15] = np.nan

    def stats(x, y):
        return (
            cs.nancorrcoef(x),
            cs.nancov(x, y, ddof=0, min_periods=3),
            cs.nancorrcoef(x, y),
            jax.grad(lambda a: jnp.nansum(cs.nancorrcoef(a, y)))(x),
        )

    monkeypatch.setattr(missing, "block_rows", lambda width: 256)
    blocked = jax.jit(stats)(x, y)
    monkeypatch.setattr(missing, "block_rows", lambda width: None)
    whole = jax.jit(stats)(x, y)
    for got, ref in zip(blocked, whole, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-13)
    joint = pd.DataFrame(np.hstack([x, y])).corr().to_numpy()
    np.testing.assert_allclose(blocked[2], joint[:4, 4:], rtol=1e-10)


def test_constant_on_shared_rows_gives_nan_in_cross_blocks():
    # The cross block has no symmetrisation to hide a rounding residue left in place of the zero pairwise variance.
    x = np.array(
        [[0.3, 1.0, 2.0], [0.3, 2.0, 1.0], [0.3, 3.0, 5.0], [7.1, np.nan, 3.0], [2.9, np.nan, 0.0]], np.float32
    )
    ref = pd.DataFrame(x.astype(np.float64)).corr().to_numpy()
    xy = np.asarray(_nancorr(x[:, :1], x[:, 1:]))
    yx = np.asarray(_nancorr(x[:, 1:], x[:, :1]))
    np.testing.assert_allclose(xy, ref[:1, 1:], atol=1e-6)
    np.testing.assert_allclose(yx, ref[1:, :1], atol=1e-6)
    assert np.isnan(xy[0, 0]) and np.isnan(yx[0, 0]) and np.isfinite(xy[0, 1])


def test_affine_float32_columns_are_clipped():
    # c / sqrt(vx vy) of exactly affinely related float32 columns rounds to one ulp beyond +-1 for most seeds; only
    # the diagonal has the unit rule, so the clip must keep the other entries in [-1, 1].
    for seed in range(6):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((50, 4)).astype(np.float32)
        x[rng.random(x.shape) < 0.1] = np.nan
        y = np.concatenate([3 * x - 1, 1 - 3 * x], axis=1).astype(np.float32)
        ref = pd.DataFrame(np.concatenate([x, y], axis=1).astype(np.float64)).corr().to_numpy()[:4, 4:]
        for got in (np.asarray(_nancorr(x, y)), np.asarray(_nancorr(np.concatenate([x, y], axis=1)))[:4, 4:]):
            assert got.dtype == np.float32
            assert np.all(np.abs(got) <= 1.0), np.abs(got).max() - 1
            np.testing.assert_allclose(got, ref, atol=1e-6)
