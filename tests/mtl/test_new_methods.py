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
    (1 for orthogonal gradients), damped by ``1 / (1 + lambda)`` and halved until ``phi`` decreases far away, run
    to a Newton decrement of 1e-30; the
    residual is certified at the rounding floor. Zero rows get 0."""
    live = np.diag(g) > 0
    gl = g[np.ix_(live, live)]
    s = np.sqrt(np.diag(gl)) ** (-2 * alpha / (alpha + 1))
    a = gl * np.outer(s, s)
    p = 1 - 1 / alpha
    h = np.log if p == 0 else (lambda w: (w**p - 1) / p)

    def phi(b):
        return 0.5 * b @ a @ b - np.sum(h(s * b))

    b = np.ones(len(gl))
    for _ in range(200):
        w = s * b
        grad = a @ b - s * w ** (-1 / alpha)
        db = np.linalg.solve(a + np.diag(s**2 * w ** (-1 / alpha - 1) / alpha), -grad)
        lam2 = -grad @ db
        t = 1.0 if lam2 < 0.01 else 1.0 / (1.0 + np.sqrt(lam2))
        while np.any(b + t * db <= 0):
            t /= 2
        while lam2 > 1e-12 and phi(b + t * db) > phi(b):  # far from the solution: phi must decrease
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


_FAIR = jax.jit(fair_allocation)  # alpha traced: one compilation per T and dtype


@pytest.mark.parametrize("kind, t", [*HARD, ("wide", 5), ("wide", 16)])
def test_fairgrad_matches_the_exact_solution_on_hard_inputs(x64, kind, t):
    d = 3 if kind == "wide" else max(2 * t, 6)
    j = _hard(kind, t, d, seed=t)
    g = j @ j.T
    for alpha in (0.5, 1.0, 2.0):
        ref = _fairgrad_ref(g, alpha)
        w = np.asarray(_FAIR(jnp.asarray(g), alpha))
        np.testing.assert_allclose(w, ref, rtol=1e-7, atol=0)
        if kind == "zero_task":
            assert w[t // 2] == 0.0


@pytest.mark.parametrize("kind, t", [("scaled", 3), ("scaled", 8), ("near_duplicate", 4), ("zero_task", 8)])
def test_fairgrad_float32_update_matches_the_float64_reference(kind, t):
    j = _hard(kind, t, 2 * t + 4, seed=10 + t)
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
    solve = _FAIR
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
        w = np.asarray(_FAIR(jnp.asarray(j @ j.T), alpha))
        np.testing.assert_allclose(w, np.array([1e-3, 1.0, 1e3]) ** (-2 * alpha / (alpha + 1)), rtol=1e-12)
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


@pytest.mark.parametrize("kind, t", [*HARD, ("wide", 5), ("wide", 16)])
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
    out, _ = jax.jit(tx.update)(_tree(j), tx.init(None))
    np.testing.assert_allclose(_flat(out), _config_ref(j, pref), rtol=1e-10)
    np.testing.assert_allclose(_once("config_grad", j[:1]), j[0], rtol=1e-12)  # T = 1 gives g
    assert np.all(_once("config_grad", np.zeros((3, 7))) == 0.0)
    with pytest.raises(ValueError, match="preference"):
        mtl.config_grad(preference=np.ones(2)).update(_tree(j), optax.EmptyState())
    with pytest.raises(ValueError, match="rtol"):
        config_grad_weighting(rtol=-1.0)


# ----------------------------------------------------------------------------------------------------------------
# Stateful methods: NumPy float64 references of LibMTL's code, step by step.

T = 3
SHAPES = {"a": (4,), "b": (2, 3)}


def _params(dtype=jnp.float32):
    return {k: jnp.zeros(s, dtype) for k, s in SHAPES.items()}


def _grads(rng, t=T, scales=None):
    scales = np.ones(t) if scales is None else np.asarray(scales)
    return {k: (scales.reshape(-1, *([1] * len(s))) * rng.normal(size=(t, *s))) for k, s in SHAPES.items()}


def _mat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(tree[k], np.float64).reshape(tree[k].shape[0], -1) for k in sorted(tree)], 1)


def _vec(tree) -> np.ndarray:
    return np.concatenate([np.asarray(tree[k], np.float64).reshape(-1) for k in sorted(tree)])


def _steps(tx, n=5, seed=0, scales=None, losses_scale=1.0, dtype=jnp.float64):
    """Runs ``tx`` jitted for ``n`` steps; returns [(J (T, P), losses (T,), out (P,), state)] in float64."""
    rng = np.random.default_rng(seed)
    upd = jax.jit(tx.update)
    state = tx.init(_params(dtype))
    seen = []
    for _ in range(n):
        g = _grads(rng, scales=scales)
        losses = losses_scale * rng.uniform(0.1, 3.0, size=T)
        out, state = upd({k: jnp.asarray(v, dtype) for k, v in g.items()}, state, None, task_losses=jnp.asarray(losses))
        seen.append((_mat(g), losses, _vec(out), state))
    return seen


def _sdmgrad_ref(jacs, lamda, niter, lr=5.0, momentum=0.5):
    """LibMTL's SDMGrad with the same gradients for zeta, xi1 and xi2 (scale divided exactly)."""
    t = jacs[0].shape[0]
    w = np.ones(t) / t
    outs = []
    for j in jacs:
        gg = j @ j.T
        gg = gg / np.mean(np.sqrt(np.diag(gg))) ** 2
        gm = gg.mean(1)
        buf = None
        for _ in range(niter):
            grad = gg @ w + lamda * gm
            buf = grad if buf is None else momentum * buf + grad
            v = w - lr * buf
            u = np.sort(v)[::-1]
            css = np.cumsum(u)
            rho = np.nonzero(u * np.arange(1, t + 1) > (css - 1))[0][-1]
            w = np.maximum(v - (css[rho] - 1) / (rho + 1), 0)
        outs.append(((w @ j) + lamda * j.mean(0)) / (1 + lamda))
    return outs


