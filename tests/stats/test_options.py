"""scipy/pandas/sklearn options: alternative, nan_policy, kendalltau(method=), pairwise-complete rank correlations,
weightedtau, partial-correlation p-values, assume_centered / shrunk_covariance, forward-mode soft ranks."""

import warnings

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.stats as ss
import sklearn.covariance as skc
from hypothesis import HealthCheck, given, settings
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import corrjax.stats as cs

X64 = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# Each new shape or dtype compiles again: the tests that call several jitted functions per example draw fewer.
FEW = settings(X64, max_examples=12)
ALTS = ["two-sided", "less", "greater"]


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def _close(got, ref, tol=1e-9):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(ref, np.float64), rtol=tol, atol=tol)


@st.composite
def pairs(draw, ns=(3, 7, 30)):
    """Two samples: continuous, correlated, heavily tied, or integer; optionally with NaN."""
    n = draw(st.sampled_from(ns))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["normal", "ties", "int", "monotone"]))
    if kind == "ties":
        x, y = rng.integers(0, 3, n).astype(float), rng.integers(0, 4, n).astype(float)
    elif kind == "int":
        return rng.integers(-5, 5, n), rng.integers(-5, 5, n)
    elif kind == "monotone":
        x = rng.standard_normal(n)
        y = -x if draw(st.booleans()) else 2 * x + 1
    else:
        x = rng.standard_normal(n)
        y = draw(st.sampled_from([0.0, 0.6, -0.9])) * x + rng.standard_normal(n)
    return x, y


# ----------------------------------------------------------------------------------------------------------------
# alternative


_pearsonr = jax.jit(cs.pearsonr, static_argnames=("alternative", "nan_policy", "axis"))
_spearmanr = jax.jit(cs.spearmanr, static_argnames=("alternative", "nan_policy"))
_kendalltau = jax.jit(cs.kendalltau, static_argnames=("variant", "method", "alternative", "nan_policy"))


@pytest.mark.slow
@FEW
@given(xy=pairs(), alternative=st.sampled_from(ALTS))
def test_alternative_matches_scipy(x64, xy, alternative):
    x, y = xy
    for ours, ref in [
        (_pearsonr(x, y, alternative=alternative), _quiet(ss.pearsonr, x, y, alternative=alternative)),
        (_spearmanr(x, y, alternative=alternative), _quiet(ss.spearmanr, x, y, alternative=alternative)),
        (_kendalltau(x, y, alternative=alternative), _quiet(ss.kendalltau, x, y, alternative=alternative)),
    ]:
        _close(ours.statistic, ref.statistic)
        _close(ours.pvalue, ref.pvalue, 1e-7)


def test_one_sided_pvalues_split_the_two_sided_one(x64):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(30)  # the shapes of the property tests: their compilations are reused
    y = x + 0.5 * rng.standard_normal(30)
    for fn in (_pearsonr, _spearmanr, _kendalltau):
        two = float(fn(x, y).pvalue)
        less, greater = float(fn(x, y, alternative="less").pvalue), float(fn(x, y, alternative="greater").pvalue)
        assert two < 0.05
        assert greater == pytest.approx(two / 2, rel=1e-9)  # positive correlation: 'greater' is the agreeing tail
        if fn is _kendalltau:  # exact (n <= 33): the disagreeing tail also holds the mass at the observed count
            assert 1 - two / 2 < less < 1
        else:
            assert less == pytest.approx(1 - two / 2, rel=1e-6)


def test_alternative_float32_large_n_matches_scipy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5000, 3)).astype(np.float32)
    y = (0.02 * x + rng.standard_normal((5000, 3))).astype(np.float32)
    for alt in ALTS:
        got = _pearsonr(x, y, alternative=alt)
        ref = ss.pearsonr(x.astype(np.float64), y.astype(np.float64), alternative=alt)
        np.testing.assert_allclose(got.pvalue, ref.pvalue, rtol=2e-3)


