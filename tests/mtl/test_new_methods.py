"""The newer multi-task methods (FairGrad, ConFIG, SDMGrad, MoCo, DB-MTL, ExcessMTL, STCH, IMTL-L, IMTL) against
float64 NumPy/SciPy references of the papers' and LibMTL/TorchJD's semantics, on hard inputs, and their Optax
plumbing."""

from __future__ import annotations

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

import corrjax.mtl as mtl
from corrjax.mtl.aggregators.config_grad import config_grad_weighting
from corrjax.mtl.aggregators.fairgrad import fair_allocation
from corrjax.mtl.aggregators.sdmgrad import sdmgrad_weighting

# ----------------------------------------------------------------------------------------------------------------
# Hard Jacobians: (T, d) float64 rows.


def _hard(kind: str, t: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "scaled":  # gradient norms spread over 1e-6 .. 1e6
        return rng.normal(size=(t, d)) * 10.0 ** rng.uniform(-6, 6, size=(t, 1))
    if kind == "near_duplicate":  # pairs of tasks whose unit gradients differ by ~1e-3
        j = rng.normal(size=(t, d))
        j[1::2] = j[0::2][: len(j[1::2])] * 3.0 + 1e-3 * rng.normal(size=(len(j[1::2]), d))
        return j
    if kind == "zero_task":
        j = rng.normal(size=(t, d))
        j[t // 2] = 0.0
        return j
    if kind == "wide":  # T > d, all gradients in one half-space (0 is not in their convex hull)
        j = rng.normal(size=(t, d)) * 0.3
        j[:, 0] = 1.0 + rng.uniform(size=t)
        return j * 10.0 ** rng.uniform(-2, 2, size=(t, 1))
    raise ValueError(kind)


HARD = [
    (kind, t)
    for kind, ts in (("scaled", (2, 3, 5, 8, 16, 32)), ("near_duplicate", (2, 4, 8)), ("zero_task", (3, 8)))
    for t in ts
]


def _tree(j: np.ndarray, dtype=None):
    """A two-leaf task-stacked pytree of the rows of ``j`` (leaves ``(T, 2, 2)`` and ``(T, d - 4)``)."""
    j = jnp.asarray(j, dtype)
    return {"w": j[:, :4].reshape(-1, 2, 2), "b": j[:, 4:]}


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(tree["w"], np.float64).reshape(-1), np.asarray(tree["b"], np.float64)])


@functools.cache
def _jit_update(name: str, *args, **kw):
    tx = getattr(mtl, name)(*args, **dict(kw))
    return tx, jax.jit(tx.update)


def _once(name: str, j: np.ndarray, dtype=None, **kw) -> np.ndarray:
    tx, upd = _jit_update(name, **kw)
    out, _ = upd(_tree(j, dtype), tx.init(None))
    return _flat(out)


# ----------------------------------------------------------------------------------------------------------------
# FairGrad


