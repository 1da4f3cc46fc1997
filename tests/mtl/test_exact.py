"""The Gramian aggregators against exact float64 references on the hard classes of inputs (issue 16).

Classes (``_jacobian``): generic rows; norms 10^U(-6, 6) apart (ratios up to 1e12); near-duplicate tasks; a zero
task; more tasks than dimensions (``T > d``); points near Pareto stationarity (0 in the hull up to 1e-6). The
references are written in NumPy/SciPy from the Jacobian: the min-norm point as non-negative least squares
(``scipy.optimize.nnls`` on ``[J^T; 1^T] u = e``), the dual-cone QPs as NNLS on a Cholesky factor, Nash bargaining by
Newton to a 1e-15 residual, IMTL-G by an eigendecomposition pseudo-inverse, CAGrad by its duality gap (a primal point
in the ball and a dual simplex point whose values meet).

Errors of a direction ``d`` are measured as ``|d - d_ref| <= rtol |d_ref| + atol S`` with ``S = sum_i w_i |g_i|``
(the scale of the combination; from the Gramian, the rounding of ``G`` alone moves ``d`` by about ``eps S``), with
``rtol = atol = 1e-7`` in float64 and ``1e-4`` in float32 inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import nnls

import corrjax.mtl as mtl
from corrjax.mtl import solvers
from corrjax.mtl.aggregators import (
    dualproj_weighting,
    imtl_g_weighting,
    nash_mtl_weighting,
    upgrad_weighting,
)
from corrjax.mtl.aggregators.cagrad import cagrad_solve

TS = (2, 3, 5, 8, 16, pytest.param(32, marks=pytest.mark.slow))
TS_ALL = (2, 3, 5, 8, 16, 32)
KINDS = ("generic", "scales", "near_dup", "zero", "wide", "stationary")
TOL = {np.float64: 1e-7, np.float32: 1e-4}


def _jacobian(seed, t, kind, dup=1e-6):
    rng = np.random.default_rng(seed)
    d = max(1, t // 2) if kind == "wide" else t + 3
    j = rng.normal(size=(t, d))
    if kind == "scales":
        j *= 10.0 ** rng.uniform(-6, 6, size=(t, 1))
        j[rng.integers(t)] *= 1e6 / np.linalg.norm(j[rng.integers(t)])  # the ratio reaches ~1e12
    elif kind == "near_dup":
        k = max(1, t // 3)
        j[1 : k + 1] = j[0] + dup * np.linalg.norm(j[0]) / np.sqrt(d) * rng.normal(size=(k, d))
    elif kind == "zero":
        j[rng.integers(t)] = 0.0
    elif kind == "stationary":
        w = rng.dirichlet(np.ones(t))
        j -= w @ j
        j += 1e-6 * rng.normal(size=j.shape)
    return j


_JIT = {}


def _jit(name, fn):
    return _JIT.setdefault(name, jax.jit(fn))


def _weights(name, g, **kw):
    """Jitted Gramian -> weights of an aggregator's weighting (compiled once per name / shape / dtype)."""
    makers = {
        "mgda": lambda: lambda g: solvers.min_norm_simplex(g),
        "mgda_as": lambda: lambda g: solvers.min_norm_simplex(g, qp_method="active_set"),
        "nash": lambda: lambda g: nash_mtl_weighting(**kw).update(g, None, g.shape[0])[0],
        "imtl": lambda: lambda g: imtl_g_weighting().update(g, None, g.shape[0])[0],
        "upgrad": lambda: lambda g: upgrad_weighting().update(g, None, g.shape[0])[0],
        "dualproj": lambda: lambda g: dualproj_weighting().update(g, None, g.shape[0])[0],
    }
    key = (name, tuple(sorted(kw.items())))
    return np.asarray(_jit(key, makers[name]())(g), np.float64)


def _close(d, d_ref, scale, tol, msg=""):
    err = np.linalg.norm(d - d_ref)
    bound = tol * np.linalg.norm(d_ref) + tol * scale
    assert err <= bound, f"{msg}: |d - d_ref| = {err:.3e} > {bound:.3e} (|d_ref| = {np.linalg.norm(d_ref):.3e})"