@pytest.mark.parametrize("lamda, niter", [(0.3, 20), (0.0, 5), (2.0, 1)])
def test_sdmgrad_matches_libmtls_iterations(x64, lamda, niter):
    seen = _steps(mtl.sdmgrad(T, lamda, niter), scales=[1e-3, 1.0, 1e2])
    ref = _sdmgrad_ref([s[0] for s in seen], lamda, niter)
    for (_, _, out, _), r in zip(seen, ref, strict=True):
        np.testing.assert_allclose(out, r, rtol=1e-9, atol=1e-12 * np.abs(r).max())


def test_sdmgrad_converges_to_the_regularised_min_norm_point(x64):
    """Many small steps reach the QP optimum ``min_{w in simplex} |J^T w + lamda g0|^2`` (SLSQP to 1e-14)."""
    rng = np.random.default_rng(5)
    j = rng.normal(size=(4, 7)) * np.array([[0.1], [1.0], [3.0], [1.0]])
    lamda = 0.5
    gg = j @ j.T / np.mean(np.linalg.norm(j, axis=1)) ** 2
    obj = lambda w: 0.5 * np.sum((w @ j + lamda * j.mean(0)) ** 2)
    res = minimize(
        obj,
        np.ones(4) / 4,
        method="SLSQP",
        bounds=[(0, None)] * 4,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
        options={"ftol": 1e-16, "maxiter": 500},
    )
    weighting = sdmgrad_weighting(4, lamda, 3000, learning_rate=0.5 / np.linalg.eigvalsh(gg)[-1], momentum=0.0)
    w, state = jax.jit(weighting.update, static_argnums=2)(jnp.asarray(j @ j.T), weighting.init(), 4)
    np.testing.assert_allclose(np.asarray(state.simplex_weights), res.x, atol=1e-6)
    np.testing.assert_allclose(np.asarray(w), (res.x + lamda / 4) / (1 + lamda), atol=1e-6)
    # scale-free: the same weights for the Jacobian scaled by 1e-6 (LibMTL's +1e-8 would change them)
    w_small, _ = jax.jit(weighting.update, static_argnums=2)(jnp.asarray(1e-12 * (j @ j.T)), weighting.init(), 4)
    np.testing.assert_allclose(np.asarray(w_small), np.asarray(w), rtol=1e-10)


