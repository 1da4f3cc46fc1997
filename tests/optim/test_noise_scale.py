"""gradient_noise_scale recovers B_simple = tr(Sigma)/|G|^2 on a synthetic problem with known gradient noise."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import corrjax.optim as co

D, N = 50, 16
TRUE_G = jnp.linspace(-1.0, 1.0, D) * 0.3  # |G|^2 = 0.09 * sum(linspace^2)
SIGMA = jnp.linspace(0.5, 1.5, D)  # per-example noise std per coordinate: tr(Sigma) = sum(SIGMA^2)
B_SIMPLE = float(jnp.sum(SIGMA**2) / jnp.sum(TRUE_G**2))


def _per_example(key, n=N):
    return TRUE_G + SIGMA * jax.random.normal(key, (n, D))


@jax.jit
def _run_moments(keys):
    tx = co.gradient_noise_scale(decay=0.99)

    def body(state, key):
        per = _per_example(key)
        mean = per.mean(0)
        ssd = jnp.sum((per - mean) ** 2, 0)
        u, state = tx.update(mean, state, sum_sq_diff_grads=ssd, sample_size=N)
        return state, u - mean

    return jax.lax.scan(body, tx.init(TRUE_G), keys)


@jax.jit
def _run_two_batches(keys):
    tx = co.gradient_noise_scale(decay=0.99)

    def body(state, key):
        per = _per_example(key, 4 * N)
        small = jnp.sum(per[:N].mean(0) ** 2)  # e.g. one device's share
        _u, state = tx.update(per.mean(0), state, small_batch_sq_norm=small, small_batch_size=N, sample_size=4 * N)
        return state, None

    return jax.lax.scan(body, tx.init(TRUE_G), keys)[0]


def test_recovers_b_simple_from_moments():
    state, passthrough = _run_moments(jax.random.split(jax.random.key(0), 1500))
    assert float(jnp.abs(passthrough).max()) == 0.0  # updates unchanged
    ns = optax.tree.get(state, "noise_scale")
    np.testing.assert_allclose(float(ns), B_SIMPLE, rtol=0.15)
    np.testing.assert_allclose(float(state.trace_cov), float(jnp.sum(SIGMA**2)), rtol=0.05)
    assert int(state.count) == 1500


def test_recovers_b_simple_from_two_batch_sizes():
    state = _run_two_batches(jax.random.split(jax.random.key(1), 1500))
    np.testing.assert_allclose(float(state.noise_scale), B_SIMPLE, rtol=0.2)


def test_noise_terms_are_unbiased_formulas():
    g2, tr = co.noise_terms_from_two_batches(1.0 + 10.0 / 4, 1.0 + 10.0 / 16, 4, 16)
    np.testing.assert_allclose([float(g2), float(tr)], [1.0, 10.0], rtol=1e-6)
    per = np.random.default_rng(0).standard_normal((7, 3))
    g2, tr = co.noise_terms_from_moments(per.mean(0), ((per - per.mean(0)) ** 2).sum(0), 7)
    np.testing.assert_allclose(float(tr), np.var(per, 0, ddof=1).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(g2), (per.mean(0) ** 2).sum() - float(tr) / 7, rtol=1e-5, atol=1e-6)


def test_in_chain_and_missing_extras():
    tx = optax.chain(co.gradient_noise_scale(), co.scale_by_grad_variance(source="batch"), optax.sgd(0.1))
    g = {"w": jnp.ones(3)}
    s = tx.init(g)
    _u, s = tx.update(g, s, sum_sq_diff_grads={"w": jnp.full(3, 0.5)}, sample_size=4)
    np.testing.assert_allclose(float(optax.tree.get(s, "noise_scale")), (1.5 / 3) / (3 - 1.5 / 3 / 4), rtol=1e-6)
    with pytest.raises(ValueError, match="sum_sq_diff_grads"):
        co.gradient_noise_scale().update(g, co.gradient_noise_scale().init(g))
    # Pure noise at the start: |G|^2 estimate <= 0 -> inf, not a negative "batch size".
    tx = co.gradient_noise_scale()
    _, s = tx.update({"w": jnp.zeros(3)}, tx.init(g), sum_sq_diff_grads={"w": jnp.ones(3)}, sample_size=4)
    assert np.isinf(float(s.noise_scale))


def test_state_dtypes_are_stable_for_float64_gradients(x64):
    """The state keeps its dtypes whatever the gradients' precision, so it can be a lax.scan carry."""
    g = jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float64)
    tx = co.gradient_noise_scale()
    state = tx.init(g)

    def body(s, _):
        _u, s = tx.update(g, s, sum_sq_diff_grads=jnp.full_like(g, 0.5), sample_size=8)
        return s, None

    final, _ = jax.lax.scan(body, state, None, length=3)
    assert jax.tree.map(lambda x: x.dtype, final) == jax.tree.map(lambda x: x.dtype, state)
    np.testing.assert_allclose(float(final.trace_cov), 5 * 0.5 / 7, rtol=1e-6)