def _gram(j, dtype):
    """The Gramian the aggregator sees (computed as corrjax does, in the input dtype) and the rounded Jacobian."""
    jd = jnp.asarray(j, dtype)
    return mtl.task_gramian({"w": jd}), np.asarray(jd, np.float64)


# ----------------------------------------------------------------------------- MGDA: min-norm point


def _min_norm_ref(j):
    """Exact min-norm point: NNLS ``min_{u >= 0} |J^T u|^2 + (1^T u - 1)^2``, whose KKT conditions are the simplex
    problem's for ``w = u / sum(u)`` (also when 0 is in the hull)."""
    t, d = j.shape
    e = np.vstack([j.T, np.ones((1, t))])
    u, _ = nnls(e, np.eye(d + 1)[-1], maxiter=100 * t)
    w = u / u.sum()
    return w, j.T @ w


def _check_mgda(j, dtype, name="mgda"):
    g, j = _gram(j, dtype)
    w = _weights(name, g)
    w_ref, d_ref = _min_norm_ref(j)
    norms = np.linalg.norm(j, axis=1)
    assert np.all(w >= 0) and abs(w.sum() - 1) < 10 * np.finfo(dtype).eps * len(w)
    d = j.T @ w
    if np.any(norms == 0):
        assert np.all(d == 0.0), "a zero task must give exactly d = 0"
        return
    _close(d, d_ref, w_ref @ norms, TOL[dtype], name)
    # KKT of the simplex problem: every task's projection on d is at least |d|^2 (up to the same rounding)
    scale = (w_ref @ norms) * norms
    assert np.all(j @ d >= d @ d - 10 * TOL[dtype] * scale)


@pytest.mark.parametrize("t", TS)
@pytest.mark.parametrize("kind", KINDS)
def test_min_norm_matches_nnls(x64, t, kind):
    for seed in range(2):
        _check_mgda(_jacobian(seed, t, kind), np.float64)
    _check_mgda(_jacobian(7, t, kind), np.float64, "mgda_as")


@pytest.mark.parametrize("t", (3, 8, 32))
@pytest.mark.parametrize("kind", ("generic", "scales", "zero", "wide", "stationary"))
def test_min_norm_matches_nnls_float32(t, kind):
    _check_mgda(_jacobian(1, t, kind), np.float32)


@given(st.sampled_from(TS_ALL), st.sampled_from(KINDS), st.integers(0, 2**31 - 1))
def test_min_norm_property(t, kind, seed):
    with jax.enable_x64(True):
        _check_mgda(_jacobian(seed, t, kind), np.float64)


def test_min_norm_has_no_ridge_bias(x64):
    """The issue's case: badly scaled tasks, where a ridge relative to trace(G) / T dominated the small tasks."""
    j = _jacobian(3, 8, "scales")
    w = _weights("mgda", jnp.asarray(j @ j.T))
    _, d_ref = _min_norm_ref(j)
    np.testing.assert_allclose((j.T @ w) @ (j.T @ w), d_ref @ d_ref, rtol=1e-9)


# ----------------------------------------------------------------------------- UPGrad / DualProj


def _dual_cone_ref(g, u, ridge=1e-4):
    """``min v^T Q v`` s.t. ``v >= u``, ``Q = G / trace(G) + ridge I`` (TorchJD's problem) as NNLS in ``z = v - u``:
    ``1/2 z^T Q z + (Q u)^T z = 1/2 |L^T (z + u)|^2 + const`` with ``Q = L L^T``."""
    q = g / np.trace(g) + ridge * np.eye(len(g))
    lt = np.linalg.cholesky(q).T
    z, _ = nnls(lt, -lt @ u, maxiter=100 * len(u))
    return u + z