def _moco_ref(seen, beta=0.5, gamma=0.1, rho=0.0, beta_sigma=0.5, gamma_sigma=0.5):
    y = np.zeros_like(seen[0][0])
    lam = np.ones(T) / T
    outs, lams = [], []
    for k, (j, losses, _, _) in enumerate(seen, start=1):
        h = j / (np.linalg.norm(j, axis=1, keepdims=True) + 1e-8) * losses[:, None]
        y = y - beta / k**beta_sigma * (y - h)
        z = lam - gamma / k**gamma_sigma * (y @ y.T + rho * np.eye(T)) @ lam
        lam = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        outs.append(y.T @ lam)
        lams.append(lam)
    return outs, lams


@pytest.mark.parametrize("kw", [{}, {"beta": 0.9, "gamma": 0.5, "rho": 0.1, "beta_sigma": 0.0, "gamma_sigma": 1.0}])
def test_moco_matches_libmtls_updates(x64, kw):
    seen = _steps(mtl.moco(T, **kw), scales=[1e-3, 1.0, 10.0])
    outs, lams = _moco_ref(seen, **kw)
    for (_, _, out, state), r, lam in zip(seen, outs, lams, strict=True):
        np.testing.assert_allclose(out, r, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(np.asarray(state.weights), lam, rtol=1e-10)
    assert int(seen[-1][3].count) == len(seen)


def _db_mtl_ref(seen, beta=0.9, beta_sigma=0.0):
    buf = np.zeros_like(seen[0][0])
    outs = []
    for k, (j, losses, _, _) in enumerate(seen, start=1):
        gl = j / (losses[:, None] + 1e-8)
        buf = gl + beta / k**beta_sigma * (buf - gl)
        u = np.linalg.norm(buf, axis=1)
        outs.append((u.max() / u) @ buf)
    return outs


@pytest.mark.parametrize("beta, beta_sigma", [(0.9, 0.0), (0.5, 0.5)])
def test_db_mtl_matches_libmtls_updates(x64, beta, beta_sigma):
    seen = _steps(mtl.db_mtl(T, beta, beta_sigma), scales=[1e-6, 1.0, 1e6])
    for (_, _, out, _), r in zip(seen, _db_mtl_ref(seen, beta, beta_sigma), strict=True):
        np.testing.assert_allclose(out, r, rtol=1e-10, atol=1e-10 * np.abs(r).max())


def test_db_mtl_balances_every_task_to_the_largest_magnitude(x64):
    """Every task contributes a vector of the largest norm, whatever its loss or gradient scale; a zero task adds 0."""
    seen = _steps(mtl.db_mtl(T, beta=0.0), n=1, scales=[1e-6, 1.0, 1e6], losses_scale=1e3)
    j, losses, out, state = seen[0]
    gl = j / (losses[:, None] + 1e-8)
    n = np.linalg.norm(gl, axis=1)
    np.testing.assert_allclose(out, (gl / n[:, None]).sum(0) * n.max(), rtol=1e-10)
    tx = mtl.db_mtl(T)
    g = {k: jnp.asarray(v).at[1].set(0.0) for k, v in _grads(np.random.default_rng(1)).items()}
    out, state = tx.update(g, tx.init(_params(jnp.float64)), task_losses=jnp.ones(T))
    assert np.isfinite(_vec(out)).all() and float(state.weights[1]) == 0.0


def _excess_ref(seen, step=1e-2):
    acc = np.zeros_like(seen[0][0])
    lw = np.ones(T)
    init = None
    outs = []
    for j, _, _, _ in seen:
        acc = acc + j**2
        w = np.sum(j**2 / np.sqrt(acc + 1e-7), axis=1)
        if init is None:
            init = w
        else:
            lw = lw * np.exp(w / init * step)
            lw = lw / lw.sum() * T
        outs.append(lw @ j)
    return outs


@pytest.mark.parametrize("step", [1e-2, 3.0])
def test_excess_mtl_matches_the_authors_updates(x64, step):
    seen = _steps(mtl.excess_mtl(T, step), n=6, scales=[1e-2, 1.0, 5.0])
    for (_, _, out, _), r in zip(seen, _excess_ref(seen, step), strict=True):
        np.testing.assert_allclose(out, r, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(float(np.sum(seen[-1][3].weights)), T, rtol=1e-12)


def _stch_ref(losses_seq, mu, warmup, average, log=True):
    ref = np.ones(T) if log else np.zeros(T)
    acc, n = np.zeros(T), 0
    out = []
    for k, losses in enumerate(losses_seq):
        if k < warmup:
            out.append(1 / (losses + 1e-20) if log else np.ones(T))
            if k >= warmup - average:
                acc, n = acc + losses, n + 1
            if k == warmup - 1:
                ref = acc / n
            continue

        def objective(l):  # noqa: E741
            f = jnp.log(l / ref + 1e-20) if log else l - ref
            return mu * jax.scipy.special.logsumexp(f / mu) * T

        with jax.enable_x64(True):
            out.append(np.asarray(jax.grad(objective)(jnp.asarray(losses, jnp.float64))))
    return out


@pytest.mark.parametrize("mu, warmup, average, log", [(1.0, 3, 2, True), (0.1, 0, None, True), (0.5, 2, None, False)])
def test_stch_weights_are_the_gradient_of_the_smooth_tchebycheff_loss(x64, mu, warmup, average, log):
    tx = mtl.stch(T, mu, warmup_steps=warmup, average_steps=average, log_transform=log)
    seen = _steps(tx, n=6, losses_scale=1e2)
    ref = _stch_ref([s[1] for s in seen], mu, warmup, warmup if average is None else average, log)
    for (j, _, out, state), w in zip(seen, ref, strict=True):
        np.testing.assert_allclose(np.asarray(state.weights), w, rtol=1e-10)
        np.testing.assert_allclose(out, w @ j, rtol=1e-10, atol=1e-12)


def test_stch_small_mu_puts_the_weight_on_the_worst_task(x64):
    tx = mtl.stch(T, 1e-3)
    _, state = tx.update(_grads(np.random.default_rng(0)), tx.init(None), task_losses=jnp.array([1.0, 5.0, 2.0]))
    np.testing.assert_allclose(np.asarray(state.weights), [0.0, T / 5.0, 0.0], atol=1e-12)


def _imtl_l_ref(seen, lr=1e-2):
    s = np.zeros(T)
    outs, scales = [], []
    for j, losses, _, _ in seen:
        w = np.exp(s)
        outs.append(w @ j)
        scales.append(w)
        s = s - lr * (w * losses - 1)
    return outs, scales


def test_imtl_l_matches_the_gradient_of_the_scaled_losses(x64):
    seen = _steps(mtl.imtl_l(T, 0.1), n=5)
    outs, _ = _imtl_l_ref(seen, 0.1)
    for (_, _, out, _), r in zip(seen, outs, strict=True):
        np.testing.assert_allclose(out, r, rtol=1e-12)
    # the scales' fixed point: e^s L = 1
    tx = mtl.imtl_l(T, 0.5)
    state = tx.init(None)
    g = _grads(np.random.default_rng(0))
    losses = jnp.array([0.01, 1.0, 50.0])
    upd = jax.jit(tx.update)
    for _ in range(200):
        _, state = upd(g, state, task_losses=losses)
    np.testing.assert_allclose(np.exp(np.asarray(state.log_scales)) * np.asarray(losses), 1.0, rtol=1e-6)


def test_imtl_is_imtl_g_on_the_scaled_gradients(x64):
    seen = _steps(mtl.imtl(T, 0.1), n=4, scales=[1e-2, 1.0, 1e2])
    _, scales = _imtl_l_ref(seen, 0.1)
    for (j, _, out, _), sc in zip(seen, scales, strict=True):
        js = sc[:, None] * j
        # IMTL-G's closed form (Liu et al. 2021): a_{2:T} = g_1 U^T (D U^T)^{-1}, a_1 = 1 - sum a_{2:T}
        u = js / np.linalg.norm(js, axis=1, keepdims=True)
        dd, uu = js[0] - js[1:], u[0] - u[1:]
        a = js[0] @ uu.T @ np.linalg.inv(dd @ uu.T)
        ref = np.concatenate([[1 - a.sum()], a]) @ js
        np.testing.assert_allclose(out, ref, rtol=1e-7, atol=1e-9 * np.abs(ref).max())


# ----------------------------------------------------------------------------------------------------------------
# Optax plumbing shared by all nine.

ALL = {
    "fairgrad": ((), {"alpha": 2.0}),
    "config_grad": ((), {}),
    "sdmgrad": ((T,), {}),
    "moco": ((T,), {}),
    "db_mtl": ((T,), {}),
    "excess_mtl": ((T,), {}),
    "stch": ((T,), {"warmup_steps": 1}),
    "imtl_l": ((T,), {}),
    "imtl": ((T,), {}),
}
STATIC = {"fairgrad": (), "config_grad": ()}


@pytest.mark.parametrize("name", sorted(ALL))
def test_chain_adam_jit_abstract_init_dtypes_and_plain_array_state(name):
    args, kw = ALL[name]
    tx = optax.chain(getattr(mtl, name)(*args, **kw), optax.adam(1e-2))
    params = {"a": jnp.zeros((4,), jnp.bfloat16), "b": jnp.zeros((2, 3), jnp.float32)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    state_shapes = jax.eval_shape(tx.init, abstract)
    state = tx.init(params)
    assert jax.tree.structure(state_shapes) == jax.tree.structure(state)
    rng = np.random.default_rng(0)
    g = {k: jnp.asarray(v, params[k].dtype) for k, v in _grads(rng).items()}
    upd = jax.jit(tx.update)
    for _ in range(3):
        out, state = upd(g, state, params, task_losses=jnp.array([0.5, 1.0, 2.0]))
    assert out["a"].dtype == jnp.bfloat16 and out["b"].dtype == jnp.float32
    assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(out))
    # states are plain arrays: np.asarray round-trips them (what an orbax/npz save needs)
    leaves = jax.tree.leaves(state)
    restored = jax.tree.unflatten(jax.tree.structure(state), [jnp.asarray(np.asarray(x)) for x in leaves])
    out2, _ = upd(g, restored, params, task_losses=jnp.array([0.5, 1.0, 2.0]))
    out3, _ = upd(g, state, params, task_losses=jnp.array([0.5, 1.0, 2.0]))
    for x, y in zip(jax.tree.leaves(out2), jax.tree.leaves(out3), strict=True):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    # non-finite task gradients are not hidden: they give NaN updates
    bad = {k: v.at[0].set(jnp.nan) for k, v in g.items()}
    out, _ = upd(bad, state, params, task_losses=jnp.array([0.5, 1.0, 2.0]))
    assert all(np.any(np.isnan(np.asarray(x, np.float32))) for x in jax.tree.leaves(out))


@pytest.mark.parametrize("name", sorted(ALL))
def test_inject_hyperparams(name):
    args, kw = ALL[name]
    static = ("num_tasks",) if args else ()
    kwargs = {"num_tasks": T, **kw} if args else kw
    tx = optax.inject_hyperparams(getattr(mtl, name), static_args=static)(**kwargs)
    state = tx.init(_params())
    out, state = jax.jit(tx.update)(_grads(np.random.default_rng(0)), state, _params(), task_losses=jnp.ones(T))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(out))


@pytest.mark.parametrize("name", sorted(n for n, (a, _) in ALL.items() if a))
def test_errors_name_the_argument(name):
    args, kw = ALL[name]
    with pytest.raises(ValueError, match="num_tasks"):
        getattr(mtl, name)(0, **kw)
    tx = getattr(mtl, name)(*args, **kw)
    two = {k: v[:2] for k, v in _grads(np.random.default_rng(0)).items()}
    with pytest.raises(ValueError, match=r"task axis|num_tasks"):
        tx.update(two, tx.init(_params()), task_losses=jnp.ones(2))
    if name in ("moco", "db_mtl", "excess_mtl"):
        with pytest.raises(ValueError, match=r"init\(params\)"):
            tx.init(None)
    if name not in ("sdmgrad", "excess_mtl"):  # these read no losses
        with pytest.raises(ValueError, match="task_losses"):
            tx.update(_grads(np.random.default_rng(0)), tx.init(_params()))


def test_hyperparameter_validation():
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="alpha"):
            mtl.fairgrad(alpha=bad)
        with pytest.raises(ValueError, match="mu"):
            mtl.stch(T, mu=bad)
    with pytest.raises(ValueError, match="niter"):
        mtl.sdmgrad(T, niter=-1)
    with pytest.raises(ValueError, match="warmup_steps"):
        mtl.stch(T, warmup_steps=1.5)
    with pytest.raises(ValueError, match="preference"):
        mtl.stch(T, preference=np.ones(2))