@pytest.mark.parametrize("alternative", ALTS)
@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 50])
def test_fisher_z_ci_one_sided_matches_scipy(x64, alternative, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n)
    y = x + rng.standard_normal(n)
    ref = ss.pearsonr(x, y, alternative=alternative)
    for level in (0.9, 0.95):
        got = cs.fisher_z_ci(ref.statistic, n, confidence_level=level, alternative=alternative)
        want = _quiet(ref.confidence_interval, confidence_level=level)
        _close(got.low, want.low, 1e-12)
        _close(got.high, want.high, 1e-12)


def test_alternative_rejects_unknown_names():
    with pytest.raises(ValueError, match="`alternative`"):
        cs.pearsonr([1.0, 2, 3], [1.0, 3, 2], alternative="two_sided")
    with pytest.raises(ValueError, match="`alternative`"):
        cs.fisher_z_ci(0.3, 10, alternative="up")
    with pytest.raises(ValueError, match="`nan_policy`"):
        cs.spearmanr([1.0, 2, 3], [1.0, 3, 2], nan_policy="drop")


# ----------------------------------------------------------------------------------------------------------------
# nan_policy


def _with_nans(rng, a, frac):
    a = np.asarray(a, np.float64).copy()
    a[rng.random(a.shape) < frac] = np.nan
    return a


@pytest.mark.slow
@FEW
@given(xy=pairs(ns=(6, 30)), seed=st.integers(0, 1000), alternative=st.sampled_from(ALTS))
def test_nan_policy_omit_matches_scipy(x64, xy, seed, alternative):
    rng = np.random.default_rng(seed)
    x, y = _with_nans(rng, xy[0], 0.2), _with_nans(rng, xy[1], 0.2)
    keep = ~np.isnan(x) & ~np.isnan(y)
    kw = {"alternative": alternative, "nan_policy": "omit"}
    if keep.sum() >= 2:
        ref = _quiet(ss.pearsonr, x[keep], y[keep], alternative=alternative)  # scipy's pearsonr has no nan_policy
        got = _pearsonr(x, y, **kw)
        _close(got.statistic, ref.statistic)
        _close(got.pvalue, ref.pvalue, 1e-7)
    if keep.sum() >= 3:
        for ours, ref in [
            (_spearmanr(x, y, **kw), _quiet(ss.spearmanr, x, y, **kw)),
            (_kendalltau(x, y, **kw), _quiet(ss.kendalltau, x, y, **kw)),
        ]:
            _close(ours.statistic, ref.statistic)
            if abs(ref.statistic) > 1 - 1e-12 and ref.pvalue == 1.0:
                # scipy's omit path computes rho = 1.0000000000000002 for a perfect ranking and clips its t
                # statistic to 0 (p = 1); scipy without NaN, on the complete rows, is the reference there.
                ref = _quiet(ss.spearmanr, x[keep], y[keep], alternative=alternative)
            _close(ours.pvalue, ref.pvalue, 1e-7)


def test_nan_policy_omit_tiny_and_empty(x64):
    nan = np.nan
    x = np.array([1.0, nan, 3.0, 4.0, nan, nan])
    y = np.array([2.0, 5.0, nan, 1.0, 0.0, 7.0])  # two complete pairs
    r = _pearsonr(x, y, nan_policy="omit")
    assert float(r.statistic) == -1.0 and float(r.pvalue) == 1.0
    assert np.isnan(_spearmanr(x, y, nan_policy="omit").pvalue)  # t has no degrees of freedom
    assert float(_kendalltau(x, y, nan_policy="omit").statistic) == -1.0
    x[0] = nan
    for fn in (_pearsonr, _spearmanr, _kendalltau):
        res = fn(x, y, nan_policy="omit")
        assert np.isnan(res.statistic) and np.isnan(res.pvalue)


def test_nan_policy_omit_pearsonr_axis_and_offset(x64):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((30, 4)) + 1e4).astype(np.float32)  # mean 1e4 times the spread: needs centring
    y = (x + rng.standard_normal((30, 4))).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = np.nan
    got = cs.pearsonr(x.T, y.T, axis=1, nan_policy="omit")
    for j in range(4):
        k = ~np.isnan(x[:, j])
        ref = ss.pearsonr(x[k, j].astype(np.float64), y[k, j].astype(np.float64))
        np.testing.assert_allclose(got.statistic[j], ref.statistic, rtol=1e-5)