@pytest.mark.parametrize("t", TS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_upgrad_dualproj_match_nnls(t, dtype):
    with jax.enable_x64(dtype == np.float64):
        for kind in KINDS:
            g, j = _gram(_jacobian(11, t, kind), dtype)
            g64 = j @ j.T
            up_ref = sum(_dual_cone_ref(g64, row) for row in np.eye(t) / t)
            dp_ref = _dual_cone_ref(g64, np.full(t, 1.0 / t))
            for name, ref in (("upgrad", up_ref), ("dualproj", dp_ref)):
                w = _weights(name, g)
                scale = np.abs(ref) @ np.linalg.norm(j, axis=1)
                _close(j.T @ w, j.T @ ref, scale, TOL[dtype], f"{name} {kind}")


@pytest.mark.parametrize("t", (32, 128))
def test_upgrad_many_near_orthogonal_tasks_float32_to_rounding(t):
    """Near-orthogonal rows (``J`` of shape ``(T, 4096)``, ``|cos| ~ 0.016``): ``Q`` is well conditioned (cond ~2), so
    the float32 solve of the float32 Gramian's own problem must be exact to a few float32 roundings. A KKT threshold
    from the bound ``|Q_ij| <= sqrt(Q_ii Q_jj)`` instead of ``|Q|`` (it grows like ``T tol`` here) accepted wrong
    partitions: 1.7e-6 (T = 32) and 4.8e-6 (T = 128) relative against this reference."""
    j = np.random.default_rng(0).normal(size=(t, 4096))
    g32 = (j @ j.T).astype(np.float32)
    g = np.asarray(g32, np.float64)
    w_ref = sum(_dual_cone_ref(g, row) for row in np.eye(t) / t)
    w = _weights("upgrad", jnp.asarray(g32))
    err = np.max(np.abs(w - w_ref)) / np.max(np.abs(w_ref))
    assert err <= 1e-6, err


# ----------------------------------------------------------------------------- Nash-MTL


def _nash_ref(j, ridge):
    """Newton on ``1/2 b^T (C + ridge I) b - sum log b`` (C: cosines) to a 1e-15 gradient; ``d = sum_i b_i u_i``."""
    norms = np.linalg.norm(j, axis=1)
    live = norms > 0
    u = j[live] / norms[live, None]
    c = u @ u.T + ridge * np.eye(len(u))
    b = 1.0 / np.sqrt(np.diag(c))
    for _ in range(200):
        grad = c @ b - 1.0 / b
        if np.max(np.abs(grad * b)) < 1e-15:
            break
        step = -np.linalg.solve(c + np.diag(1.0 / b**2), grad)
        lam = np.sqrt(max(-grad @ step, 0.0))
        s = 1.0 / (1.0 + lam) if lam >= 0.25 else 1.0
        b = np.where(b + s * step > 0, b + s * step, b / 2)
    return u.T @ b


@pytest.mark.parametrize("t", TS)
def test_nash_matches_newton_and_is_scale_invariant(x64, t):
    for kind in KINDS:
        j = _jacobian(21, t, kind, dup=1e-3)
        ridge = 0.0 if kind in ("generic", "scales", "near_dup", "zero") else 1e-6
        w = _weights("nash", jnp.asarray(j @ j.T), reg_eps=ridge)
        d = j.T @ w
        d_ref = _nash_ref(j, ridge)
        _close(d, d_ref, np.sqrt(t), TOL[np.float64], kind)
        # rescaling each task's gradient by 10^U(-6, 6) leaves the bargaining direction unchanged
        k = j * 10.0 ** np.random.default_rng(t).uniform(-6, 6, size=(t, 1))
        _close(k.T @ _weights("nash", jnp.asarray(k @ k.T), reg_eps=ridge), d, np.sqrt(t), TOL[np.float64], kind)
        if ridge == 0.0:
            np.testing.assert_allclose(d @ d, np.sum(np.linalg.norm(j, axis=1) > 0), rtol=1e-9)  # |d|^2 = T


def test_nash_issue_case_is_scale_invariant(x64):
    """Badly scaled T = 8: the default ridge is relative to each task, so |d|^2 = T (1 - O(1e-6)), not 3.08."""
    j = _jacobian(3, 8, "scales")
    d = j.T @ _weights("nash", jnp.asarray(j @ j.T))
    np.testing.assert_allclose(d @ d, 8.0, rtol=1e-5)


# ----------------------------------------------------------------------------- IMTL-G


def _imtl_ref(j):
    """IMTL-G from the Jacobian: the paper's difference form where the differences ``u_1 - u_t`` of the unit gradients
    are linearly independent (``d`` along the min-norm point of their affine hull, by least squares), else ``d`` along
    ``U^+ 1`` (eigendecomposition pseudo-inverse of the cosine matrix); scaled so that ``d = J^T a``, ``sum(a) = 1``.
    Returns ``(d, sum|a| / |sum a|)``."""
    norms = np.linalg.norm(j, axis=1)
    live = norms > 0
    u = j[live] / norms[live, None]
    t = len(u)
    if t >= 2:
        diffs = (u[0] - u[1:]).T  # (d, T - 1)
        s = np.linalg.svd(diffs, compute_uv=False)
        if s.size == t - 1 and s.min() > 1e-6 * s.max():
            beta = np.linalg.lstsq(diffs, u[0], rcond=None)[0]
            x = np.concatenate([[1.0 - beta.sum()], beta])  # u^T x: the min-norm point of the affine hull
            a = x / norms[live]
            return u.T @ x / a.sum(), np.abs(a).sum() / abs(a.sum())
    c = u @ u.T
    lam, v = np.linalg.eigh(c)
    keep = lam > 10 * len(j) * np.finfo(np.float64).eps * lam.max()
    b = v[:, keep] @ ((v[:, keep].T @ np.ones(len(u))) / lam[keep])
    a = b / norms[live]
    if np.linalg.norm(u.T @ b) <= 1e-12 * np.sqrt(len(u)):  # 1 orthogonal to C's range: the zero update
        return np.zeros(j.shape[1]), 1.0
    return u.T @ b / a.sum(), np.abs(a).sum() / abs(a.sum())


@pytest.mark.parametrize("t", TS)
def test_imtl_g_matches_pinv_reference(x64, t):
    for kind in KINDS:
        j = _jacobian(31, t, kind, dup=1e-4)
        w = _weights("imtl", jnp.asarray(j @ j.T))
        d = j.T @ w
        d_ref, amplify = _imtl_ref(j)
        norms = np.linalg.norm(j, axis=1)
        # near-duplicates at 1e-4 make C's condition ~1e8: both sides are exact to eps * cond; the normalisation
        # sum(a) = 1 amplifies errors by sum|a| / |sum a| (large when the weights nearly cancel, as for T > d)
        tol = (1e-7 if kind != "near_dup" else 1e-6) * amplify
        _close(d, d_ref, np.abs(w) @ norms, tol, kind)
        if np.any(d_ref != 0):
            np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-12)
        live = norms > 0
        if kind not in ("wide", "stationary"):  # equal projections on every unit gradient (C well conditioned)
            p = (j[live] / norms[live, None]) @ d
            assert np.abs(p - p[0]).max() <= (1e-7 if kind != "near_dup" else 1e-5) * (np.abs(w) @ norms), kind
        elif kind == "wide" and np.any(d_ref != 0):  # d along U^+ 1 (least-squares equal projections), not 0
            u = j[live] / norms[live, None]
            ls = np.linalg.lstsq(u, np.ones(live.sum()), rcond=None)[0]
            assert np.linalg.norm(d) > 0
            np.testing.assert_allclose(d / np.linalg.norm(d), np.sign(d @ ls) * ls / np.linalg.norm(ls), atol=1e-7)


