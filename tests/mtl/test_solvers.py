"""JAX solvers against scipy.optimize references, KKT conditions and closed forms; jit/vmap; degenerate input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.optimize import minimize

from corrjax.mtl import solvers

FLOATS = st.floats(-5, 5, allow_nan=False, width=32)


def _slsqp_simplex(obj, t, x0=None):
    cons = [{"type": "eq", "fun": lambda w: np.sum(w) - 1.0}]
    x0 = np.full(t, 1.0 / t) if x0 is None else x0
    r = minimize(
        obj, x0, bounds=[(0, 1)] * t, constraints=cons, method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000}
    )
    return r.x


_proj = jax.jit(solvers.project_simplex)


@given(hnp.arrays(np.float32, st.integers(1, 6), elements=FLOATS))
def test_project_simplex_kkt(v):
    w = np.asarray(_proj(v), np.float64)
    assert np.all(w >= 0) and np.isclose(w.sum(), 1.0, atol=1e-5)
    # w = max(v - theta, 0) for one threshold theta: every positive coordinate has the same shift
    pos = w > 1e-7
    shift = v[pos] - w[pos]
    np.testing.assert_allclose(shift, shift[0], atol=1e-5)
    assert np.all(v[~pos] <= shift[0] + 1e-5)


def test_project_simplex_large_offsets():
    """Large entries must not cancel in the cumulative sums: the projection is shift-invariant."""
    cases = [
        ([1e8, 0.0], [1.0, 0.0]),
        ([1e6, 1e6 + 0.5], [0.25, 0.75]),
        ([-1e6, -1e6 + 2.0, -2e6], [0.0, 1.0, 0.0]),
        ([1e30, 1e30], [0.5, 0.5]),
    ]
    for v, expected in cases:
        w = np.asarray(_proj(np.asarray(v, np.float32)))
        np.testing.assert_allclose(w, expected, atol=1e-6, err_msg=str(v))


_mn_as = jax.jit(solvers.min_norm_simplex)
_mn_fw = jax.jit(lambda g: solvers.min_norm_simplex(g, method="frank_wolfe", max_iter=2000, tol=1e-9))


@settings(max_examples=25)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 8)), elements=FLOATS))
def test_min_norm_matches_scipy(j):
    j64 = j.astype(np.float64)
    g64 = j64 @ j64.T
    t = len(j)
    w_ref = _slsqp_simplex(lambda w: w @ g64 @ w, t)
    d_ref = j64.T @ w_ref
    scale = max(np.abs(j64).max(), 1e-3)
    w = np.asarray(_mn_as(jnp.asarray(g64, jnp.float32)), np.float64)
    assert np.all(w >= -1e-7) and np.isclose(w.sum(), 1.0, atol=1e-5)
    # the min-norm point is unique (the weights need not be)
    np.testing.assert_allclose(j64.T @ w, d_ref, atol=2e-3 * scale)
    assert w @ g64 @ w <= w_ref @ g64 @ w_ref + 1e-4 * scale**2


def test_frank_wolfe_converges_to_active_set():
    rng = np.random.default_rng(0)
    for t in (2, 3, 5):
        j = rng.normal(size=(t, 6))
        g = jnp.asarray(j @ j.T, jnp.float32)
        w_as, w_fw = np.asarray(_mn_as(g)), np.asarray(_mn_fw(g))
        f_as, f_fw = w_as @ np.asarray(g) @ w_as, w_fw @ np.asarray(g) @ w_fw
        assert f_fw >= f_as - 1e-5 and f_fw <= f_as + 1e-3 * np.trace(np.asarray(g))
        np.testing.assert_allclose(w_fw.sum(), 1.0, atol=1e-5)


def _lbfgsb_nonneg(q_mat, q_vec):
    r = minimize(
        lambda x: 0.5 * x @ q_mat @ x + q_vec @ x,
        np.ones(len(q_vec)),
        jac=lambda x: q_mat @ x + q_vec,
        bounds=[(0, None)] * len(q_vec),
        method="L-BFGS-B",
        options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10_000},
    )
    return r.x


@pytest.mark.parametrize("method", ["block_pivoting", "active_set"])
def test_nonneg_qp_matches_scipy(x64, method):
    rng = np.random.default_rng(1)
    qp = jax.jit(lambda q, c: solvers.nonneg_qp(q, c, method=method))
    for t in (1, 2, 4, 7, 16, 32):
        a = rng.normal(size=(t, t + 2))
        q_mat, q_vec = a @ a.T + 1e-3 * np.eye(t), rng.normal(size=t)
        v = np.asarray(qp(q_mat, q_vec))
        np.testing.assert_allclose(v, _lbfgsb_nonneg(q_mat, q_vec), atol=1e-5)
        grad = q_mat @ v + q_vec
        assert np.all(v >= 0) and np.all(grad >= -1e-8) and abs(v @ grad) < 1e-8  # KKT
        assert 0 < np.sum(v > 0) < t or t <= 2  # a mix of free and bound coordinates


def _plain_block_exchange_cycles(q_mat, q_vec, max_iter=50):
    """Block principal pivoting without the safeguard: switch every violating coordinate at once. True if the
    partitions repeat before the KKT conditions hold."""
    free, seen = np.zeros(len(q_vec), bool), set()
    for _ in range(max_iter):
        v = np.zeros(len(q_vec))
        v[free] = np.linalg.solve(q_mat[np.ix_(free, free)], -q_vec[free])
        bad = np.where(free, v < -1e-12, q_mat @ v + q_vec < -1e-12)
        if not bad.any():
            return False
        if tuple(free) in seen:
            return True
        seen.add(tuple(free))
        free = free ^ bad
    return True


def test_block_pivoting_safeguard_breaks_a_cycle(x64):
    # Found by search: plain block exchanges cycle on this positive-definite problem; the Kim-Park safeguard
    # (single exchanges by Murty's rule once the violations stop falling) must still reach the KKT point.
    q_mat = np.array(
        [
            [9733.7, 302.32, -750.40, -114.13],
            [302.32, 11.485, -47.921, -3.8275],
            [-750.40, -47.921, 392.46, -13.457],
            [-114.13, -3.8275, -13.457, 25.622],
        ]
    )
    q_vec = np.array([-0.71813, -0.13829, 1.3943, 0.71457])
    assert np.linalg.eigvalsh(q_mat).min() > 0.1 and _plain_block_exchange_cycles(q_mat, q_vec)
    v = np.asarray(jax.jit(solvers.nonneg_qp)(q_mat, q_vec))
    grad = q_mat @ v + q_vec
    assert np.all(v >= 0) and np.all(grad >= -1e-9) and abs(v @ grad) < 1e-9
    np.testing.assert_allclose(v, np.asarray(solvers.nonneg_qp(q_mat, q_vec, method="active_set")), atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 24),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["generic", "duplicates", "scales", "rank_one"]),
)
def test_block_pivoting_and_active_set_agree(t, seed, kind):
    """Both methods meet the KKT conditions to the documented tolerance on the Gramian-shaped problems the
    aggregators pose (trace-normalised, ridged; duplicated, wildly scaled or rank-one gradients), and their objectives
    agree within the duality gaps that their KKT residuals certify."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(t, int(rng.integers(1, 2 * t + 2))))
    if kind == "duplicates":
        a[: max(1, t // 2)] = a[0]
    elif kind == "scales":
        a = a * np.exp(2.0 * rng.normal(size=(t, 1)))
    elif kind == "rank_one":
        a = np.outer(rng.normal(size=t), rng.normal(size=5))
    q_mat = a @ a.T / np.trace(a @ a.T) + 1e-4 * np.eye(t)
    q_vec = q_mat @ np.eye(t)[rng.integers(t)] if rng.random() < 0.5 else rng.normal(size=t)
    scale = max(np.abs(np.diag(q_mat)).max(), np.abs(q_vec).max())
    objective, gap = [], []
    with jax.enable_x64(True):
        for method in ("block_pivoting", "active_set"):
            v = np.asarray(solvers.nonneg_qp(q_mat, q_vec, method=method))
            grad = q_mat @ v + q_vec
            assert (
                np.all(v >= 0) and grad.min() >= -1e-6 * scale and abs(v @ grad) <= 1e-9 * scale * max(1.0, v.max())
            ), method
            # Lagrange multipliers max(grad, 0) give the dual bound f* >= f(v) - gap.
            neg = np.minimum(grad, 0.0)
            gap.append(v @ np.maximum(grad, 0.0) + 0.5 * neg @ np.linalg.solve(q_mat, neg))
            objective.append(0.5 * v @ q_mat @ v + q_vec @ v)
    assert abs(objective[0] - objective[1]) <= gap[0] + gap[1] + 1e-15


_proj_exact = jax.jit(lambda g, u: solvers.project_dual_cone(g, u, reg_eps=1e-10))


@settings(max_examples=10)
@given(hnp.arrays(np.float64, st.tuples(st.integers(2, 4), st.integers(2, 6)), elements=st.floats(-5, 5)))
def test_dual_cone_projection_matches_scipy(j):
    with jax.enable_x64(True):
        g = j @ j.T
        if np.trace(g) < 1e-3:
            return
        t = len(j)
        for i in range(t):
            u = np.eye(t)[i]
            v = np.asarray(_proj_exact(g, u))
            # KKT of min v^T G v, v >= u: G v >= 0 (d = J^T v in the dual cone) and complementarity
            gv = g @ v
            tr = np.trace(g)
            assert np.all(v >= u - 1e-12)
            assert np.all(gv >= -1e-6 * tr * max(1.0, np.abs(v).max()))
            assert abs((v - u) @ gv) <= 1e-6 * tr * max(1.0, np.abs(v).max()) ** 2
            cons = [{"type": "ineq", "fun": lambda x: x - u}]
            r = minimize(
                lambda x: x @ g @ x,
                u,
                jac=lambda x: 2 * g @ x,
                constraints=cons,
                method="SLSQP",
                options={"ftol": 1e-15, "maxiter": 1000},
            )
            np.testing.assert_allclose(j.T @ v, j.T @ r.x, atol=1e-4 * np.sqrt(tr) * max(1.0, np.abs(r.x).max()))


_nash = jax.jit(lambda g: solvers.nash_bargaining(g, reg_eps=0.0))
_dual = jax.jit(solvers.project_dual_cone)


def test_nash_bargaining_orthogonal_and_residual():
    norms = np.array([0.5, 2.0, 7.0])
    g = np.diag(norms**2).astype(np.float32)
    np.testing.assert_allclose(_nash(g), 1.0 / norms, rtol=1e-4)
    rng = np.random.default_rng(2)
    j = rng.normal(size=(4, 9))
    g = j @ j.T
    a = np.asarray(_nash(jnp.asarray(g, jnp.float32)), np.float64)
    assert np.all(a > 0)
    np.testing.assert_allclose(g @ a, 1.0 / a, rtol=2e-3)
    # scale equivariance alpha(cG) = alpha(G) / sqrt(c)
    a2 = np.asarray(_nash(jnp.asarray(100.0 * g, jnp.float32)))
    np.testing.assert_allclose(a2, a / 10.0, rtol=1e-4)
    # identical gradients: alpha_i = 1 / (|g| sqrt(T)); a zero gradient is taken out with alpha = 0
    np.testing.assert_allclose(_nash(jnp.full((4, 4), 9.0)), np.full(4, 1 / 6), rtol=1e-4)
    a0 = np.asarray(_nash(jnp.diag(jnp.array([4.0, 0.0, 1.0]))))
    np.testing.assert_allclose(a0, [0.5, 0.0, 1.0], rtol=1e-4)


def test_vmap_batch_and_nan():
    rng = np.random.default_rng(3)
    js = rng.normal(size=(5, 3, 4)).astype(np.float32)
    gs = jnp.asarray(np.einsum("btp,bsp->bts", js, js))
    batched = jax.jit(jax.vmap(solvers.min_norm_simplex))(gs)
    for b in range(5):
        np.testing.assert_allclose(batched[b], _mn_as(gs[b]), atol=1e-5)
    bad = gs[0].at[0, 0].set(jnp.nan)
    assert np.all(np.isnan(_mn_as(bad)))
    assert np.all(np.isnan(_nash(bad)))
    # opposite gradients (Pareto-stationary): no solution; the default ridge keeps alpha finite, |d|^2 <= T
    opp = jnp.array([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    a = np.asarray(jax.jit(solvers.nash_bargaining)(opp * 4.0))
    assert np.all(np.isfinite(a)) and a @ np.asarray(opp * 4.0) @ a <= 3.0 + 1e-3
    assert np.all(np.isnan(_dual(bad, jnp.ones(3) / 3)))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="gramian"):
        solvers.min_norm_simplex(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="method"):
        solvers.min_norm_simplex(jnp.eye(2), method="cvxpy")
    with pytest.raises(ValueError, match="`u`"):
        solvers.project_dual_cone(jnp.eye(3), jnp.ones(2))
    with pytest.raises(ValueError, match="q_vec"):
        solvers.nonneg_qp(jnp.eye(3), jnp.ones(4))
    with pytest.raises(ValueError, match="method"):
        solvers.nonneg_qp(jnp.eye(3), jnp.ones(3), method="quadprog")
    with pytest.raises(ValueError, match="qp_method"):
        solvers.project_dual_cone(jnp.eye(3), jnp.ones(3), qp_method="quadprog")
    with pytest.raises(ValueError, match="qp_method"):
        solvers.min_norm_simplex(jnp.eye(3), qp_method="cvxpy")


def test_dual_cone_ridge_is_relative_to_the_trace(x64):
    """reg_eps ridges the trace-normalised Gramian: v solves min v^T (G / trace(G) + reg_eps I) v s.t. v >= u, hence
    G v >= -reg_eps trace(G) v (checked with a ridge large enough to move the answer)."""
    rng = np.random.default_rng(4)
    j = rng.normal(size=(4, 6)) * np.array([[0.5], [1.0], [3.0], [2.0]])
    g = j @ j.T
    tr = np.trace(g)
    for u in (np.full(4, 0.25), np.eye(4)[2], np.array([0.1, 0.5, 0.2, 0.2])):
        v = np.asarray(solvers.project_dual_cone(g, u, reg_eps=0.05))
        q = g / tr + 0.05 * np.eye(4)
        cons = [{"type": "ineq", "fun": lambda x, u=u: x - u, "jac": lambda x: np.eye(4)}]
        ref = minimize(
            lambda x, q=q: x @ q @ x,
            u + 1.0,
            jac=lambda x, q=q: 2 * q @ x,
            constraints=cons,
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 1000},
        ).x
        np.testing.assert_allclose(v, ref, rtol=1e-5, atol=1e-6)
        assert np.all(g @ v >= -0.05 * tr * v - 1e-9)


def test_frank_wolfe_line_search_is_exact():
    """Two tasks: from the uniform weights the min-norm point lies on the segment towards the better vertex, so one
    Frank-Wolfe step with MGDA-UB's exact line search lands on the closed form
    w_1 = clip((g_2 - g_1) . g_2 / |g_1 - g_2|^2, 0, 1) (Sener & Koltun, Algorithm 1)."""
    rng = np.random.default_rng(5)
    one_step = jax.jit(lambda g: solvers.min_norm_simplex(g, method="frank_wolfe", max_iter=1))
    for _ in range(5):
        j = rng.normal(size=(2, 6))
        j[1] += 0.7 * j[0]
        g = j @ j.T
        w1 = np.clip((g[1, 1] - g[0, 1]) / (g[0, 0] - 2 * g[0, 1] + g[1, 1]), 0.0, 1.0)
        np.testing.assert_allclose(one_step(jnp.asarray(g, jnp.float32)), [w1, 1 - w1], atol=1e-5)


def test_active_set_step_stops_at_the_first_blocking_coordinate(x64):
    # Found by search (a trace-normalised, ridged Gramian-shaped problem with a large solution): jumping straight to
    # the infeasible unconstrained minimiser instead of stepping to the first coordinate that hits zero (Lawson &
    # Hanson's ratio test) ends far from the KKT point here.
    q_mat = np.array(
        [
            [0.104175, -0.059763, 0.024255, -0.063484, -0.075001, -0.009838, 0.00263, 0.003822],
            [-0.059763, 0.22361, 0.034356, -0.163245, 0.210632, 0.059364, 0.010986, -0.028093],
            [0.024255, 0.034356, 0.029144, -0.059429, 0.052434, 0.003584, -0.015776, 0.005256],
            [-0.063484, -0.163245, -0.059429, 0.287834, -0.095812, -0.058747, -0.027143, 0.041584],
            [-0.075001, 0.210632, 0.052434, -0.095812, 0.280454, 0.033414, -0.039504, 0.007114],
            [-0.009838, 0.059364, 0.003584, -0.058747, 0.033414, 0.02219, 0.01727, -0.016542],
            [0.00263, 0.010986, -0.015776, -0.027143, -0.039504, 0.01727, 0.035659, -0.021367],
            [0.003822, -0.028093, 0.005256, 0.041584, 0.007114, -0.016542, -0.021367, 0.017733],
        ]
    )
    q_vec = np.array([1.773012, -0.831062, 0.625162, -0.135775, -0.571713, -1.187073, -1.588049, 0.995786])
    assert np.linalg.eigvalsh(q_mat).min() > 5e-5
    scale = max(np.abs(np.diag(q_mat)).max(), np.abs(q_vec).max())
    sols = []
    for method in ("active_set", "block_pivoting"):
        v = np.asarray(solvers.nonneg_qp(q_mat, q_vec, method=method))
        grad = q_mat @ v + q_vec
        assert np.all(v >= 0) and grad.min() >= -1e-6 * scale and abs(v @ grad) <= 1e-9 * scale * v.max(), method
        sols.append(v)
    np.testing.assert_allclose(sols[0], sols[1], rtol=1e-6, atol=1e-9)