def test_nan_policy_omit_spearman_matrix_matches_scipy(x64):
    rng = np.random.default_rng(4)
    x = _with_nans(rng, rng.integers(0, 5, (25, 4)), 0.2)
    got = _spearmanr(x, nan_policy="omit")
    ref = _quiet(ss.spearmanr, x, nan_policy="omit")
    _close(got.statistic, ref.statistic)
    _close(got.pvalue, ref.pvalue, 1e-7)


def test_nan_policy_raise_and_propagate():
    x, y = np.array([1.0, np.nan, 3.0, 4.0]), np.array([2.0, 5.0, 1.0, 1.0])
    for fn in (cs.pearsonr, cs.spearmanr, cs.kendalltau):
        with pytest.raises(ValueError, match=r"`x` contains NaN \(nan_policy='raise'\)"):
            fn(x, y, nan_policy="raise")
        with pytest.raises(ValueError, match="needs concrete input"):
            jax.jit(lambda a, b, f=fn: f(a, b, nan_policy="raise"))(y, y)
    assert np.isfinite(cs.pearsonr(y, y + 1, nan_policy="raise").statistic)  # no NaN: no error
    assert np.isnan(cs.pearsonr(x, y).statistic)  # 'propagate' (the default)


# ----------------------------------------------------------------------------------------------------------------
# nancorrcoef(method='spearman' | 'kendall') vs pandas


_nancorr = jax.jit(cs.nancorrcoef, static_argnames=("method", "min_periods"))