def test_imtl_g_difference_form_float32_and_affine_hull_through_zero():
    """The CAGrad toy's situation: two nearly opposite gradients 10x apart in norm, where C is singular in float32
    (the pseudo-inverse answer was off by ~|d| itself); the difference form is exact to float32 rounding. With
    ``T = d + 1`` generic gradients 0 is in their affine hull: exact IMTL-G gives ``d = 0``."""
    for angle in (1e-3, 1e-5):
        j = np.array([[1.0, 0.0, 0.0], [-10.0 * np.cos(angle), -10.0 * np.sin(angle), 0.0]])
        j = np.asarray(np.float32(j), np.float64)
        g, _ = _gram(j, np.float32)
        w = _weights("imtl", g)
        d_ref, amplify = _imtl_ref(j)
        _close(j.T @ w, d_ref, np.abs(w) @ np.linalg.norm(j, axis=1), TOL[np.float32] * amplify, f"angle {angle}")
    with jax.enable_x64(True):
        j = np.random.default_rng(5).normal(size=(3, 2))
        w = _weights("imtl", jnp.asarray(j @ j.T))
        np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-12)
        assert np.linalg.norm(j.T @ w) <= 1e-12 * (np.abs(w) @ np.linalg.norm(j, axis=1))
        np.testing.assert_allclose(j.T @ w, _imtl_ref(j)[0], atol=1e-12)