def _fairgrad_ref(g: np.ndarray, alpha: float) -> np.ndarray:
    """``G w = w^{-1/alpha}`` in float64 NumPy: Newton on the convex ``phi`` in the variables ``b = w |g|^{2a/(a+1)}``
    (1 for orthogonal gradients), damped by ``1 / (1 + lambda)`` far away, run to a Newton decrement of 1e-30; the
    residual is certified at the rounding floor. Zero rows get 0."""
    live = np.diag(g) > 0
    gl = g[np.ix_(live, live)]
    s = np.sqrt(np.diag(gl)) ** (-2 * alpha / (alpha + 1))
    a = gl * np.outer(s, s)
    b = np.ones(len(gl))
    for _ in range(200):
        w = s * b
        grad = a @ b - s * w ** (-1 / alpha)
        db = np.linalg.solve(a + np.diag(s**2 * w ** (-1 / alpha - 1) / alpha), -grad)
        lam2 = -grad @ db
        t = 1.0 if lam2 < 0.01 else 1.0 / (1.0 + np.sqrt(lam2))
        while np.any(b + t * db <= 0):
            t /= 2
        b = b + t * db
        if lam2 < 1e-30:
            break
    w = s * b
    floor = np.finfo(float).eps * (np.abs(gl) @ w) * w ** (1 / alpha)
    assert np.all(np.abs((gl @ w) * w ** (1 / alpha) - 1) < 100 * floor), "reference did not converge"
    out = np.zeros(len(g))
    out[live] = w
    return out


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("kind, t", HARD + [("wide", 5), ("wide", 16)])
def test_fairgrad_matches_the_exact_solution_on_hard_inputs(x64, kind, t, alpha):
    d = 3 if kind == "wide" else max(2 * t, 6)
    j = _hard(kind, t, d, seed=t)
    g = j @ j.T
    ref = _fairgrad_ref(g, alpha)
    w = np.asarray(jax.jit(fair_allocation)(jnp.asarray(g), alpha))
    np.testing.assert_allclose(w, ref, rtol=1e-7, atol=0)
    if kind == "zero_task":
        assert w[t // 2] == 0.0


@pytest.mark.parametrize("kind, t", [("scaled", 3), ("scaled", 8), ("near_duplicate", 4), ("zero_task", 8)])
def test_fairgrad_float32_update_matches_the_float64_reference(kind, t):
    j = _hard(kind, t, 2 * t + 4, seed=10 + t)
    if kind == "scaled":  # float32 keeps 1e-4 relative over norms 1e-3 .. 1e3
        j = j / np.linalg.norm(j, axis=1, keepdims=True) * 10.0 ** np.linspace(-3, 3, t)[:, None]
    ref = j.T @ _fairgrad_ref(j @ j.T, 2.0)
    out = _once("fairgrad", j, jnp.float32, alpha=2.0)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    hnp.arrays(np.float64, (3, 6), elements=st.floats(-10, 10, allow_nan=False)),
    st.sampled_from([0.5, 1.0, 3.0]),
    st.floats(1e-4, 1e4),
)
def test_fairgrad_scale_behaviour_and_stationarity(x64, j, alpha, c):
    """``w(c G) = c^{-alpha/(alpha+1)} w(G)``; the KKT system ``g_i . d = w_i^{-1/alpha}`` holds; ``alpha = 1`` is
    invariant to rescaling one task (Nash-MTL)."""
    g = j @ j.T
    if np.linalg.eigvalsh(g / max(np.trace(g), 1e-300))[0] < 1e-6:  # (nearly) singular: 0 may be in the hull
        return
    solve = jax.jit(fair_allocation)
    w = np.asarray(solve(jnp.asarray(g), alpha))
    np.testing.assert_allclose(g @ w, w ** (-1 / alpha), rtol=1e-8)
    np.testing.assert_allclose(np.asarray(solve(jnp.asarray(c * g), alpha)), c ** (-alpha / (alpha + 1)) * w, rtol=1e-8)
    if alpha == 1.0:
        s = np.diag([c, 1.0, 1.0])
        w1 = np.asarray(solve(jnp.asarray(s @ g @ s), 1.0))
        np.testing.assert_allclose((s @ j).T @ w1, j.T @ w, rtol=1e-7, atol=1e-9 * np.abs(j.T @ w).max())


def test_fairgrad_closed_forms_and_pareto_stationary_input(x64):
    # orthogonal gradients: w_i = |g_i|^{-2 alpha/(alpha+1)}; T = 1 at alpha = 1 is the unit gradient
    j = np.diag([1e-3, 1.0, 1e3]) @ np.eye(3, 6)
    for alpha in (0.5, 1.0, 4.0):
        out = _once("fairgrad", j, jnp.float64, alpha=alpha)
        np.testing.assert_allclose(out[:3], np.array([1e-3, 1.0, 1e3]) ** (1 - 2 * alpha / (alpha + 1)), rtol=1e-12)
    g1 = np.arange(1.0, 7.0)[None]
    np.testing.assert_allclose(_once("fairgrad", g1, jnp.float64), g1[0] / np.linalg.norm(g1), rtol=1e-12)
    # 0 in the hull (opposite gradients): no solution; w diverges along the null direction, the update stays finite
    # and conflicts with no task in the limit
    j = np.stack([np.ones(6), -np.ones(6), np.eye(6)[0]])
    out = _once("fairgrad", j, jnp.float64)
    assert np.all(np.isfinite(out)) and np.linalg.norm(out) <= 2.0
    assert np.all(j @ out > -1e-6)
    j = np.stack([np.ones(6), -np.ones(6)])
    np.testing.assert_allclose(_once("fairgrad", j, jnp.float64), 0.0, atol=1e-6)
    # non-finite gradients give NaN
    assert np.all(np.isnan(_once("fairgrad", np.where(np.eye(3, 6) > 0, np.inf, 1.0), jnp.float64)))


