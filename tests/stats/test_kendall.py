"""kendalltau against scipy.stats.kendalltau (tau-b/tau-c, exact and asymptotic p-values) and brute-force counts."""

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

from corrjax.stats import kendalltau

_kt = jax.jit(kendalltau, static_argnames="variant")


@jax.jit
def _kt_bc(x, y):
    return kendalltau(x, y, variant="b"), kendalltau(x, y, variant="c")


def _scipy(x, y, variant="b"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ss.kendalltau(x, y, variant=variant)


def _brute_tau_b(x, y):
    """O(n^2) definition: (concordant - discordant) / sqrt((n0 - ties_x)(n0 - ties_y))."""
    sx = np.sign(x[:, None] - x[None, :])
    sy = np.sign(y[:, None] - y[None, :])
    iu = np.triu_indices(len(x), 1)
    s = (sx * sy)[iu]
    n0 = len(iu[0])
    return s.sum() / np.sqrt((n0 - np.sum(sx[iu] == 0)) * (n0 - np.sum(sy[iu] == 0)))


@st.composite
def samples(draw, ns=(2, 9, 33, 34, 80)):
    n = draw(st.sampled_from(ns))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["ties", "continuous", "monotone"]))
    if kind == "ties":
        x, y = rng.integers(0, 4, n), rng.integers(0, 3, n)
    elif kind == "continuous":
        x = rng.standard_normal(n)
        y = x * draw(st.sampled_from([0.0, 0.5, -2.0])) + rng.standard_normal(n)
    else:  # at most a couple of discordant pairs: scipy's exact branch for n > 33
        x = np.arange(n, dtype=float)
        y = x.copy()
        for _ in range(draw(st.integers(0, 1))):
            i = rng.integers(0, n - 1)
            y[i], y[i + 1] = y[i + 1], y[i]
        if draw(st.booleans()):
            y = -y
    return x.astype(np.float32), y.astype(np.float32)


@given(samples())
def test_matches_scipy_float32(xy):
    x, y = xy
    for variant, (tau, p) in zip("bc", _kt_bc(jnp.asarray(x), jnp.asarray(y)), strict=True):
        ref = _scipy(x, y, variant)
        assert tau.dtype == jnp.float32 and p.dtype == jnp.float32
        np.testing.assert_allclose(float(tau), ref.statistic, rtol=1e-6, atol=1e-7, equal_nan=True)
        # float32 erfc and the float32 exact table: relative accuracy ~1e-6.
        np.testing.assert_allclose(float(p), ref.pvalue, rtol=1e-5, atol=1e-7, equal_nan=True)


@given(samples(ns=(5, 34, 120)))
def test_matches_scipy_float64_tight(xy):
    x, y = (v.astype(np.float64) for v in xy)
    with jax.enable_x64(True):
        out = _kt_bc(jnp.asarray(x), jnp.asarray(y))
    for variant, (tau, p) in zip("bc", out, strict=True):
        ref = _scipy(x, y, variant)
        assert tau.dtype == jnp.float64
        np.testing.assert_allclose(float(tau), ref.statistic, rtol=1e-13, atol=1e-15, equal_nan=True)
        np.testing.assert_allclose(float(p), ref.pvalue, rtol=1e-10, atol=1e-300, equal_nan=True)