@pytest.mark.parametrize("name", sorted(ALL))
def test_zero_tasks_complex_and_integer_gradients_are_rejected(name):
    args, kw = ALL[name]
    tx = getattr(mtl, name)(*args, **kw)
    state = tx.init(_params())
    g = _grads(np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"T = 0|num_tasks"):
        tx.update({k: jnp.asarray(v[:0], jnp.float32) for k, v in g.items()}, state, task_losses=jnp.ones(T))
    for dtype in (jnp.complex64, jnp.int32):
        with pytest.raises(TypeError, match="real floating"):
            tx.update({k: jnp.asarray(v, dtype) for k, v in g.items()}, state, task_losses=jnp.ones(T))


def test_gramian_solvers_vmap_over_a_batch(x64):
    """A batch of Gramians through ``jax.vmap`` gives each member's own answer (the while loops run to the slowest)."""
    rng = np.random.default_rng(7)
    js = [_hard("scaled", 4, 8, seed=s) for s in range(3)] + [_hard("zero_task", 4, 8, seed=3)]
    gs = jnp.asarray(np.stack([j @ j.T for j in js]))
    alphas = jnp.asarray(rng.uniform(0.5, 3.0, size=len(js)))
    batched = np.asarray(jax.vmap(fair_allocation)(gs, alphas))
    for g, a, w in zip(gs, alphas, batched, strict=True):
        np.testing.assert_allclose(w, np.asarray(_FAIR(g, a)), rtol=1e-12)
        live = w > 0  # and each solves its system (weights here span 1e-20 .. 1e7)
        np.testing.assert_allclose((np.asarray(g) @ w)[live] * w[live] ** (1 / float(a)), 1.0, rtol=1e-9)
    weighting = config_grad_weighting()
    ws, _ = jax.vmap(lambda g: weighting.update(g, optax.EmptyState(), 4))(gs)
    for j, w in zip(js, np.asarray(ws), strict=True):
        np.testing.assert_allclose(w @ j, _config_ref(j), rtol=1e-7, atol=1e-7 * np.abs(_config_ref(j)).max())
