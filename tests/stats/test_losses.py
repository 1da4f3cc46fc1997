"""Correlation losses and feature regularisers against float64 transcriptions of the papers' formulas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from corrjax.stats import (
    barlow_twins_loss,
    concordance_loss,
    decov_loss,
    pearson_loss,
    spearman_loss,
    vicreg_loss,
)

# ---------------------------------------------------------------------------------------------------------------
# float64 references, written from the papers (and, where the paper leaves it open, the official code).


def pearson_ref(x, y):
    x, y = np.asarray(x, np.float64).reshape(len(x), -1), np.asarray(y, np.float64).reshape(len(y), -1)
    r = [np.corrcoef(x[:, j], y[:, j])[0, 1] for j in range(x.shape[1])]
    return np.mean(1 - np.asarray(r))


def concordance_ref(x, y):
    x, y = np.asarray(x, np.float64).reshape(len(x), -1), np.asarray(y, np.float64).reshape(len(y), -1)
    out = []
    for j in range(x.shape[1]):
        a, b = x[:, j], y[:, j]
        sxy = np.mean((a - a.mean()) * (b - b.mean()))
        out.append(1 - 2 * sxy / (a.var() + b.var() + (a.mean() - b.mean()) ** 2))
    return np.mean(out)


def decov_ref(h):
    h = np.asarray(h, np.float64)
    c = np.atleast_2d(np.cov(h, rowvar=False, bias=True))
    return 0.5 * (np.sum(c**2) - np.sum(np.diag(c) ** 2))


def barlow_ref(z1, z2, lam=0.0051, eps=0.0):
    def bn(z):
        z = np.asarray(z, np.float64)
        return (z - z.mean(0)) / np.sqrt(z.var(0) + eps)

    c = bn(z1).T @ bn(z2) / len(z1)
    return np.sum((1 - np.diag(c)) ** 2) + lam * (np.sum(c**2) - np.sum(np.diag(c) ** 2))


def vicreg_ref(z1, z2, sim=25.0, std=25.0, cov=1.0):
    z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
    n, d = z1.shape
    repr_loss = np.mean((z1 - z2) ** 2)
    x, y = z1 - z1.mean(0), z2 - z2.mean(0)
    std_x, std_y = np.sqrt(x.var(0, ddof=1) + 1e-4), np.sqrt(y.var(0, ddof=1) + 1e-4)
    std_loss = np.mean(np.maximum(0, 1 - std_x)) / 2 + np.mean(np.maximum(0, 1 - std_y)) / 2
    cx, cy = x.T @ x / (n - 1), y.T @ y / (n - 1)
    off = lambda c: np.sum(c**2) - np.sum(np.diag(c) ** 2)
    return sim * repr_loss + std * std_loss + cov * (off(cx) / d + off(cy) / d)


# ---------------------------------------------------------------------------------------------------------------

_all = jax.jit(
    lambda x, y: {
        "pearson": pearson_loss(x, y),
        "concordance": concordance_loss(x, y),
        "decov": decov_loss(x),
        "barlow": barlow_twins_loss(x, y),
        "barlow_eps": barlow_twins_loss(x, y, lambda_offdiag=0.01, eps=1e-5),
        "vicreg": vicreg_loss(x, y),
    }
)


def _refs(x, y):
    return {
        "pearson": pearson_ref(x, y),
        "concordance": concordance_ref(x, y),
        "decov": decov_ref(x),
        "barlow": barlow_ref(x, y),
        "barlow_eps": barlow_ref(x, y, 0.01, 1e-5),
        "vicreg": vicreg_ref(x, y),
    }


SHAPES = [(16, 3), (7, 1)]


@st.composite
def views(draw):
    n, d = draw(st.sampled_from(SHAPES))
    x = draw(hnp.arrays(np.float64, (n, d), elements=st.floats(-5, 5, width=64)))
    y = 0.5 * x + draw(hnp.arrays(np.float64, (n, d), elements=st.floats(-5, 5, width=64)))
    return x, y


@given(xy=views())
def test_losses_match_references(xy):
    x, y = xy
    if np.ptp(x, axis=0).min() < 1e-3 or np.ptp(y, axis=0).min() < 1e-3:
        return  # a constant column: Pearson/Barlow Twins are 0/0 (tested separately)
    with jax.enable_x64(True):
        got = jax.tree.map(float, _all(jnp.asarray(x), jnp.asarray(y)))
    for name, want in _refs(x, y).items():
        np.testing.assert_allclose(got[name], want, rtol=1e-9, atol=1e-9, err_msg=name)


def test_defaults_are_the_papers():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 3)), rng.normal(size=(16, 3))
    with jax.enable_x64(True):
        got = _all(jnp.asarray(x), jnp.asarray(y))
    # Barlow Twins: lambda = 0.0051 (5e-3 with d = 8192 in the paper's code); VICReg: 25 / 25 / 1.
    np.testing.assert_allclose(got["barlow"], barlow_ref(x, y, lam=0.0051), rtol=1e-12)
    assert abs(float(got["barlow"]) - barlow_ref(x, y, lam=0.005)) > 1e-6
    np.testing.assert_allclose(got["vicreg"], vicreg_ref(x, y, 25, 25, 1), rtol=1e-12)
    with jax.enable_x64(True):
        custom = vicreg_loss(x, y, invariance_weight=1.0, variance_weight=2.0, covariance_weight=3.0, gamma=1.0)
    np.testing.assert_allclose(custom, vicreg_ref(x, y, 1, 2, 3), rtol=1e-12)


def test_float32_large_offset():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 3))
    y = 0.5 * x + rng.normal(size=(16, 3))
    x32, y32 = (x + 1e4).astype(np.float32), (y + 1e4).astype(np.float32)
    got = _all(x32, y32)
    for name, want in _refs(x32, y32).items():
        np.testing.assert_allclose(float(got[name]), want, rtol=2e-4, atol=1e-4, err_msg=name)


def test_undefined_and_bounds():
    x = np.linspace(0, 1, 8, dtype=np.float32)
    assert np.isnan(pearson_loss(np.ones(8, np.float32), x))
    assert np.isfinite(pearson_loss(np.ones(8, np.float32), x, eps=1e-3))
    np.testing.assert_allclose(pearson_loss(x, 3 * x + 1), 0.0, atol=1e-6)
    np.testing.assert_allclose(pearson_loss(x, -x), 2.0, atol=1e-6)
    np.testing.assert_allclose(concordance_loss(x, x), 0.0, atol=1e-6)
    assert float(concordance_loss(x, x + 1)) > 0.5  # a shift is penalised by CCC, not by Pearson
    assert float(decov_loss(x)) == 0.0


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        x, y = jnp.asarray(rng.normal(size=(7, 3))), jnp.asarray(rng.normal(size=(7, 3)))
        total = jax.jit(lambda x: sum(jax.tree.leaves(_all(x, y))))
        g = np.asarray(jax.grad(total)(x))
        fd = np.zeros(x.shape)
        for idx in np.ndindex(x.shape):
            dx = np.zeros(x.shape)
            dx[idx] = 1e-6
            fd[idx] = (total(x + dx) - total(x - dx)) / 2e-6
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-6)


def test_vmap_over_problems():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(2, 16, 3)).astype(np.float32), rng.normal(size=(2, 16, 3)).astype(np.float32)
    got = jax.jit(jax.vmap(_all))(x, y)
    for b in range(2):
        for name, want in _refs(x[b], y[b]).items():
            np.testing.assert_allclose(float(got[name][b]), want, rtol=1e-4, atol=1e-5, err_msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Spearman.

_spearman = jax.jit(spearman_loss, static_argnames=("regularization",))


@pytest.mark.parametrize("reg", ["l2", "kl"])
def test_spearman_hard_limit_equals_scipy(reg):
    rng = np.random.default_rng(4)
    pred = rng.normal(size=(16, 3)).astype(np.float32)
    target = rng.integers(0, 4, size=(16, 3)).astype(np.float32)  # ties in the target
    got = float(_spearman(pred, target, regularization_strength=1e-3, regularization=reg))
    want = np.mean([1 - scipy.stats.spearmanr(pred[:, j], target[:, j]).statistic for j in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_spearman_gradient_is_nonzero_and_improves_rank_correlation():
    rng = np.random.default_rng(5)
    target = rng.normal(size=16).astype(np.float32)
    pred = jnp.asarray(rng.normal(size=16), jnp.float32)
    grad = jax.jit(jax.grad(lambda p: spearman_loss(p, target, regularization_strength=0.1)))
    before = float(_spearman(pred, target, regularization_strength=0.1))
    g = grad(pred)
    assert float(jnp.abs(g).max()) > 0
    after = float(_spearman(pred - 0.05 * g, target, regularization_strength=0.1))
    assert after < before
    nan_target = target.copy()
    nan_target[0] = np.nan
    assert np.isnan(_spearman(pred, nan_target, regularization_strength=0.1))


def test_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        pearson_loss(np.ones(5), np.ones(6))
    with pytest.raises(ValueError, match="same shape"):
        barlow_twins_loss(np.ones((5, 2)), np.ones((5, 3)))
    with pytest.raises(ValueError, match="shape"):
        decov_loss(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="regularization"):
        spearman_loss(np.ones(5), np.ones(5), regularization="l1")


# ---------------------------------------------------------------------------------------------------------------
# Global statistics across the 8-device mesh, values and gradients.


def test_axis_name_on_mesh_values_and_gradients(mesh8):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(32, 3)).astype(np.float32)
    y = (0.5 * x + rng.normal(size=(32, 3))).astype(np.float32)

    def losses(x, y, axis_name):
        kw = {"axis_name": axis_name}
        return jnp.stack(
            [
                pearson_loss(x, y, **kw),
                concordance_loss(x, y, **kw),
                decov_loss(x, **kw),
                barlow_twins_loss(x, y, **kw),
                vicreg_loss(x, y, **kw),
                spearman_loss(x, y, regularization_strength=0.5, **kw),
            ]
        )

    def value_and_grads(x, y, axis_name):
        vals = losses(x, y, axis_name)
        # One backward pass through a weighted sum (distinct weights, so no term can hide behind another).
        weights = jnp.array([1.0, 2.0, 3.0, 0.5, 0.25, 4.0])
        grads = jax.grad(lambda x: jnp.vdot(weights, losses(x, y, axis_name)))(x)
        return vals, grads

    sharded = jax.jit(
        jax.shard_map(
            functools.partial(value_and_grads, axis_name="data"),
            mesh=mesh8,
            in_specs=(P("data"), P("data")),
            out_specs=(P(), P("data")),
        )
    )
    put = lambda a: jax.device_put(a, NamedSharding(mesh8, P("data")))
    vals, grads = sharded(put(x), put(y))
    want_vals, want_grads = jax.jit(functools.partial(value_and_grads, axis_name=None))(x, y)
    np.testing.assert_allclose(vals, want_vals, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(grads, want_grads, rtol=2e-4, atol=1e-6)


def test_concordance_loss_float32_large_offset_with_a_location_shift():
    # The squared mean difference must come from the shifted means, not from two rounded means ~1e4 apart by 1.
    rng = np.random.default_rng(1)
    for n in (100, 1000):
        x = (1e4 + rng.standard_normal((n, 3))).astype(np.float32)
        y = (x + 0.3 * rng.standard_normal((n, 3)) + 1.0).astype(np.float32)
        want = concordance_ref(x, y)
        np.testing.assert_allclose(float(jax.jit(concordance_loss)(x, y)), want, rtol=1e-5)


def test_pearson_loss_eps_is_added_to_each_variance():
    # r = cov / sqrt((var_x + eps)(var_y + eps)) with 1/n moments; eps large enough to matter at float64 precision.
    rng = np.random.default_rng(4)
    x = rng.standard_normal((20, 3)) * np.array([0.1, 1.0, 3.0])
    y = 0.5 * x + rng.standard_normal((20, 3)) * np.array([0.2, 1.0, 0.5])
    eps = 0.05
    cov = np.mean((x - x.mean(0)) * (y - y.mean(0)), axis=0)
    want = np.mean(1 - cov / np.sqrt((x.var(0) + eps) * (y.var(0) + eps)))
    with jax.enable_x64(True):
        got = float(pearson_loss(jnp.asarray(x), jnp.asarray(y), eps=eps))
    np.testing.assert_allclose(got, want, rtol=1e-12)