# ----------------------------------------------------------------------------------------------------------------
# ConFIG


def _config_ref(j: np.ndarray, pref=None) -> np.ndarray:
    """TorchJD's ConFIG in float64 NumPy: ``pinv(U) p`` normalised, times the sum of projections."""
    n = np.linalg.norm(j, axis=1, keepdims=True)
    u = np.divide(j, n, out=np.zeros_like(j), where=n > 0)
    best = np.linalg.pinv(u) @ (np.ones(len(j)) if pref is None else pref)
    nb = np.linalg.norm(best)
    if nb == 0:
        return np.zeros(j.shape[1])
    unit = best / nb
    return np.sum(j @ unit) * unit


@pytest.mark.parametrize("kind, t", HARD + [("wide", 5), ("wide", 16)])
def test_config_matches_the_pinv_reference_on_hard_inputs(x64, kind, t):
    d = 3 if kind == "wide" else max(2 * t, 6)
    j = _hard(kind, t, d, seed=100 + t)
    if kind == "wide":
        j = np.concatenate([j, np.zeros((t, 3))], 1)  # the tree needs d >= 4 columns; rank stays 3 < T
    ref = _config_ref(j)
    out = _once("config_grad", j, jnp.float64)
    np.testing.assert_allclose(out, ref, rtol=1e-7, atol=1e-7 * np.abs(ref).max())


@pytest.mark.parametrize("kind, t", [("scaled", 3), ("scaled", 16), ("near_duplicate", 4), ("zero_task", 8)])
def test_config_float32_matches_the_float64_reference(kind, t):
    j = _hard(kind, t, 2 * t + 4, seed=200 + t)
    if kind == "near_duplicate":  # the float32 Gramian's rounding limits the accuracy to ~1e-7 / lambda_min(cosines)
        j[1::2] = j[0::2] * 2.0 + 0.3 * np.random.default_rng(0).normal(size=j[1::2].shape)
    ref = _config_ref(j)
    out = _once("config_grad", j, jnp.float32)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@given(hnp.arrays(np.float32, st.tuples(st.integers(2, 5), st.just(8)), elements=st.floats(-10, 10, width=32)))
def test_config_is_conflict_free(j):
    """For linearly independent gradients every task improves: ``J d >= 0`` (and > 0), the update's projections on
    the unit gradients are equal (all-ones preference)."""
    j64 = j.astype(np.float64)
    n = np.linalg.norm(j64, axis=1)
    if n.min() < 1e-2 or np.linalg.svd(j64 / n[:, None], compute_uv=False)[-1] < 0.1:
        return
    out = _once("config_grad", j)
    proj = (j64 @ out) / n
    assert np.all(proj > 0)
    np.testing.assert_allclose(proj, proj.mean(), rtol=1e-3)
    np.testing.assert_allclose(out, _config_ref(j64), rtol=1e-3, atol=1e-3 * np.abs(out).max())


def test_config_preference_single_task_and_zero_gradients(x64):
    rng = np.random.default_rng(3)
    j = rng.normal(size=(3, 7))
    pref = np.array([1.0, 2.0, 0.5])
    tx = mtl.config_grad(preference=pref)
    out, _ = tx.update(_tree(j), tx.init(None))
    np.testing.assert_allclose(_flat(out), _config_ref(j, pref), rtol=1e-10)
    np.testing.assert_allclose(_once("config_grad", j[:1]), j[0], rtol=1e-12)  # T = 1 gives g
    assert np.all(_once("config_grad", np.zeros((3, 7))) == 0.0)
    with pytest.raises(ValueError, match="preference"):
        mtl.config_grad(preference=np.ones(2)).update(_tree(j), optax.EmptyState())
    with pytest.raises(ValueError, match="rtol"):
        config_grad_weighting(rtol=-1.0)
