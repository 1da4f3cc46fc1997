"""ledoit_wolf / oas against scikit-learn's LedoitWolf and OAS (assume_centered=False)."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.covariance import OAS, LedoitWolf

import corrjax.stats as cs

_SUPPRESS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]

_lw = jax.jit(cs.ledoit_wolf)
_oas = jax.jit(cs.oas)


@st.composite
def shrink_data(draw):
    n, p = draw(st.sampled_from([(2, 3), (5, 8), (30, 4), (60, 2), (12, 1)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["normal", "correlated", "ties", "offset"]))
    if kind == "ties":
        return rng.integers(-1, 2, size=(n, p)).astype(np.float64)
    x = rng.standard_normal((n, p)) * rng.uniform(0.1, 5.0, size=p)
    if kind == "correlated":
        x = x @ rng.standard_normal((p, p))
    if kind == "offset":
        x = x + 1e3
    return x


@settings(suppress_health_check=_SUPPRESS)
@given(x=shrink_data())
def test_ledoit_wolf_and_oas_match_sklearn(x64, x):
    for ours, theirs in ((_lw, LedoitWolf), (_oas, OAS)):
        got = ours(x)
        ref = theirs().fit(x)
        scale = 1.0 + np.abs(ref.covariance_).max()
        np.testing.assert_allclose(got.covariance, ref.covariance_, rtol=1e-8, atol=1e-8 * scale)
        np.testing.assert_allclose(got.shrinkage, ref.shrinkage_, rtol=1e-8, atol=1e-10)


def test_constant_data_and_one_variable(x64):
    x = np.full((6, 3), 2.5)
    for ours, theirs in ((_lw, LedoitWolf), (_oas, OAS)):
        got, ref = ours(x), theirs().fit(x)
        np.testing.assert_allclose(got.covariance, ref.covariance_, atol=1e-12)
        np.testing.assert_allclose(got.shrinkage, ref.shrinkage_)
    v = np.arange(5.0)
    got = cs.ledoit_wolf(v)
    assert got.covariance.shape == (1, 1) and float(got.shrinkage) == 0.0
    np.testing.assert_allclose(got.covariance[0, 0], v.var())


def test_float32_large_offset():
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6))).astype(np.float32)
    for ours, theirs in ((_lw, LedoitWolf), (_oas, OAS)):
        got = ours(x)
        ref = theirs().fit(x.astype(np.float64))
        assert got.covariance.dtype == jnp.float32
        scale = np.abs(ref.covariance_).max()
        np.testing.assert_allclose(got.covariance, ref.covariance_, rtol=5e-5, atol=5e-5 * scale)
        np.testing.assert_allclose(got.shrinkage, ref.shrinkage_, rtol=1e-3, atol=1e-6)


def test_vmap_and_grad():
    rng = np.random.default_rng(1)
    xb = rng.standard_normal((3, 10, 4)).astype(np.float32)
    out = jax.jit(jax.vmap(cs.oas))(xb)
    for b in range(3):
        ref = OAS().fit(xb[b].astype(np.float64))
        np.testing.assert_allclose(out.covariance[b], ref.covariance_, rtol=1e-5, atol=1e-6)
    g = jax.jit(jax.grad(lambda a: jnp.linalg.slogdet(cs.ledoit_wolf(a).covariance)[1]))(xb[0])
    assert np.all(np.isfinite(g))
