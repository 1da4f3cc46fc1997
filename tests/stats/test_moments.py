"""cov, corrcoef, pearsonr, fisher_z_ci, concordance, partial_corr against numpy/scipy and brute force."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corrjax.stats as cs

# The x64 fixture is set once per test, not per example, which is what we want here.
_SUPPRESS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
X64 = settings(suppress_health_check=_SUPPRESS)

_cov = jax.jit(cs.cov, static_argnames=("ddof",))
_corrcoef = jax.jit(cs.corrcoef)
_pearsonr = jax.jit(cs.pearsonr, static_argnames=("axis",))
_concordance = jax.jit(cs.concordance)
_partial_corr = jax.jit(cs.partial_corr)
_fisher = jax.jit(cs.fisher_z_ci, static_argnames=("confidence_level",))


@st.composite
def data(draw, shapes=((2, 1), (3, 2), (7, 3), (20, 4))):
    """Float64 (n, d) data with optional ties (small integers), constant columns and a large offset."""
    n, d = draw(st.sampled_from(shapes))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["normal", "ties", "offset"]))
    if kind == "ties":
        x = rng.integers(-2, 3, size=(n, d)).astype(np.float64)
    else:
        x = rng.standard_normal((n, d)) * rng.uniform(0.1, 10, size=d)
        if kind == "offset":
            x = x + 1e4
    if draw(st.booleans()) and d > 1:
        x[:, draw(st.integers(0, d - 1))] = 3.25
    return x


@X64
@given(
    x=data(shapes=((2, 1), (3, 2), (9, 3))),
    use_y=st.booleans(),
    weights=st.sampled_from(["none", "f", "a", "both"]),
    ddof=st.sampled_from([0, 1, 2]),
)
def test_cov_matches_numpy(x64, x, use_y, weights, ddof):
    rng = np.random.default_rng(x.shape[0])
    n, d = x.shape
    y = rng.standard_normal((n, 2)) + 5.0 if use_y else None
    fw = rng.integers(0, 4, n) if weights in ("f", "both") else None
    aw = rng.uniform(0.1, 2.0, n) if weights in ("a", "both") else None
    got = np.asarray(_cov(x, y, ddof=ddof, fweights=fw, aweights=aw))
    # n - ddof <= 0 is a case this test means to cover: numpy warns, we give NaN.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Degrees of freedom <= 0", category=RuntimeWarning)
        ref = np.cov(x, y, rowvar=False, ddof=ddof, fweights=fw, aweights=aw)
    ref = np.atleast_2d(ref)
    if use_y:
        ref = ref[:d, d:]
    elif d == 1:
        ref = ref[0, 0]
    # numpy turns a non-positive normalisation into +-inf/NaN with a warning; we give NaN.
    ref = np.where(np.isfinite(ref), ref, np.nan)
    scale = np.max(np.abs(ref), initial=0, where=~np.isnan(ref))  # nanmax without its all-NaN warning
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10 * (1 + scale))


@X64
@given(x=data(), use_y=st.booleans())
def test_corrcoef_matches_numpy(x64, x, use_y):
    n, d = x.shape
    y = np.random.default_rng(n).standard_normal((n, 3)) if use_y else None
    got = np.asarray(_corrcoef(x, y))
    with np.errstate(all="ignore"):
        ref = np.corrcoef(x, y, rowvar=False)
    ref = np.atleast_2d(ref)
    if use_y:
        ref = ref[:d, d:]
    elif d == 1:
        ref = ref[0, 0]
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)
    assert np.all((np.abs(got) <= 1) | np.isnan(got))
    if not use_y and d > 1:
        diag = np.diagonal(got)
        assert np.all((diag == 1.0) | np.isnan(diag))
        np.testing.assert_array_equal(got, got.T)


def test_corrcoef_weighted_equals_replicated_rows(x64):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 3))
    fw = rng.integers(1, 4, 9)
    got = _corrcoef(x, fweights=fw)
    ref = np.corrcoef(np.repeat(x, fw, axis=0), rowvar=False)
    np.testing.assert_allclose(got, ref, rtol=1e-12)


@pytest.mark.parametrize("d", [255, 259, 515])
def test_wide_inputs_use_the_block_symmetric_product(x64, d):
    """From d = 256 on the Gram matrix is assembled from the upper block triangle of 3 column groups; it must equal
    numpy exactly as well."""
    from corrjax.stats._centered import triangle_blocks

    assert triangle_blocks(d) == (1 if d < 256 else 3)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((12, d)) + 3.0
    aw = rng.uniform(0.5, 2.0, 12)
    np.testing.assert_allclose(_cov(x, aweights=aw), np.cov(x, rowvar=False, aweights=aw), rtol=1e-10, atol=1e-12)
    got = np.asarray(_corrcoef(x))
    np.testing.assert_allclose(got, np.corrcoef(x, rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(got, got.T)
    state = jax.jit(cs.cov_update)(cs.cov_init(x.shape[1], dtype=jnp.float64), x)
    np.testing.assert_allclose(cs.cov_finalize(state), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [2 * 600, 3 * 600 + 7])
def test_row_blocks_equal_one_block(x64, monkeypatch, n):
    """Long inputs are reduced in row blocks (a fori_loop plus a remainder block): same values, gradients and
    weights handling as the one-block computation."""
    from corrjax.stats import _centered

    rng = np.random.default_rng(3)
    x = rng.standard_normal((n, 5)) * [1, 2, 3, 4, 5] + 1e3
    y = rng.standard_normal((n, 3)) + x[:, :3]
    fw = rng.integers(1, 4, n)
    aw = rng.uniform(0.5, 2.0, n)

    def stats(x, y):
        return (
            cs.cov(x, aweights=aw, fweights=fw),
            cs.corrcoef(x),
            cs.corrcoef(x, y, aweights=aw),
            cs.cov(x, y, ddof=0),
            jax.grad(lambda x: cs.corrcoef(x, y).sum())(x),
        )

    monkeypatch.setattr(_centered, "block_rows", lambda width: 600)
    blocked = jax.jit(stats)(x, y)
    monkeypatch.setattr(_centered, "block_rows", lambda width: None)
    whole = jax.jit(stats)(x, y)
    for got, ref in zip(blocked, whole, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(blocked[0], np.cov(x, rowvar=False, aweights=aw, fweights=fw), rtol=1e-10)
    np.testing.assert_allclose(blocked[2], _ref_cross(x, y, aw), rtol=1e-10)


def _ref_cross(x, y, aw):
    c = np.cov(np.hstack([x, y]), rowvar=False, aweights=aw)
    s = np.sqrt(np.diag(c))
    return (c / np.outer(s, s))[: x.shape[1], x.shape[1] :]


def test_one_dimensional_inputs_drop_axes():
    x = jnp.arange(5.0)
    y = jnp.stack([x, -x, x**2], axis=1)
    assert _cov(x).shape == ()
    assert _corrcoef(x) == 1.0
    assert _cov(x, y).shape == (3,)
    assert _cov(y, x).shape == (3,)
    assert _corrcoef(x, x) == pytest.approx(1.0)
    np.testing.assert_allclose(_corrcoef(x, y)[:2], [1.0, -1.0], atol=1e-6)


@pytest.mark.parametrize("n", [1000, 4096])
def test_float32_large_offset_agrees_with_float64(n):
    """mean = 1e4 x spread: a one-pass raw-sum formula would lose almost every digit in float32."""
    rng = np.random.default_rng(1)
    z = rng.standard_normal((n, 3)) @ np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 1.0]])
    x = (1e4 + z).astype(np.float32)  # exactly representable data, so the reference sees the same input
    xd = x.astype(np.float64)
    c32 = _cov(x)
    r32 = _corrcoef(x)
    assert c32.dtype == jnp.float32 and r32.dtype == jnp.float32
    c64 = np.cov(xd, rowvar=False)
    np.testing.assert_allclose(c32, c64, rtol=2e-5, atol=2e-5 * np.abs(c64).max())
    np.testing.assert_allclose(r32, np.corrcoef(xd, rowvar=False), atol=2e-5)
    r = _pearsonr(x[:, 0], x[:, 1]).statistic
    assert abs(float(r) - scipy.stats.pearsonr(xd[:, 0], xd[:, 1]).statistic) < 2e-5
    cc = _concordance(x[:, 0], x[:, 1])
    assert abs(float(cc) - _ccc_ref(xd[:, 0], xd[:, 1])) < 2e-5


def test_integer_input_is_promoted_and_nan_propagates():
    xi = np.array([[1, 2], [2, 4], [3, 7], [5, 1]])
    got = _corrcoef(xi)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, np.corrcoef(xi, rowvar=False), rtol=1e-6)
    xn = xi.astype(np.float32)
    xn[1, 0] = np.nan
    c = _cov(xn)
    assert np.isnan(c[0, 0]) and np.isnan(c[0, 1]) and np.isfinite(c[1, 1])
    assert np.isnan(_pearsonr(xn[:, 0], xn[:, 1]).pvalue)


@st.composite
def pearson_pair(draw):
    xshape, yshape, axis = draw(
        st.sampled_from(
            [((8,), (8,), 0), ((6, 3), (6, 3), 0), ((6, 1), (6, 4), 0), ((3, 9), (9,), -1), ((2, 5, 4), (5, 1), 1)]
        )
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = rng.standard_normal(xshape)
    y = rng.standard_normal(yshape)
    if draw(st.booleans()):  # correlated data, so that small p-values are exercised too
        xb, yb = np.broadcast_arrays(x, y)
        y = np.asarray(yb + 2.0 * xb) if yb.shape == yshape else y
    return x, y, axis


@X64
@given(pair=pearson_pair())
def test_pearsonr_matches_scipy(x64, pair):
    x, y, axis = pair
    got = _pearsonr(x, y, axis=axis)
    ref = scipy.stats.pearsonr(x, y, axis=axis)
    np.testing.assert_allclose(got.statistic, ref.statistic, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.pvalue, ref.pvalue, rtol=1e-7, atol=1e-14)


def test_pearsonr_float32_pvalues_and_special_cases():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, 4)).astype(np.float32)
    y = x * np.array([0.0, 0.2, 0.5, 1.0], np.float32) + rng.standard_normal((30, 4)).astype(np.float32)
    got = _pearsonr(x, y)
    ref = scipy.stats.pearsonr(x.astype(np.float64), y.astype(np.float64))
    assert got.pvalue.dtype == jnp.float32
    np.testing.assert_allclose(got.statistic, ref.statistic, atol=1e-6)
    np.testing.assert_allclose(got.pvalue, ref.pvalue, rtol=1e-4, atol=1e-7)
    # large n: float32 p-values take the Student-t normal approximation (betainc's float32 prefactor cancels there)
    xl = rng.standard_normal((20_000, 3)).astype(np.float32)
    yl = (xl * np.array([0.0, 0.01, 0.03], np.float32) + rng.standard_normal((20_000, 3))).astype(np.float32)
    got = _pearsonr(xl, yl)
    ref = scipy.stats.pearsonr(xl.astype(np.float64), yl.astype(np.float64))
    np.testing.assert_allclose(got.pvalue, ref.pvalue, rtol=2e-4)
    two = _pearsonr(np.array([1.0, 2.0]), np.array([5.0, 3.0]))
    assert float(two.statistic) == -1.0 and float(two.pvalue) == 1.0
    const = _pearsonr(np.full(5, 1e4 + 0.1, np.float32), np.arange(5.0))
    assert np.isnan(const.statistic) and np.isnan(const.pvalue)


@X64
@given(r=st.floats(-0.999, 0.999), n=st.integers(2, 500), level=st.sampled_from([0.5, 0.9, 0.95, 0.99]))
def test_fisher_z_ci_matches_scipy(x64, r, n, level):
    rng = np.random.default_rng(n)
    # a sample of size n with correlation near r, so scipy's confidence_interval has a real result object
    z = rng.standard_normal((max(n, 2), 2))
    res = scipy.stats.pearsonr(z[:, 0], z[:, 1] + r * z[:, 0])
    ref = res.confidence_interval(confidence_level=level)
    got = _fisher(res.statistic, max(n, 2), confidence_level=level)
    np.testing.assert_allclose([got.low, got.high], [ref.low, ref.high], rtol=1e-12, atol=1e-12)


def _ccc_ref(x, y):
    mx, my = x.mean(), y.mean()
    sxy = ((x - mx) * (y - my)).mean()
    return 2 * sxy / (x.var() + y.var() + (mx - my) ** 2)


@X64
@given(x=data(shapes=((3, 2), (10, 3))))
def test_concordance_matches_lin_formula(x64, x):
    rng = np.random.default_rng(x.shape[0])
    y = x + rng.standard_normal(x.shape) * 0.3 + 0.1
    got = np.asarray(_concordance(x, y))
    ref = np.array([_ccc_ref(x[:, j], y[:, j]) for j in range(x.shape[1])])
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(_concordance(x[:, :1], x[:, :1])[0], 1.0 if np.ptp(x[:, 0]) > 0 else np.nan)


def _partial_ref(x):
    """Brute force: correlate the residuals of x_i and x_j regressed on the other columns (with intercept)."""
    n, d = x.shape
    out = np.eye(d)
    for i in range(d):
        for j in range(i + 1, d):
            rest = [k for k in range(d) if k not in (i, j)]
            a = np.column_stack([np.ones(n), x[:, rest]])
            ri = x[:, i] - a @ np.linalg.lstsq(a, x[:, i], rcond=None)[0]
            rj = x[:, j] - a @ np.linalg.lstsq(a, x[:, j], rcond=None)[0]
            out[i, j] = out[j, i] = np.corrcoef(ri, rj)[0, 1]
    return out


@settings(suppress_health_check=_SUPPRESS, max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), d=st.sampled_from([2, 5]))
def test_partial_corr_matches_residual_correlation(x64, seed, d):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((40, d)) @ rng.standard_normal((d, d)) + 100.0
    np.testing.assert_allclose(_partial_corr(x), _partial_ref(x), atol=1e-8)


def test_partial_corr_zero_variance_column_is_nan():
    x = np.random.default_rng(0).standard_normal((20, 3))
    x[:, 1] = 2.0
    p = np.asarray(_partial_corr(x.astype(np.float32)))
    assert np.isnan(p[1]).all() and np.isnan(p[:, 1]).all()
    assert p[0, 0] == 1.0 and np.isfinite(p[0, 2])


def test_jit_vmap_grad():
    rng = np.random.default_rng(0)
    xb = jnp.asarray(rng.standard_normal((4, 12, 3)), jnp.float32)
    batched = jax.jit(jax.vmap(cs.corrcoef))(xb)
    for b in range(4):
        np.testing.assert_allclose(batched[b], _corrcoef(xb[b]), atol=1e-6)
    pv = jax.jit(jax.vmap(lambda a: cs.pearsonr(a[:, 0], a[:, 1]).pvalue))(xb)
    assert pv.shape == (4,) and np.all(np.isfinite(pv))
    for fn in (
        lambda a: jnp.sum(cs.corrcoef(a) ** 3),
        lambda a: cs.pearsonr(a[:, 0], a[:, 1]).pvalue,
        lambda a: jnp.sum(cs.cov(a, aweights=jnp.arange(1.0, 13.0))),
        lambda a: jnp.sum(cs.concordance(a[:, :2], a[:, 1:])),
        lambda a: jnp.sum(cs.partial_corr(a) ** 2),
    ):
        g = jax.jit(jax.grad(fn))(xb[0])
        assert g.shape == (12, 3) and np.all(np.isfinite(g))


def test_gradients_match_finite_differences(x64):
    from jax.test_util import check_grads

    x = jnp.asarray(np.random.default_rng(5).standard_normal((9, 3)) + 50.0)
    check_grads(jax.jit(lambda a: cs.corrcoef(a)[0, 1]), (x,), order=1, modes=["rev"])
    check_grads(jax.jit(lambda a: cs.pearsonr(a[:, 0], a[:, 2]).pvalue), (x,), order=1, modes=["rev"])
    check_grads(jax.jit(lambda a: cs.cov(a, ddof=0)[1, 2]), (x,), order=1, modes=["rev", "fwd"])
    check_grads(jax.jit(lambda a: cs.partial_corr(a)[0, 2]), (x,), order=1, modes=["rev"])


def test_partial_corr_zero_variance_column_is_nan_whatever_the_rounding():
    # eigh mixes rounding noise into the zero row of the correlation matrix; the zero-variance variable must still
    # give a NaN row and column (not data-dependent garbage), and the others the partial correlation without it.
    x = np.random.default_rng(0).standard_normal((30, 4))
    x[:, 1] = 3.0
    p = np.asarray(_partial_corr(x.astype(np.float32)))
    assert np.isnan(p[1]).all() and np.isnan(p[:, 1]).all()
    rest = [0, 2, 3]
    np.testing.assert_allclose(p[np.ix_(rest, rest)], _partial_ref(x[:, rest]), atol=1e-5)


def test_grad_is_finite_next_to_a_zero_variance_column():
    # An undefined (NaN) entry must not poison the gradient of the defined ones (0 * inf in the backward pass).
    x = np.random.default_rng(1).standard_normal((8, 3)).astype(np.float32)
    x[:, 2] = 1.5
    x = jnp.asarray(x)
    for fn in (
        lambda a: cs.corrcoef(a)[0, 1],
        lambda a: cs.corrcoef(a[:, :1], a[:, 1:])[0, 0],
        lambda a: cs.pearsonr(a[:, :2], a[:, 1:]).statistic[0],
        lambda a: cs.partial_corr(a)[0, 1],
    ):
        g = np.asarray(jax.jit(jax.grad(fn))(x))
        assert np.all(np.isfinite(g)), g
        np.testing.assert_array_equal(g[:, 2], 0.0)
    g = np.asarray(jax.grad(lambda a: cs.corrcoef(a)[0, 1])(x))
    g_ref = np.asarray(jax.grad(lambda a: cs.corrcoef(a[:, :2])[0, 1])(x))
    np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-7)


def test_concordance_float32_large_offset_with_a_location_shift():
    # The squared mean difference must come from the shifted means, not from two rounded means ~1e4 apart by 1.
    rng = np.random.default_rng(1)
    for n in (100, 1000):
        x = (1e4 + rng.standard_normal((n, 3))).astype(np.float32)
        y = (x + 0.3 * rng.standard_normal((n, 3)) + 1.0).astype(np.float32)
        got = np.asarray(_concordance(x, y))
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        ref = np.array([_ccc_ref(x64[:, j], y64[:, j]) for j in range(3)])
        np.testing.assert_allclose(got, ref, rtol=1e-5)


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_fisher_z_ci_small_n_matches_scipy(x64, n):
    # n <= 3 has no Fisher-z standard error (1 / sqrt(n - 3)): scipy returns the trivial interval [-1, 1] there.
    x, y = np.array([1.0, 2.0, 4.0, 3.0, 7.0])[:n], np.array([1.0, 3.0, 2.0, 5.0, 4.0])[:n]
    res = scipy.stats.pearsonr(x, y)
    for level in (0.5, 0.9):
        ref = res.confidence_interval(confidence_level=level)
        got = _fisher(res.statistic, n, confidence_level=level)
        np.testing.assert_allclose([got.low, got.high], [ref.low, ref.high], rtol=1e-12, atol=1e-12)


def test_cross_correlation_of_affine_float32_columns_is_clipped():
    # c / sqrt(sxx syy) of exactly affinely related float32 columns rounds to one ulp beyond +-1 for most seeds; the
    # cross block has no unit-diagonal rule, so only the clip keeps it in [-1, 1].
    for seed in range(6):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((50, 4)).astype(np.float32)
        y = np.concatenate([3 * x - 1, 1 - 3 * x], axis=1).astype(np.float32)
        got = np.asarray(_corrcoef(x, y))
        ref = np.corrcoef(x.astype(np.float64), y.astype(np.float64), rowvar=False)[:4, 4:]
        assert got.dtype == np.float32
        assert np.all(np.abs(got) <= 1.0), np.abs(got).max() - 1
        np.testing.assert_allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("order", ["sorted", "outlier_first", "drift", "zero_weights_first"])
def test_row_blocks_stay_accurate_in_float32_whatever_the_row_order(monkeypatch, order):
    """Rows are streamed in blocks shifted by the running mean: sorted columns, a far-off first row, a drift and a
    leading run of zero weights must keep float32 at two-pass accuracy (numpy's float32 cov is 3e-4 off on the sorted
    case; a first block shifted by the outlier alone loses 14% of the covariance)."""
    from corrjax.stats import _centered

    monkeypatch.setattr(_centered, "block_rows", lambda width: 256)
    rng = np.random.default_rng(5)
    n = 256 * 6 + 50
    z = rng.standard_normal((n, 4)) @ np.array([[1, 0.5, 0, 0], [0, 1, 0.3, 0], [0, 0, 1, 0.9], [0, 0, 0, 0.1]])
    x = 1e4 + z
    w = np.ones(n)
    if order == "sorted":
        x = np.sort(x, axis=0)
    if order in ("outlier_first", "zero_weights_first"):
        x[0] = 1e4 + 1e3
    if order == "drift":
        x = x + np.linspace(0, 50, n)[:, None]
    if order == "zero_weights_first":
        w[:300] = 0
    x = x.astype(np.float32)
    c = np.asarray(jax.jit(lambda x, w: cs.cov(x, aweights=w))(x, w.astype(np.float32)))
    cref = np.cov(x.astype(np.float64), rowvar=False, aweights=w)
    assert np.abs(c - cref).max() / np.abs(np.diag(cref)).max() < 1e-5
    r = np.asarray(jax.jit(cs.corrcoef)(x))
    np.testing.assert_allclose(r, np.corrcoef(x.astype(np.float64), rowvar=False), atol=2e-6)


@pytest.mark.parametrize("scale", [1e-35, 1e35])
def test_row_blocks_at_the_ends_of_float32(monkeypatch, scale):
    """The running-mean row blocks at the smallest and largest float32 magnitudes: correlations and covariances as
    float64 gives them (no product over- or underflows; the covariance is representable)."""
    from corrjax.stats import _centered

    monkeypatch.setattr(_centered, "block_rows", lambda width: 256)
    rng = np.random.default_rng(6)
    z = rng.standard_normal((256 * 4 + 30, 3)) @ np.array([[1, 0.6, 0], [0, 1, -0.4], [0, 0, 1]])
    x = ((z + 3) * scale).astype(np.float32)
    x64 = x.astype(np.float64)
    r = np.asarray(jax.jit(cs.corrcoef)(x))
    np.testing.assert_allclose(r, np.corrcoef(x64, rowvar=False), atol=1e-6)
    if scale < 1:
        c = np.asarray(jax.jit(cs.cov)(x * np.float32(1e17)))  # the covariance of 1e-18-sized data is representable
        cref = np.cov(x64 * 1e17, rowvar=False)
    else:
        c = np.asarray(jax.jit(cs.cov)(x / np.float32(1e17)))
        cref = np.cov(x64 / 1e17, rowvar=False)
    np.testing.assert_allclose(c, cref, rtol=2e-6, atol=1e-6 * np.abs(cref).max())