@given(st.integers(0, 2**31 - 1))
def test_brute_force_counts(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, 57).astype(np.float32)
    y = (x * rng.integers(-1, 2) + rng.integers(0, 4, 57)).astype(np.float32)
    want = _brute_tau_b(x.astype(float), y.astype(float))
    np.testing.assert_allclose(float(_kt(jnp.asarray(x), jnp.asarray(y))[0]), want, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_larger_n_with_ties_and_offset():
    rng = np.random.default_rng(0)
    n = 20000
    base = rng.integers(0, 500, n)
    x = (1e4 + base * np.float32(0.01)).astype(np.float32)  # ties survive a large offset in float32
    y = (base + rng.integers(0, 300, n)).astype(np.float32)
    for variant, (tau, p) in zip("bc", _kt_bc(jnp.asarray(x), jnp.asarray(y)), strict=True):
        ref = _scipy(x, y, variant)
        np.testing.assert_allclose([float(tau), float(p)], [ref.statistic, ref.pvalue], rtol=2e-6, atol=1e-7)


def test_integer_input_is_exact_and_negative_zero_ties():
    x = np.array([2**24 + 1, 2**24, 3, 2**24 + 1, -7, 0], np.int32)
    y = np.array([1, 2, 3, 4, 5, 6], np.int32)
    tau, p = _kt(jnp.asarray(x), jnp.asarray(y))
    ref = _scipy(x, y)
    np.testing.assert_allclose([float(tau), float(p)], [ref.statistic, ref.pvalue], rtol=1e-6)
    zx = np.array([-0.0, 0.0, 1.0, 2.0], np.float32)
    zy = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    ref = _scipy(zx, zy)
    np.testing.assert_allclose(
        [float(v) for v in _kt(jnp.asarray(zx), jnp.asarray(zy))], [ref.statistic, ref.pvalue], rtol=1e-6
    )


def test_undefined_cases_give_nan():
    a = jnp.asarray([1.0, 2.0, 3.0, 4.0])
    for x, y in [(a, jnp.ones(4)), (jnp.ones(4), a), (a.at[2].set(jnp.nan), a), (a[:1], a[:1]), (a[:0], a[:0])]:
        tau, p = _kt(x, y)
        assert np.isnan(float(tau)) and np.isnan(float(p))


def test_vmap_grad_and_errors():
    rng = np.random.default_rng(1)
    xb = jnp.asarray(rng.standard_normal((3, 40)), jnp.float32)
    yb = jnp.asarray(rng.standard_normal((3, 40)), jnp.float32)
    taus, ps = jax.jit(jax.vmap(kendalltau))(xb, yb)
    for k in range(3):
        ref = _scipy(np.asarray(xb[k]), np.asarray(yb[k]))
        np.testing.assert_allclose([float(taus[k]), float(ps[k])], [ref.statistic, ref.pvalue], rtol=1e-5, atol=1e-7)
    g = jax.jit(jax.grad(lambda v: kendalltau(v, yb[0])[0]))(xb[0])
    assert np.all(np.asarray(g) == 0)
    with pytest.raises(ValueError, match=r"x.shape=\(40,\).*y.shape=\(39,\)"):
        kendalltau(xb[0], yb[0, :39])
    with pytest.raises(ValueError, match="1-D"):
        kendalltau(xb, yb)
    with pytest.raises(ValueError, match="variant"):
        kendalltau(xb[0], yb[0], variant="a")


def test_axis_name_shard_map(mesh8):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.integers(0, 9, 64), jnp.float32)
    y = jnp.asarray(rng.standard_normal(64), jnp.float32)
    f = jax.jit(
        jax.shard_map(
            lambda a, b: kendalltau(a, b, axis_name="data"), mesh=mesh8, in_specs=(P("data"), P("data")), out_specs=P()
        )
    )
    sharding = NamedSharding(mesh8, P("data"))
    got = f(jax.device_put(x, sharding), jax.device_put(y, sharding))
    want = _kt(x, y)
    assert float(got.statistic) == float(want.statistic) and float(got.pvalue) == float(want.pvalue)


@pytest.mark.slow
def test_million_against_scipy():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(1_000_000).astype(np.float32)
    y = (x + rng.standard_normal(1_000_000)).astype(np.float32)
    y[::7] = np.round(y[::7])  # some ties
    tau, p = _kt(jnp.asarray(x), jnp.asarray(y))
    ref = _scipy(x, y)
    np.testing.assert_allclose([float(tau), float(p)], [ref.statistic, ref.pvalue], rtol=1e-6)