def test_min_norm_vmap_mixes_certified_and_fallback():
    """Under vmap the active-set fallback (a lax.cond, run for the whole batch) takes no step for the members block
    pivoting certified: a batch with duplicated tasks (the fallback's case) and generic ones matches one by one."""
    with jax.enable_x64(True):
        js = [_jacobian(s, 5, k) for s, k in ((0, "generic"), (1, "wide"), (2, "scales"), (3, "stationary"))]
        js = [np.pad(j, ((0, 0), (0, 8 - j.shape[1]))) for j in js]
        dup = js[0].copy()
        dup[1] = dup[0]
        js.append(dup)
        gs = jnp.asarray(np.stack([j @ j.T for j in js]))
        batched = np.asarray(jax.jit(jax.vmap(solvers.min_norm_simplex))(gs))
        for b, j in enumerate(js):
            _, d_ref = _min_norm_ref(j)
            norms = np.linalg.norm(j, axis=1)
            _close(j.T @ batched[b], d_ref, np.abs(batched[b]) @ norms, TOL[np.float64], f"member {b}")


# ----------------------------------------------------------------------------- CAGrad


def _cagrad_certificate(j, a, c):
    """Duality gap of CAGrad's answer ``d = J^T a``: primal value ``min_i g_i . d`` over the ball ``|d - g_0| <=
    c |g_0|`` against the dual value ``g_w . g_0 + c |g_0| |g_w|`` at the simplex point ``w`` it implies."""
    t = len(j)
    m = np.full(t, 1.0 / t)
    g0 = j.T @ m
    phi = c * np.linalg.norm(g0)
    d = j.T @ a
    s = np.sum(a - m)  # = 1 / x, with w = (a - m) x on the simplex (0 at the x -> 0 limit)
    w = (a - m) / s if s != 0 else m
    gw = j.T @ w
    return d, phi, (j @ d).min(), gw @ g0 + phi * np.linalg.norm(gw), w


@pytest.mark.parametrize("t", TS)
@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_cagrad_duality_gap_and_no_conflict(x64, t, c):
    f = _jit("cagrad", cagrad_solve)
    for kind in KINDS:
        for seed in range(2):
            j = _jacobian(41 + seed, t, kind, dup=1e-4)
            if kind == "stationary":
                j = _jacobian(41 + seed, t, "generic") * 1e-3 + j  # near, not at, stationarity (1e-3)
            a = np.asarray(f(jnp.asarray(j @ j.T), c))
            d, phi, primal, dual, w = _cagrad_certificate(j, a, c)
            g0 = j.mean(0)
            scale = np.linalg.norm(j, axis=1).max() * np.linalg.norm(g0)
            if c >= 1:  # the ball contains 0: the optimum conflicts with no task
                assert primal >= -1e-11 * scale, (kind, primal / scale)
            _, d_mgda = _min_norm_ref(j)
            if np.linalg.norm(d_mgda) > 1e-9 * np.linalg.norm(j, axis=1).max():
                # the root is at x > 0: d on the sphere; where w = (a - m) x is resolvable (x < 1e6), no duality gap
                np.testing.assert_allclose(np.linalg.norm(d - g0), phi, rtol=1e-9, err_msg=kind)
                if np.sum(a - 1.0 / t) > 1e-6:
                    assert np.all(w >= -1e-9), kind
                    assert abs(dual - primal) <= 1e-9 * scale, (kind, (dual - primal) / scale)
            else:  # exact stationarity (g_w = 0 may be optimal): d is in the ball
                assert np.linalg.norm(d - g0) <= phi * (1 + 1e-9), kind


