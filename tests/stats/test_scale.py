"""Scale robustness and half precision: every correlation from the smallest to the largest normal number.

The data are a well-conditioned float64 sample ``z`` multiplied by ``2**k`` (exact, so the float64 references of
numpy/scipy/pandas on ``z`` are the exact references for the scaled data) or by ``10**k`` (then the references are
taken on the scaled data themselves, which scipy and pandas rescale), with and without a location offset large
against the spread. Covariance-type outputs are compared with the reference multiplied back by ``2**(2k)`` in exact
arithmetic (``np.ldexp``: infinity or zero where the value is outside the range). Half-precision inputs are
compared with float64 references on the same (rounded) data, at the tolerance of float32 accumulation plus the
rounding of the result to the input dtype.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.stats
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import corrjax.stats as cs

N, D = 12, 3


def _sample(seed, n=N, d=D):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, d)) @ np.array([[1.0, 0.6, 0.0], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])[:d, :d]
    return z / np.abs(z).max()  # entries in [-1, 1]


def _ref_corr(z):
    return np.corrcoef(z, rowvar=False)


def _pcorr(z):
    p = np.linalg.inv(np.cov(z, rowvar=False))
    s = np.sqrt(np.diag(p))
    out = -p / s[:, None] / s[None, :]
    np.fill_diagonal(out, 1.0)
    return out


def _ccc(a, b):
    ma, mb = a.mean(0), b.mean(0)
    return 2 * ((a - ma) * (b - mb)).mean(0) / (a.var(0) + b.var(0) + (ma - mb) ** 2)


_corrcoef = jax.jit(cs.corrcoef)
_corrcoef_xy = jax.jit(lambda a, b: cs.corrcoef(a, b))
_cov = jax.jit(cs.cov)
_pearsonr = jax.jit(cs.pearsonr)
_concordance = jax.jit(cs.concordance)
_partial = jax.jit(cs.partial_corr)
_nancorr = jax.jit(cs.nancorrcoef)
_nancov = jax.jit(cs.nancov)


def _stream(x):
    state = cs.cov_init(x.shape[1], dtype=x.dtype)
    for a, b in ((0, 5), (5, 7), (7, len(x))):
        state = _update(state, x[a:b])
    return state


_update = jax.jit(cs.cov_update)
_corr_fin = jax.jit(cs.corr_finalize)
_cov_fin = jax.jit(cs.cov_finalize)

# float64: 2**k with |k| <= 1020 spans 1e-307 .. 1e307; the offset is 1e3 times the spread.
X64_EXPONENTS = st.integers(-1020, 1020)


@pytest.mark.usefixtures("x64")
@given(k=X64_EXPONENTS, offset=st.sampled_from([0.0, 1e3]), seed=st.integers(0, 3))
def test_float64_correlations_at_every_magnitude(k, offset, seed):
    z = _sample(seed)
    if offset:
        # the offset is applied before the scaling, rounding z + offset once: the reference uses the rounded data
        z = (z + offset) / 2.0 ** np.ceil(np.log2(offset + 1))
    x = np.ldexp(z, k)
    if not np.all(np.isfinite(x)) or np.abs(x[x != 0]).min() < np.finfo(np.float64).tiny:
        return  # a value left the normal range (XLA flushes subnormals): not a case the issue covers
    r = _ref_corr(z)
    tol = 1e-10 if not offset else 1e-7
    np.testing.assert_allclose(_corrcoef(x), r, rtol=tol, atol=tol)
    np.testing.assert_allclose(_corrcoef_xy(x[:, :2], x[:, 2]), r[:2, 2], rtol=tol, atol=tol)
    ref = scipy.stats.pearsonr(z[:, 0], z[:, 1])
    got = _pearsonr(x[:, 0], x[:, 1])
    np.testing.assert_allclose(got.statistic, ref.statistic, rtol=tol, atol=tol)
    np.testing.assert_allclose(got.pvalue, ref.pvalue, rtol=1e-6 if offset else 1e-9, atol=tol)
    np.testing.assert_allclose(_partial(x), _pcorr(z), rtol=1e-6 if offset else 1e-9, atol=tol)
    np.testing.assert_allclose(_concordance(x[:, :2], x[:, 1:]), _ccc(z[:, :2], z[:, 1:]), rtol=tol, atol=tol)
    np.testing.assert_allclose(_corr_fin(_stream(x)), r, rtol=tol, atol=tol)
    xn = x.copy()
    xn[[0, 5], [1, 2]] = np.nan
    # pandas on the exactly rescaled data (pandas itself under/overflows at these magnitudes)
    np.testing.assert_allclose(_nancorr(xn), pd.DataFrame(np.ldexp(xn, -k)).corr().to_numpy(), rtol=tol, atol=tol)
    # Covariances stay in the data's units: the reference times 2**(2k), exactly (inf/0 when out of range).
    tiny = np.finfo(np.float64).tiny
    with np.errstate(over="ignore"):  # inf is the exact answer out of range
        ref_cov = np.ldexp(np.cov(z, rowvar=False), 2 * k)
        ref_nancov = np.ldexp(pd.DataFrame(np.ldexp(xn, -k)).cov().to_numpy(), 2 * k)
    np.testing.assert_allclose(_cov(x), ref_cov, rtol=tol, atol=tiny)
    np.testing.assert_allclose(_cov_fin(_stream(x)), ref_cov, rtol=tol, atol=tiny)
    np.testing.assert_allclose(_nancov(xn), ref_nancov, rtol=tol, atol=tiny)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("scale", [1e-300, 1e-188, 1e-160, 1e100, 1e200, 1e300])
def test_float64_decimal_magnitudes_match_scipy_and_pandas(scale):
    rng = np.random.default_rng(17)
    a, b = rng.standard_normal(7), rng.standard_normal(7)
    x, y = a * scale, (a + b) * scale
    ref = scipy.stats.pearsonr(x, y)  # scipy rescales the data itself; pandas does not: it gets the unscaled data
    got = cs.pearsonr(x, y)
    np.testing.assert_allclose(got.statistic, ref.statistic, rtol=1e-12)
    np.testing.assert_allclose(got.pvalue, ref.pvalue, rtol=1e-9)
    frame = np.stack([x, y, -3 * x], axis=1)
    want = pd.DataFrame(np.stack([a, a + b, -3 * a], axis=1)).corr().to_numpy()
    np.testing.assert_allclose(cs.corrcoef(frame), want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(cs.nancorrcoef(frame), want, rtol=1e-12, atol=1e-15)
    # perfectly correlated columns give +-1 (to rounding), as pandas; never beyond
    assert -1.0 <= float(cs.corrcoef(frame)[0, 2]) < -1.0 + 1e-15


@pytest.mark.usefixtures("x64")
def test_float64_top_of_the_range_and_constant_columns():
    rng = np.random.default_rng(3)
    big = np.finfo(np.float64).max
    # x - x[0] would overflow: values spread over the whole range of magnitudes up to the largest finite number
    x = rng.uniform(-1.0, 1.0, (9, 2)) * big
    np.testing.assert_allclose(cs.corrcoef(x), _ref_corr(x / 2.0**1000), rtol=1e-12)
    np.testing.assert_allclose(cs.pearsonr(x[:, 0], x[:, 1]).statistic, _ref_corr(x / 2.0**1000)[0, 1], rtol=1e-12)
    assert np.all(np.isinf(np.diag(cs.cov(x))))  # the variances exceed the range: inf, not NaN
    # NaN for truly constant columns only, at the ends of the range; a relative spread of 1e-15 is not constant
    tiny = np.finfo(np.float64).tiny
    for c in (tiny, 1e300, -big):
        const = np.column_stack([np.full(6, c), np.arange(6.0) * (abs(c) * 1e-15) + c])
        r = cs.corrcoef(const)
        assert np.isnan(r[0, 1]) and float(r[1, 1]) == 1.0
        assert np.isnan(cs.nancorrcoef(const)[0, 1]) and np.isnan(cs.pearsonr(const[:, 0], const[:, 1]).statistic)
        np.testing.assert_allclose(cs.cov(const)[0, 0], 0.0, atol=0)


# float32: 10**k for |k| <= 35, the data rounded to float32; the reference is float64 on the same float32 values.
@given(k=st.integers(-35, 35), offset=st.sampled_from([0.0, 1e3]), seed=st.integers(0, 3))
def test_float32_correlations_1e_minus_35_to_1e35(k, offset, seed):
    z = _sample(seed) + offset
    x = (z * 10.0**k).astype(np.float32)
    x64 = x.astype(np.float64)
    r = _ref_corr(x64)
    # two-pass in float32: ~eps * (offset/spread) relative error in the centred data
    tol = 2e-6 if not offset else 2e-4
    np.testing.assert_allclose(_corrcoef(x), r, atol=tol)
    np.testing.assert_allclose(_pearsonr(x[:, 0], x[:, 1]).statistic, r[0, 1], atol=tol)
    np.testing.assert_allclose(_corr_fin(_stream(x)), r, atol=tol)
    np.testing.assert_allclose(_partial(x), _pcorr(x64), atol=50 * tol)  # an inverse: conditioning ~10
    np.testing.assert_allclose(_concordance(x[:, :2], x[:, 1:]), _ccc(x64[:, :2], x64[:, 1:]), atol=tol)
    xn = x.copy()
    xn[[0, 5], [1, 2]] = np.nan
    np.testing.assert_allclose(_nancorr(xn), pd.DataFrame(xn.astype(np.float64)).corr().to_numpy(), atol=tol)
    cov_ref = np.cov(x64, rowvar=False)
    fi = np.finfo(np.float32)
    ok = (np.abs(cov_ref) > fi.tiny) & (np.abs(cov_ref) < fi.max)  # where the covariance is a normal float32
    assert np.all(np.isinf(np.asarray(_cov(x))[np.abs(cov_ref) > 1.01 * float(fi.max)]))  # beyond the range: inf
    rel = 2e-6 if not offset else 2e-3
    np.testing.assert_allclose(np.asarray(_cov(x))[ok], cov_ref[ok], rtol=rel, atol=rel * np.abs(cov_ref).max())


def test_float32_top_of_the_range():
    rng = np.random.default_rng(4)
    x = (rng.uniform(-1.0, 1.0, (16, 2)) * np.finfo(np.float32).max).astype(np.float32)
    r = _ref_corr(x.astype(np.float64))
    np.testing.assert_allclose(cs.corrcoef(x), r, atol=2e-6)
    np.testing.assert_allclose(cs.nancorrcoef(x), r, atol=2e-6)
    np.testing.assert_allclose(cs.corr_finalize(cs.cov_update(cs.cov_init(2), x)), r, atol=2e-6)


# ---------------------------------------------------------------------------------------------------------------
# Shards at different magnitudes: the scale is a pmax (one-shot) or carried by the state (streaming).


def _on_mesh(mesh, fn, *arrays):
    sharding = NamedSharding(mesh, P("data"))
    mapped = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("data"),) * len(arrays), out_specs=P()))
    return mapped(*[jax.device_put(a, sharding) for a in arrays])


def test_shards_at_different_magnitudes_equal_global(mesh8):
    rng = np.random.default_rng(8)
    z = rng.standard_normal((48, 3))
    # shard s holds rows scaled by 10**(4 s - 14): 1e-14 .. 1e14 in float32, one column shared by all shards
    x = (z * 10.0 ** (4 * np.repeat(np.arange(8), 6) - 14)[:, None]).astype(np.float32)
    r = _ref_corr(x.astype(np.float64))
    np.testing.assert_allclose(_on_mesh(mesh8, lambda a: cs.corrcoef(a, axis_name="data"), x), r, atol=2e-6)
    got = _on_mesh(mesh8, lambda a: cs.nancorrcoef(a, axis_name="data"), x)
    np.testing.assert_allclose(got, r, atol=2e-6)
    state = _on_mesh(mesh8, lambda a: cs.cov_allreduce(cs.cov_update(cs.cov_init(3), a), "data"), x)
    np.testing.assert_allclose(cs.corr_finalize(state), r, atol=2e-6)
    np.testing.assert_allclose(cs.cov_finalize(state), np.cov(x.astype(np.float64), rowvar=False), rtol=2e-5)
    # the same data streamed chunk by chunk, smallest first and largest first, and merged as a tree
    ups = [_update(cs.cov_init(3), x[6 * s : 6 * s + 6]) for s in range(8)]
    for order in (ups, ups[::-1]):
        st_ = order[0]
        for u in order[1:]:
            st_ = cs.cov_merge(st_, u)
        np.testing.assert_allclose(cs.corr_finalize(st_), r, atol=2e-6)
    tree = functools.reduce(cs.cov_merge, [cs.cov_merge(ups[i], ups[i + 4]) for i in range(4)])
    np.testing.assert_allclose(cs.cov_finalize(tree), np.cov(x.astype(np.float64), rowvar=False), rtol=2e-5)
    lc = _on_mesh(mesh8, lambda a, b: cs.linear_cka(a, b, axis_name="data"), x[:, :2], x[:, 1:])
    np.testing.assert_allclose(lc, _linear_cka_ref(x[:, :2], x[:, 1:]), rtol=2e-5)


# ---------------------------------------------------------------------------------------------------------------
# CKA.


def _linear_cka_ref(x, y):
    x = np.asarray(x, np.float64) - np.mean(np.asarray(x, np.float64), 0)
    y = np.asarray(y, np.float64) - np.mean(np.asarray(y, np.float64), 0)
    return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def _rbf_cka_ref(x, y, frac=0.8):
    def gram(a):
        a = np.asarray(a, np.float64)
        d2 = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)
        k = np.exp(-d2 / (2 * frac**2 * np.median(d2)))
        h = np.eye(len(a)) - 1.0 / len(a)
        return h @ k @ h

    kx, ky = gram(x), gram(y)
    return np.sum(kx * ky) / np.sqrt(np.sum(kx * kx) * np.sum(ky * ky))


def _reps(seed, n, d1, d2):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 6))
    x = base @ rng.standard_normal((6, d1)) + rng.standard_normal((n, d1))
    y = np.tanh(base) @ rng.standard_normal((6, d2)) + 2 * rng.standard_normal((n, d2))
    return x, y


_linear_cka = jax.jit(cs.linear_cka, static_argnames="debiased")


@given(kx=st.integers(-120, 120), ky=st.integers(-120, 120))
def test_linear_cka_float32_is_scale_free(kx, ky):
    x, y = _reps(1, 40, 6, 5)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    want = _linear_cka_ref(x32, y32)
    xs, ys = np.ldexp(x32, kx), np.ldexp(y32, ky)
    if min(np.abs(xs).min(), np.abs(ys).min()) < np.finfo(np.float32).tiny:
        return  # an entry left the normal range
    np.testing.assert_allclose(_linear_cka(xs, ys), want, rtol=2e-5)
    # wider than n: the Gram-matrix form
    np.testing.assert_allclose(_linear_cka(xs[:8], ys[:8]), _linear_cka_ref(x32[:8], y32[:8]), rtol=2e-5)


def test_cka_float32_activations_of_1e4_and_1e_minus_6():
    x, y = _reps(2, 1024, 512, 64)
    want = _linear_cka_ref(x, y)
    for s in (1e4, 1e-6, 1e20, 1e-30):
        xs, ys = (x * s).astype(np.float32), (y * s).astype(np.float32)
        np.testing.assert_allclose(_linear_cka(xs, ys), want, rtol=1e-4)
        deb = float(_linear_cka(xs, ys, debiased=True))
        np.testing.assert_allclose(deb, float(_linear_cka(x.astype(np.float32), y.astype(np.float32), debiased=True)))
        np.testing.assert_allclose(
            cs.cka_matrix([([xs[:512], ys[:512]], None), ([xs[512:], ys[512:]], None)])[0, 1],
            cs.cka_matrix([([x[:512], y[:512]], None), ([x[512:], y[512:]], None)])[0, 1],
            rtol=1e-4,
        )
    xr, yr = _reps(3, 64, 5, 4)
    want = _rbf_cka_ref(xr, yr)
    for s in (1e-30, 1e25):
        np.testing.assert_allclose(
            cs.rbf_cka((xr * s).astype(np.float32), (yr * s).astype(np.float32)), want, rtol=1e-4
        )


def test_minibatch_cka_with_batches_and_layers_at_different_scales():
    rng = np.random.default_rng(5)
    batches, batches_ref = [], []
    for i, n in enumerate((16, 24, 16)):
        base = rng.standard_normal((n, 4))
        layers = [base @ rng.standard_normal((4, d)) + 0.5 * rng.standard_normal((n, d)) for d in (3, 5, 4)]
        # layer 1 at 1e20, layer 2 at 1e-20; batch scale varies by 2**(20 i) (exact), which the ratio must ignore
        scaled = [layers[0], layers[1] * 1e20 * 2.0 ** (20 * i), layers[2] * 1e-20 * 2.0 ** (-20 * i)]
        batches.append(([a.astype(np.float32) for a in scaled], None))
        batches_ref.append(([a.astype(np.float32) for a in layers], None))
    got = np.asarray(cs.cka_matrix(batches))
    assert np.all(np.isfinite(got))
    # per-layer rescaling across minibatches is a different (weighted) estimate; compare each batch's scale-free
    # matrix: a single-batch state must not depend on the layers' scales at all
    for b, r in zip(batches, batches_ref, strict=True):
        np.testing.assert_allclose(cs.cka_matrix([b]), cs.cka_matrix([r]), rtol=2e-5, atol=1e-6)
    # merging states at different scales equals one state over both minibatches
    s1 = _cka_update(cs.cka_init(3), batches[0][0])
    s2 = _cka_update(cs.cka_init(3), batches[2][0])
    both = _cka_update(_cka_update(cs.cka_init(3), batches[0][0]), batches[2][0])
    np.testing.assert_allclose(cs.cka_finalize(cs.cka_merge(s1, s2)), cs.cka_finalize(both), rtol=2e-5, atol=1e-6)


_cka_update = jax.jit(cs.cka_update)


# ---------------------------------------------------------------------------------------------------------------
# Half precision: computed in float32, returned in the input dtype.

HALF = [jnp.float16, jnp.bfloat16]


def _half_tol(dtype):
    return 2 * float(jnp.finfo(dtype).eps) + 1e-5  # rounding of the result to the dtype + float32 accumulation


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_correlations(dtype):
    x, y = _reps(6, 256, 8, 8)
    xh, yh = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
    x64, y64 = np.asarray(xh, np.float64), np.asarray(yh, np.float64)
    tol = _half_tol(dtype)
    checks = {
        "corrcoef": (cs.corrcoef(xh), _ref_corr(x64)),
        "corrcoef_xy": (cs.corrcoef(xh, yh), np.corrcoef(x64, y64, rowvar=False)[:8, 8:]),
        "nancorrcoef": (cs.nancorrcoef(xh), _ref_corr(x64)),
        "pearsonr": (cs.pearsonr(xh[:, 0], yh[:, 0]).statistic, scipy.stats.pearsonr(x64[:, 0], y64[:, 0])[0]),
        "partial_corr": (cs.partial_corr(xh[:, :4]), _pcorr(x64[:, :4])),
        "concordance": (cs.concordance(xh, yh), _ccc(x64, y64)),
        "linear_cka": (cs.linear_cka(xh, yh), _linear_cka_ref(x64, y64)),
        "rbf_cka": (cs.rbf_cka(xh, yh), _rbf_cka_ref(x64, y64)),
        "corr_finalize": (cs.corr_finalize(cs.cov_update(cs.cov_init(8, dtype=dtype), xh)), _ref_corr(x64)),
        "pearson_loss": (cs.pearson_loss(xh, yh), np.mean(1 - np.diag(np.corrcoef(x64, y64, rowvar=False)[:8, 8:]))),
    }
    for name, (got, want) in checks.items():
        if name != "corr_finalize":  # a streaming state is float32 (its sums need the range)
            assert got.dtype == dtype, (name, got.dtype)
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=4 * tol, err_msg=name)
    # float16 sums of squares of these values overflow (> 65504); the covariance itself is representable
    big = jnp.asarray(x * 30, dtype)
    assert np.sum(np.asarray(big, np.float64)[:, 0] ** 2) > 65504 > np.abs(np.cov(np.asarray(big, np.float64).T)).max()
    cov_ref = np.cov(np.asarray(big, np.float64), rowvar=False)
    np.testing.assert_allclose(np.asarray(cs.cov(big), np.float64), cov_ref, rtol=4 * tol, atol=4 * tol * 1e4)
    ci = cs.fisher_z_ci(jnp.asarray([0.3, -0.5], dtype), 50)
    want = cs.fisher_z_ci(np.asarray(jnp.asarray([0.3, -0.5], dtype), np.float32), 50)
    assert ci.low.dtype == dtype and ci.high.dtype == dtype
    np.testing.assert_allclose(np.asarray(ci.low, np.float32), want.low, atol=tol)
    np.testing.assert_allclose(np.asarray(ci.high, np.float32), want.high, atol=tol)


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_rank_correlations(dtype):
    """Spearman, Kendall and the pairwise-complete rank correlations rank in float32 and return the input dtype."""
    x, _ = _reps(7, 64, 3, 1)
    xh = jnp.asarray(x, dtype)
    x64 = np.asarray(xh, np.float64)
    x64n = x64.copy()
    x64n[::5, 1] = np.nan
    xhn = jnp.asarray(x64n, dtype)
    tol = _half_tol(dtype)
    rho = cs.spearmanr(xh)
    tau = cs.kendalltau(xh[:, 0], xh[:, 2])
    checks = {
        "spearmanr": (rho.statistic, scipy.stats.spearmanr(x64).statistic),
        "spearmanr_p": (rho.pvalue, scipy.stats.spearmanr(x64).pvalue),
        "spearmanr_omit": (
            cs.spearmanr(xhn[:, 0], xhn[:, 1], nan_policy="omit").statistic,
            scipy.stats.spearmanr(x64n[:, 0], x64n[:, 1], nan_policy="omit").statistic,
        ),
        "kendalltau": (tau.statistic, scipy.stats.kendalltau(x64[:, 0], x64[:, 2]).statistic),
        "kendalltau_p": (tau.pvalue, scipy.stats.kendalltau(x64[:, 0], x64[:, 2]).pvalue),
        "nancorrcoef_spearman": (cs.nancorrcoef(xhn, method="spearman"), pd.DataFrame(x64n).corr("spearman")),
        "nancorrcoef_kendall": (cs.nancorrcoef(xhn, method="kendall"), pd.DataFrame(x64n).corr("kendall")),
    }
    for name, (got, want) in checks.items():
        assert got.dtype == dtype, (name, got.dtype)
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want), atol=4 * tol, err_msg=name)


@pytest.mark.usefixtures("x64")
def test_non_finite_column_leaves_the_others_alone():
    """A column holding inf or NaN gets NaN entries; its exponent does not leak into the other columns."""
    z = _sample(8, n=40, d=3) * 1e30
    x = np.concatenate([z, z[:, :1]], axis=1)
    x[3, 1], x[5, 3] = np.inf, np.nan
    for dtype in (jnp.float32, jnp.float64):
        r = np.asarray(cs.corrcoef(jnp.asarray(x, dtype)), np.float64)
        ok = [0, 2]
        np.testing.assert_allclose(r[np.ix_(ok, ok)], _ref_corr(z[:, ok]), rtol=2e-6)
        assert np.isnan(r[1, [0, 2, 3]]).all() and np.isnan(r[3, [0, 1, 2]]).all()
        nan_aware = np.asarray(cs.nancorrcoef(jnp.asarray(x, dtype)), np.float64)  # NaN skipped, inf a value
        np.testing.assert_allclose(nan_aware[0, 3], 1.0, rtol=2e-6)
        np.testing.assert_allclose(nan_aware[np.ix_(ok, ok)], _ref_corr(z[:, ok]), rtol=2e-6)


def test_float16_cka_matrix_and_issue_value():
    x, y = _reps(7, 256, 32, 16)
    xh, yh = np.asarray(jnp.asarray(x, jnp.float16)), np.asarray(jnp.asarray(y, jnp.float16))
    want = _linear_cka_ref(xh, yh)
    assert 0.05 < want < 0.95
    got = cs.linear_cka(xh, yh)
    assert got.dtype == jnp.float16
    np.testing.assert_allclose(float(got), want, atol=4 * _half_tol(jnp.float16))
    m = cs.cka_matrix([([xh[:128], yh[:128]], None), ([xh[128:], yh[128:]], None)])
    assert m.dtype == jnp.float16 and np.all(np.isfinite(np.asarray(m, np.float32)))
    ref = cs.cka_matrix(
        [
            ([xh[:128].astype(np.float32), yh[:128].astype(np.float32)], None),
            ([xh[128:].astype(np.float32), yh[128:].astype(np.float32)], None),
        ]
    )
    np.testing.assert_allclose(np.asarray(m, np.float32), ref, atol=4 * _half_tol(jnp.float16))


# ---------------------------------------------------------------------------------------------------------------
# Losses: in range and with finite gradients at every magnitude.

_losses = {
    "pearson": (jax.jit(jax.value_and_grad(cs.pearson_loss)), lambda a, b: 1 - np.mean(np.diag(_corr_ab(a, b)))),
    "concordance": (jax.jit(jax.value_and_grad(cs.concordance_loss)), lambda a, b: 1 - np.mean(_ccc(a, b))),
}


def _corr_ab(a, b):
    d = a.shape[1]
    return np.corrcoef(a, b, rowvar=False)[:d, d:]


@given(k=st.integers(-35, 35), offset=st.sampled_from([0.0, 1e2]))
def test_correlation_losses_float32_in_range_with_finite_gradients(k, offset):
    rng = np.random.default_rng(9)
    a = rng.standard_normal((16, 2)) + offset
    b = 0.5 * a + rng.standard_normal((16, 2))
    a32, b32 = (a * 10.0**k).astype(np.float32), (b * 10.0**k).astype(np.float32)
    tol = 2e-6 if not offset else 2e-4
    for name, (fn, ref) in _losses.items():
        v, g = fn(a32, b32)
        v = float(v)
        assert 0.0 <= v <= 2.0, name
        np.testing.assert_allclose(v, ref(a32.astype(np.float64), b32.astype(np.float64)), atol=tol, err_msg=name)
        assert np.all(np.isfinite(g)), name
    # the gradient scales as 1/scale (exactly, for a power of two): check against the unscaled data
    g1 = _losses["pearson"][0](np.ldexp(a.astype(np.float32), 100), b.astype(np.float32))[1]
    g0 = _losses["pearson"][0](a.astype(np.float32), b.astype(np.float32))[1]
    np.testing.assert_allclose(np.ldexp(np.asarray(g1), 100), g0, rtol=1e-5, atol=1e-7)


def test_pearson_loss_issue_spreads_and_eps_units():
    rng = np.random.default_rng(10)
    a = rng.standard_normal(64)
    b = a + rng.standard_normal(64)
    want = 1 - np.corrcoef(a, b)[0, 1]
    for s in (1e10, 1e-10, 1e30, 1e-30):
        v = cs.pearson_loss((a * s).astype(np.float32), (b * s).astype(np.float32))
        np.testing.assert_allclose(float(v), want, atol=2e-6)
    # eps is in the data's units: a variance-sized eps at 1e-15 acts as the same eps at 1
    s = 2.0**-50
    v = cs.pearson_loss(a * s, b * s, eps=0.5 * s * s)
    np.testing.assert_allclose(float(v), float(cs.pearson_loss(a, b, eps=0.5)), rtol=1e-6)
    # the standardised Barlow Twins matrix is scale-free; the soft ranks of spearman_loss act on pred / strength
    # (documented), so it is scale-free with the strength scaled alongside
    fns = {
        "barlow": lambda u, w, s: cs.barlow_twins_loss(
            u[:, None] * jnp.array([1.0, 2.0]), w[:, None] * jnp.array([1.0, 3.0])
        ),
        "spearman": lambda u, w, s: cs.spearman_loss(u, w, regularization_strength=s),
    }
    for name, fn in fns.items():
        fn = jax.jit(jax.value_and_grad(fn))
        ref = float(fn(a.astype(np.float32), b.astype(np.float32), 1.0)[0])
        for s in (2.0**-110, 2.0**110):
            u, w = (a * s).astype(np.float32), (b * s).astype(np.float32)
            v, g = fn(u, w, s)
            np.testing.assert_allclose(float(v), ref, rtol=1e-5, atol=1e-6, err_msg=name)
            assert np.all(np.isfinite(g)), name


def test_covariance_regularisers_multiply_back_exactly():
    rng = np.random.default_rng(11)
    h = rng.standard_normal((32, 4)).astype(np.float32)
    z2 = (h + 0.3 * rng.standard_normal((32, 4))).astype(np.float32)
    d0 = float(cs.decov_loss(h))
    for k in (-30, -10, 10, 30):  # 2**(4k) stays in float32's range
        np.testing.assert_allclose(float(cs.decov_loss(np.ldexp(h, k))), np.ldexp(d0, 4 * k), rtol=1e-5)
    assert float(cs.decov_loss(np.ldexp(h, 60))) == np.inf  # ~2**240: outside the range, not NaN
    # VICReg with gamma, eps and the weights scaled alongside is s**2 times the loss
    # (invariance ~ s**2, hinge ~ s, covariance ~ s**4)
    v0 = cs.vicreg_loss(h, z2, gamma=1.0, eps=1e-4, covariance_weight=1.0)
    for k in (-20, 20):
        s = 2.0**k
        v = cs.vicreg_loss(
            np.ldexp(h, k),
            np.ldexp(z2, k),
            gamma=s,
            eps=1e-4 * s * s,
            variance_weight=25.0 * s,
            covariance_weight=s**-2,
        )
        np.testing.assert_allclose(float(v) / s**2, float(v0), rtol=1e-5)


def test_correlation_gradients_scale_as_one_over_the_scale():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((16, 3)).astype(np.float32)
    grad = jax.jit(jax.grad(lambda a: jnp.sum(jnp.triu(cs.corrcoef(a), 1) ** 2)))
    g0 = np.asarray(grad(x))
    for k in (-110, 110):
        gk = np.asarray(grad(np.ldexp(x, k)))
        assert np.all(np.isfinite(gk))
        np.testing.assert_allclose(np.ldexp(gk, k), g0, rtol=1e-5, atol=1e-6)