@st.composite
def frames(draw):
    n, d = draw(st.sampled_from([(2, 2), (5, 3), (12, 4), (30, 3)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["normal", "ties", "offset"]))
    x = rng.integers(-2, 3, (n, d)).astype(float) if kind == "ties" else rng.standard_normal((n, d))
    if kind == "offset":
        x = x * 1e-3 + 1e4
    x[rng.random((n, d)) < draw(st.sampled_from([0.0, 0.15, 0.4]))] = np.nan
    extra = draw(st.sampled_from(["none", "constant", "inf", "empty"]))
    j = draw(st.integers(0, d - 1))
    if extra == "constant":
        x[:, j] = np.where(np.isnan(x[:, j]), np.nan, 2.5)
    elif extra == "inf":
        x[0, j] = np.inf
    elif extra == "empty":
        x[:, j] = np.nan
    return x


@pytest.mark.slow
@FEW
@given(x=frames(), method=st.sampled_from(["spearman", "kendall"]), min_periods=st.sampled_from([1, 3, 8]))
def test_nancorrcoef_rank_methods_match_pandas(x64, x, method, min_periods):
    got = np.asarray(_nancorr(x, method=method, min_periods=min_periods))
    ref = _quiet(pd.DataFrame(x).corr, method=method, min_periods=min_periods).to_numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_nancorrcoef_rank_methods_cross_block_1d_and_float32():
    rng = np.random.default_rng(5)
    x = _with_nans(rng, rng.standard_normal((40, 3)), 0.2)
    y = _with_nans(rng, np.round(rng.standard_normal((40, 2)) * 2), 0.2)
    for method in ("spearman", "kendall"):
        full = pd.DataFrame(np.concatenate([x, y], axis=1)).corr(method=method).to_numpy()
        got = cs.nancorrcoef(x.astype(np.float32), y.astype(np.float32), method=method)
        np.testing.assert_allclose(got, full[:3, 3:], atol=2e-6)
        if method == "spearman":  # (the kendall 1-D path is the same kernel; one compilation less)
            one = cs.nancorrcoef(x[:, 0], y[:, 1], method=method)
            assert one.shape == () and abs(float(one) - full[0, 4]) < 2e-6
    ints = rng.integers(0, 4, (30, 3))
    np.testing.assert_allclose(
        cs.nancorrcoef(ints, method="spearman"), pd.DataFrame(ints).corr("spearman").to_numpy(), atol=2e-6
    )


def test_nancorrcoef_rank_methods_bad_input():
    with pytest.raises(ValueError, match="`method`"):
        cs.nancorrcoef(np.zeros((4, 2)), method="pearsonr")
    with pytest.raises(ValueError, match="same number of observations"):
        cs.nancorrcoef(np.zeros((4, 2)), np.zeros((5, 2)), method="spearman")
    with pytest.raises(ValueError, match="must be 1-D"):
        cs.nancorrcoef(np.zeros((4, 2, 2)), method="kendall")


def test_nancorrcoef_spearman_sharded_equals_global(mesh8):
    rng = np.random.default_rng(6)
    x = _with_nans(rng, rng.standard_normal((32, 3)), 0.2).astype(np.float32)
    fn = jax.shard_map(
        lambda a: cs.nancorrcoef(a, method="spearman", axis_name="data"), mesh=mesh8, in_specs=P("data"), out_specs=P()
    )
    xs = jax.device_put(x, NamedSharding(mesh8, P("data")))
    np.testing.assert_allclose(jax.jit(fn)(xs), cs.nancorrcoef(x, method="spearman"), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# kendalltau(method=...)


@pytest.mark.parametrize("n", [2, 5, 40, 400])
def test_kendall_exact_matches_scipy(x64, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n)
    fn = jax.jit(lambda a, b: [cs.kendalltau(a, b, method="exact", alternative=alt) for alt in ALTS])
    for y in (0.15 * x + rng.standard_normal(n), rng.standard_normal(n), x.copy()):
        for got, alt in zip(fn(x, y), ALTS, strict=True):
            ref = ss.kendalltau(x, y, method="exact", alternative=alt)
            _close(got.statistic, ref.statistic)
            np.testing.assert_allclose(float(got.pvalue), ref.pvalue, rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("n", [34, 200])
def test_kendall_auto_rule_matches_scipy(x64, n):
    fn = jax.jit(
        lambda a, b: [cs.kendalltau(a, b, method=m, alternative=alt) for m in ("auto", "asymptotic") for alt in ALTS]
    )
    x = np.arange(n, dtype=float)
    for swaps in (0, 1, 2):  # 0 or 1 discordant pair: exact closed forms; 2: the normal approximation
        y = x.copy()
        for i in range(swaps):
            y[[3 * i, 3 * i + 1]] = y[[3 * i + 1, 3 * i]]
        for yy in (y, -y):
            got = fn(x, yy)
            refs = [ss.kendalltau(x, yy, method=m, alternative=alt) for m in ("auto", "asymptotic") for alt in ALTS]
            for g, r in zip(got, refs, strict=True):
                np.testing.assert_allclose(float(g.pvalue), r.pvalue, rtol=1e-9, atol=1e-300)


def test_kendall_exact_with_ties_nan_and_size_limit(x64):
    x, y = np.array([1.0, 1, 2, 3, 4]), np.array([1.0, 2, 3, 4, 5])
    assert np.isnan(cs.kendalltau(x, y, method="exact").pvalue)  # scipy raises; a traced value cannot
    with pytest.raises(ValueError, match="n <= 1000"):
        cs.kendalltau(np.arange(1001.0), np.arange(1001.0), method="exact")
    with pytest.raises(ValueError, match="nan_policy='omit'"):
        cs.kendalltau(np.arange(101.0), np.arange(101.0), method="exact", nan_policy="omit")
    with pytest.raises(ValueError, match="`method`"):
        cs.kendalltau(x, y, method="permutation")


def test_kendall_exact_omit_matches_scipy(x64):
    rng = np.random.default_rng(7)
    x = _with_nans(rng, rng.standard_normal(60), 0.3)
    y = _with_nans(rng, rng.standard_normal(60), 0.3)
    for alt in ALTS:
        got = _kendalltau(x, y, method="exact", nan_policy="omit", alternative=alt)
        ref = ss.kendalltau(x, y, method="exact", nan_policy="omit", alternative=alt)
        _close(got.statistic, ref.statistic)
        _close(got.pvalue, ref.pvalue, 1e-9)


def test_kendall_variant_c_with_omit(x64):
    rng = np.random.default_rng(8)
    x = _with_nans(rng, rng.integers(0, 4, 30), 0.2)
    y = _with_nans(rng, rng.integers(0, 3, 30), 0.2)
    got = cs.kendalltau(x, y, variant="c", nan_policy="omit")
    ref = ss.kendalltau(x, y, variant="c", nan_policy="omit")
    _close(got.statistic, ref.statistic)
    _close(got.pvalue, ref.pvalue, 1e-9)


# ----------------------------------------------------------------------------------------------------------------
# weightedtau


@pytest.mark.slow
@FEW
@given(
    xy=pairs(ns=(2, 12, 40)),
    rank=st.sampled_from(["true", "none", "false", "array"]),
    additive=st.booleans(),
    nan=st.booleans(),
)
def test_weightedtau_matches_scipy(x64, xy, rank, additive, nan):
    x, y = np.asarray(xy[0], float), np.asarray(xy[1], float)
    if nan:
        x[0] = np.nan  # the smallest value, as scipy
    r = {"true": True, "none": None, "false": False, "array": np.random.default_rng(len(x)).permutation(len(x))}[rank]
    got = cs.weightedtau(x, y, rank=r, additive=additive)
    ref = _quiet(ss.weightedtau, x, y, rank=r, additive=additive)
    _close(got.statistic, ref.statistic, 1e-12)
    assert np.isnan(got.pvalue)


def test_weightedtau_weigher_blocks_and_edges(x64):
    a, b = [12, 2, 1, 12, 2], [1, 4, 7, 1, 0]
    _close(cs.weightedtau(a, b).statistic, -0.56694968153682723, 1e-14)  # scipy's docstring values
    _close(cs.weightedtau(a, b, additive=False).statistic, -0.62205716951801038, 1e-14)
    _close(cs.weightedtau(a, b, weigher=jnp.ones_like).statistic, ss.kendalltau(a, b).statistic, 1e-14)
    rng = np.random.default_rng(9)
    x = rng.standard_normal(600)  # several row blocks plus a padded one
    y = np.round(x + rng.standard_normal(600))
    for w in (None, lambda r: 1.0 / (r + 1.0) ** 2):
        got = jax.jit(lambda u, v, w=w: cs.weightedtau(u, v, weigher=w))(x, y)
        _close(got.statistic, ss.weightedtau(x, y, weigher=None if w is None else (lambda r: 1 / (r + 1) ** 2))[0])
    assert np.isnan(cs.weightedtau([1.0, 1, 1], [1.0, 2, 3]).statistic)
    assert np.isnan(cs.weightedtau([1.0], [2.0]).statistic)
    with pytest.raises(ValueError, match="1-D samples"):
        cs.weightedtau(np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="same number of observations"):
        cs.weightedtau(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="`rank`"):
        cs.weightedtau(np.zeros(3), np.zeros(3), rank=np.arange(4))


# ----------------------------------------------------------------------------------------------------------------
# partial_corr_test


def _partial_ref(x, i, j, alternative):
    """Residual correlation given the other columns, and the t-test with n - 2 - k dof (pingouin / ppcor)."""
    n, d = x.shape
    others = np.delete(np.arange(d), [i, j])
    z = np.column_stack([np.ones(n), x[:, others]])
    ri = x[:, i] - z @ np.linalg.lstsq(z, x[:, i], rcond=None)[0]
    rj = x[:, j] - z @ np.linalg.lstsq(z, x[:, j], rcond=None)[0]
    r = np.corrcoef(ri, rj)[0, 1]
    dof = n - 2 - len(others)
    t = r * np.sqrt(dof / (1 - r * r))
    p = {"less": ss.t.cdf(t, dof), "greater": ss.t.sf(t, dof)}.get(alternative, 2 * ss.t.sf(abs(t), dof))
    return r, p


@pytest.mark.parametrize("alternative", ALTS)
@pytest.mark.parametrize("shape", [(8, 3), (30, 5), (6, 5)])
def test_partial_corr_test_matches_t_test(x64, alternative, shape):
    rng = np.random.default_rng(shape[0])
    x = rng.standard_normal(shape) @ rng.standard_normal((shape[1], shape[1]))
    res = jax.jit(cs.partial_corr_test, static_argnames="alternative")(x, alternative=alternative)
    assert res.dof == shape[0] - shape[1]
    for i in range(shape[1]):
        for j in range(i + 1, shape[1]):
            r, p = _partial_ref(x, i, j, alternative)
            _close(res.statistic[i, j], r, 1e-8)
            _close(res.pvalue[i, j], p, 1e-7)


def test_partial_corr_test_edges():
    res = cs.partial_corr_test(np.random.default_rng(0).standard_normal((4, 4)))
    assert res.dof == 0 and np.all(np.isnan(res.pvalue))
    with pytest.raises(ValueError, match="d >= 2"):
        cs.partial_corr_test(np.zeros(5))
    x = np.random.default_rng(1).standard_normal((10, 3))
    x[:, 1] = 1.0
    assert np.isnan(cs.partial_corr_test(x).pvalue[0, 1])


# ----------------------------------------------------------------------------------------------------------------
# shrinkage


@pytest.mark.parametrize("assume_centered", [False, True])
@pytest.mark.parametrize("shape", [(5, 8), (40, 4), (30, 1)])
def test_assume_centered_and_fixed_shrinkage_match_sklearn(x64, assume_centered, shape):
    rng = np.random.default_rng(shape[0])
    x = rng.standard_normal(shape) @ rng.standard_normal((shape[1], shape[1])) + 2.0
    for ours, ref in [
        (cs.ledoit_wolf(x, assume_centered=assume_centered), skc.LedoitWolf(assume_centered=assume_centered).fit(x)),
        (cs.oas(x, assume_centered=assume_centered), skc.OAS(assume_centered=assume_centered).fit(x)),
    ]:
        _close(ours.covariance, ref.covariance_, 1e-10)
        _close(ours.shrinkage, ref.shrinkage_, 1e-10)
    for s in (0.0, 0.1, 0.7, 1.0):
        got = cs.shrunk_covariance(x, shrinkage=s, assume_centered=assume_centered)
        ref = skc.ShrunkCovariance(shrinkage=s, assume_centered=assume_centered).fit(x)
        _close(got.covariance, ref.covariance_, 1e-12)
        emp = skc.empirical_covariance(x, assume_centered=assume_centered)
        _close(got.covariance, skc.shrunk_covariance(emp, s), 1e-12)


def test_shrunk_covariance_traced_and_bad_input():
    x = np.random.default_rng(2).standard_normal((20, 3)).astype(np.float32)
    got = jax.jit(lambda a, s: cs.shrunk_covariance(a, shrinkage=s))(x, jnp.float32(0.25))
    ref = skc.ShrunkCovariance(shrinkage=0.25).fit(x.astype(np.float64)).covariance_
    np.testing.assert_allclose(got.covariance, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="`shrinkage` must be in"):
        cs.shrunk_covariance(x, shrinkage=1.5)
    with pytest.raises(ValueError, match="`shrinkage` must be a scalar"):
        cs.shrunk_covariance(x, shrinkage=jnp.ones(2))
    with pytest.raises(TypeError, match="`assume_centered`"):
        cs.ledoit_wolf(x, assume_centered="yes")


# ----------------------------------------------------------------------------------------------------------------
# forward-mode soft ranks


@pytest.mark.parametrize(("fn", "regularization"), [(cs.soft_rank, "l2"), (cs.soft_rank, "kl"), (cs.soft_sort, "kl")])
def test_soft_jvp_matches_jacrev_and_finite_differences(x64, fn, regularization):
    rng = np.random.default_rng(10)
    x = jnp.asarray(rng.standard_normal((3, 6)))

    def f(a):
        return fn(a, regularization_strength=0.5, regularization=regularization)

    jf = jax.jit(jax.jacfwd(f))(x)
    jr = jax.jit(jax.jacrev(f))(x)
    np.testing.assert_allclose(jf, jr, atol=1e-12)
    assert np.abs(jf).max() > 0.1  # not a vacuous zero Jacobian
    v = jnp.asarray(rng.standard_normal(x.shape))
    _, tangent = jax.jvp(f, (x,), (v,))
    eps = 1e-6
    fd = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
    np.testing.assert_allclose(tangent, fd, atol=1e-6)
    # through the regularisation strength too
    g = lambda s: fn(x, regularization_strength=s, regularization=regularization)
    ds = jax.jacfwd(g)(0.5)
    np.testing.assert_allclose(ds, (g(0.5 + eps) - g(0.5 - eps)) / (2 * eps), atol=1e-6)