def test_cagrad_issue_case_zero_row(x64):
    """A zero task at T = 8: the optimum of the dual is 0 (w on the zero task); c >= 1 conflicts with no task."""
    j = _jacobian(5, 8, "zero")
    for c in (1.0, 3.0):
        d = j.T @ np.asarray(_jit("cagrad", cagrad_solve)(jnp.asarray(j @ j.T), c))
        assert (j @ d).min() >= -1e-13 * np.abs(j).max() ** 2


# ----------------------------------------------------------------------------- validation and state


def test_bad_updates_raise():
    agg = mtl.mgda()
    with pytest.raises(ValueError, match=r"`updates`.*T = 0"):
        agg.update({"w": jnp.zeros((0, 3))}, agg.init(None))
    with pytest.raises(ValueError, match=r"`updates`.*\(3,\).*\(2, 3\)"):
        agg.update({"w": jnp.zeros((2, 3)), "b": jnp.zeros((3,))}, agg.init(None))
    with pytest.raises(ValueError, match=r"`updates`.*\[\(3, 1\), \(2, 3\)\]"):
        agg.update({"w": jnp.zeros((2, 3)), "b": jnp.zeros((3, 1))}, agg.init(None))
    for bad in (jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3), jnp.complex64), jnp.ones((2, 3), bool)):
        for a in (mtl.mgda(), mtl.mean(), mtl.graddrop()):
            with pytest.raises(TypeError, match=f"`updates`.*{bad.dtype}"):
                a.update({"w": bad}, a.init(None))
    with pytest.raises(TypeError, match="gramian"):
        solvers.min_norm_simplex(jnp.eye(2, dtype=jnp.complex64))


@pytest.mark.parametrize("name", ["rlw", "pcgrad", "gradvac", "graddrop"])
def test_states_are_plain_arrays_and_round_trip_orbax(name, tmp_path):
    import orbax.checkpoint as ocp

    j = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    g = {"w": jnp.asarray(j)}
    agg = mtl.gradvac(0.5, num_tasks=3, key=4) if name == "gradvac" else getattr(mtl, name)(4)
    upd = jax.jit(agg.update)
    _, state = upd(g, agg.init(None))
    leaves = jax.tree.leaves(state)
    assert all(isinstance(np.asarray(x), np.ndarray) and np.asarray(x).dtype != object for x in leaves)
    assert state.key.dtype == jnp.uint32
    # NumPy round trip
    restored_np = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)
    # orbax round trip
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "state", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "state", jax.tree.map(np.asarray, state))
    expected, _ = upd(g, state)
    for r in (restored_np, restored):
        out, _ = upd(g, type(state)(*jax.tree.leaves(r)) if name != "gradvac" else type(state)(*r))
        np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(expected["w"]))


def test_typed_keys_are_still_accepted():
    agg = mtl.pcgrad(jax.random.key(3))
    ref = mtl.pcgrad(jax.random.key_data(jax.random.key(3)))
    g = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(3, 5)), jnp.float32)}
    np.testing.assert_array_equal(agg.update(g, agg.init(None))[0]["w"], ref.update(g, ref.init(None))[0]["w"])
    state = agg.init(None)._replace(key=jax.random.key(3))  # a typed key put into a state by hand
    np.testing.assert_array_equal(agg.update(g, state)[0]["w"], ref.update(g, ref.init(None))[0]["w"])


def test_vmap_and_jit_of_exact_solvers():
    rng = np.random.default_rng(2)
    js = rng.normal(size=(4, 3, 5)).astype(np.float32)  # T = 3 < d = 5: every problem well posed in float32
    gs = jnp.asarray(np.einsum("btp,bsp->bts", js, js))
    for fn in (solvers.min_norm_simplex, lambda g: cagrad_solve(g, 0.5), lambda g: solvers.nash_bargaining(g)):
        batched = jax.jit(jax.vmap(fn))(gs)
        for b in range(4):
            np.testing.assert_allclose(batched[b], jax.jit(fn)(gs[b]), rtol=1e-5, atol=1e-6)
    assert optax is not None
