"""Aggregators against closed forms, brute-force NumPy references and scipy QPs; degenerate inputs; Optax plumbing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.optimize import minimize

import corrjax.mtl as mtl

FLOATS = st.floats(-10, 10, allow_nan=False, width=32)


def _stack(j):
    """Splits a (T, P) matrix into a two-leaf task-stacked pytree (leaves (T, 2, 2) and (T, P - 4))."""
    j = jnp.asarray(j, jnp.float32)
    return {"w": j[:, :4].reshape(-1, 2, 2), "b": j[:, 4:]}


def _flat(tree):
    return np.concatenate([np.asarray(tree["w"]).reshape(-1), np.asarray(tree["b"]).reshape(-1)])


_JITTED = {}


def _apply(agg, j, name=None, **extra):
    """Single jitted update of ``agg`` on the Jacobian rows ``j`` (T, P); returns the flat (P,) result.

    With ``name`` the jitted update is cached (the update closures do not depend on the key, only ``init`` does), so
    property tests compile once per shape.
    """
    upd = _JITTED.setdefault(name, jax.jit(agg.update)) if name else jax.jit(agg.update)
    out, _ = upd(_stack(j), agg.init(None), **extra)
    return _flat(out)


jac = hnp.arrays(np.float32, st.tuples(st.integers(2, 4), st.just(6)), elements=FLOATS)

# ----------------------------------------------------------------------------- linear scalarisations


def test_mean_sum_weighted_rlw():
    j = np.arange(18, dtype=np.float32).reshape(3, 6) - 7
    np.testing.assert_allclose(_apply(mtl.mean(), j), j.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_apply(mtl.sum(), j), j.sum(0), rtol=1e-6)
    w = np.array([0.5, -1.0, 2.0], np.float32)
    np.testing.assert_allclose(_apply(mtl.weighted(w), j), w @ j, rtol=1e-6)
    with pytest.raises(ValueError, match="weights"):
        _apply(mtl.weighted(np.ones(2)), j)
    # rlw: softmax weights; deterministic given the key, different across steps
    agg = mtl.rlw(3)
    s = agg.init(None)
    eye = np.eye(3, 6, dtype=np.float32)
    o1, s = agg.update(_stack(eye), s)
    o2, _ = agg.update(_stack(eye), s)
    w1, w2 = _flat(o1)[:3], _flat(o2)[:3]
    assert np.all(w1 > 0) and np.isclose(w1.sum(), 1, atol=1e-6) and not np.allclose(w1, w2)
    np.testing.assert_array_equal(w1, _flat(mtl.rlw(3).update(_stack(eye), mtl.rlw(3).init(None))[0])[:3])


def test_bf16_and_dtype_preserved():
    g = {"w": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.ones((2,), jnp.float32)}
    for agg in (mtl.mean(), mtl.graddrop()):
        out, _ = jax.jit(agg.update)(g, agg.init(None))
        assert out["w"].dtype == jnp.bfloat16 and out["b"].dtype == jnp.float32


def test_fixed_and_random_weights_keep_float64_precision(x64):
    """float64 gradients get float64 weights: mean is exact, the random weights sum to 1 in float64."""
    rng = np.random.default_rng(12)
    g = {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float64)}
    j = np.asarray(g["w"])
    out, _ = mtl.mean().update(g, mtl.mean().init(None))
    np.testing.assert_allclose(out["w"], j.mean(0), rtol=1e-14, atol=1e-15)
    eye = {"w": jnp.eye(3, dtype=jnp.float64)}
    agg = mtl.rlw(3)
    w, _ = agg.update(eye, agg.init(None))
    assert w["w"].dtype == jnp.float64
    np.testing.assert_allclose(float(jnp.sum(w["w"])), 1.0, rtol=1e-14)


# ----------------------------------------------------------------------------- PCGrad


def _pcgrad_two(g1, g2):
    """The two-task closed form: each gradient loses its component along the other when they conflict."""
    d = g1 @ g2
    if d >= 0:
        return g1 + g2
    return g1 - d / (g2 @ g2) * g2 + g2 - d / (g1 @ g1) * g1


@given(hnp.arrays(np.float32, (2, 6), elements=st.floats(-10, 10, allow_nan=False, width=32)))
def test_pcgrad_two_task_closed_form(j):
    j64 = j.astype(np.float64)
    if np.any(np.sum(j64**2, 1) < 1e-3):
        return
    ref = _pcgrad_two(j64[0], j64[1])
    np.testing.assert_allclose(_apply(mtl.pcgrad(1), j, "pcgrad"), ref, rtol=1e-3, atol=1e-3 * np.abs(j64).max())


def _pcgrad_ref(j, orders):
    out = np.zeros(j.shape[1])
    for i in range(len(j)):
        gi = j[i].copy()
        for k in orders[i]:
            d = gi @ j[k]
            if d < 0 and j[k] @ j[k] > 0:
                gi = gi - d / (j[k] @ j[k]) * j[k]
        out += gi
    return out


def test_pcgrad_matches_sequential_reference_and_key():
    rng = np.random.default_rng(0)
    j = rng.normal(size=(4, 6)).astype(np.float32)
    agg = mtl.pcgrad(7)
    state = agg.init(None)
    # reproduce the orders drawn from the state's key
    _, sub = jax.random.split(state.key)
    orders = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, 4))(jax.random.split(sub, 4)))
    np.testing.assert_allclose(
        _apply(agg, j, "pcgrad"), _pcgrad_ref(j.astype(np.float64), orders), rtol=1e-4, atol=1e-5
    )
    # deterministic given the key
    np.testing.assert_array_equal(_apply(mtl.pcgrad(7), j, "pcgrad"), _apply(mtl.pcgrad(7), j, "pcgrad"))


# ----------------------------------------------------------------------------- GradVac


def _gradvac_ref(j, orders, ema, beta):
    out = np.zeros(j.shape[1])
    ema = ema.copy()
    for i in range(len(j)):
        gi = j[i].copy()
        for k in orders[i]:
            if k == i:
                continue
            phi = gi @ j[k] / (np.linalg.norm(gi) * np.linalg.norm(j[k]))
            tgt = ema[i, k]
            if phi < tgt:
                gi = (
                    gi
                    + np.linalg.norm(gi)
                    * (tgt * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - tgt**2))
                    / (np.linalg.norm(j[k]) * np.sqrt(1 - tgt**2))
                    * j[k]
                )
            ema[i, k] = (1 - beta) * tgt + beta * phi
        out += gi
    return out, ema


def test_gradvac_matches_reference_over_steps():
    rng = np.random.default_rng(1)
    agg = mtl.gradvac(0.5, num_tasks=3, key=2)
    state = agg.init(None)
    ema = np.zeros((3, 3))
    upd = jax.jit(agg.update)
    for _ in range(3):
        j = rng.normal(size=(3, 6)).astype(np.float32)
        _, sub = jax.random.split(state.key)
        orders = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, 3))(jax.random.split(sub, 3)))
        ref, ema = _gradvac_ref(j.astype(np.float64), orders, ema, 0.5)
        out, state = upd(_stack(j), state)
        np.testing.assert_allclose(_flat(out), ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(state.ema, ema, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="num_tasks"):
        agg.update(_stack(np.ones((2, 6))), agg.init(None))


def test_gradvac_float64_targets(x64):
    """Under x64 the cosine targets are kept in float64, so float64 gradients match the reference to 1e-10."""
    rng = np.random.default_rng(3)
    agg = mtl.gradvac(0.5, num_tasks=3, key=2)
    state = agg.init(None)
    assert state.ema.dtype == jnp.float64
    ema = np.zeros((3, 3))
    for _ in range(3):
        j = rng.normal(size=(3, 6))
        _, sub = jax.random.split(state.key)
        orders = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, 3))(jax.random.split(sub, 3)))
        ref, ema = _gradvac_ref(j, orders, ema, 0.5)
        out, state = agg.update({"w": jnp.asarray(j)}, state)
        np.testing.assert_allclose(out["w"], ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(state.ema, ema, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- GradDrop


def test_graddrop_sign_rule():
    # all tasks agree in sign on coordinate 0 (kept in full), cancel on coordinate 1
    j = np.array([[1.0, 2.0, 0, 0, 0, 0], [3.0, -2.0, 0, 0, 0, 0]], np.float32)
    outs = np.stack([_apply(mtl.graddrop(k), j, "graddrop") for k in range(20)])
    np.testing.assert_allclose(outs[:, 0], 4.0)
    assert set(np.round(outs[:, 1], 5)) <= {2.0, -2.0} and len(set(np.round(outs[:, 1], 5))) == 2
    np.testing.assert_array_equal(outs[:, 2:], 0.0)
    # leak=1 keeps everything: the sum
    np.testing.assert_allclose(_apply(mtl.graddrop(0, leak=1.0), j), j.sum(0))
    assert np.isnan(_apply(mtl.graddrop(0), np.where(np.eye(2, 6) > 0, np.nan, j), "graddrop")[0])


# ----------------------------------------------------------------------------- Gramian methods vs oracles

_AGGS = {
    "mean": mtl.mean(),
    "sum": mtl.sum(),
    "pcgrad": mtl.pcgrad(),
    "gradvac": None,  # needs num_tasks; built per T below
    "mgda": mtl.mgda(),
    "upgrad": mtl.upgrad(),
    "dualproj": mtl.dualproj(),
    "imtl_g": mtl.imtl_g(),
    "nash_mtl": mtl.nash_mtl(),
    "cagrad": mtl.cagrad(0.5),
    "aligned_mtl": mtl.aligned_mtl(),
    "rlw": mtl.rlw(),
    "graddrop": mtl.graddrop(),
}


def _agg(name, t):
    return mtl.gradvac(0.5, num_tasks=t) if name == "gradvac" else _AGGS[name]


def _run(name, j):
    """Cached jitted update of the named aggregator on rows ``j``; returns the flat float64 result."""
    agg = _agg(name, len(j))
    key = f"{name}/{len(j)}" if name == "gradvac" else name
    return _apply(agg, j, key).astype(np.float64)


def _simplex_min(obj, t):
    cons = [{"type": "eq", "fun": lambda w: np.sum(w) - 1.0}]
    r = minimize(
        obj,
        np.full(t, 1.0 / t),
        bounds=[(0, 1)] * t,
        constraints=cons,
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return r.x


def _nondegenerate(j):
    return np.all(np.sum(j.astype(np.float64) ** 2, 1) > 1e-2)


@settings(max_examples=20)
@given(jac)
def test_mgda_matches_scipy_qp(j):
    j64 = j.astype(np.float64)
    w = _simplex_min(lambda w: w @ (j64 @ j64.T) @ w, len(j))
    np.testing.assert_allclose(_run("mgda", j), j64.T @ w, atol=2e-3 * max(1.0, np.abs(j64).max()))


@settings(max_examples=15)
@given(jac)
def test_cagrad_matches_scipy(j):
    j64 = j.astype(np.float64)
    if not _nondegenerate(j):
        return
    t, c = len(j), 0.5
    g = j64 @ j64.T
    g0 = j64.mean(0)
    sqrt_phi = c * np.linalg.norm(g0)
    w = _simplex_min(lambda w: w @ g @ np.full(t, 1 / t) + sqrt_phi * np.sqrt(w @ g @ w + 1e-12), t)
    gw = j64.T @ w
    if np.linalg.norm(gw) < 1e-3 * np.sqrt(np.trace(g)):
        return  # Pareto-stationary: the direction of g_w is ill-conditioned
    ref = (g0 + sqrt_phi / np.linalg.norm(gw) * gw) / (1 + c)
    np.testing.assert_allclose(_run("cagrad", j), ref, atol=5e-3 * np.abs(j64).max())


@pytest.mark.parametrize("c", [-0.5, float("nan"), np.array([0.5, -1.0])])
def test_cagrad_refuses_a_negative_radius(c):
    with pytest.raises(ValueError, match="`c`"):
        mtl.cagrad(c)


def test_cagrad_c0_is_mean_for_every_rescale():
    rng = np.random.default_rng(4)
    j = rng.normal(size=(3, 6)).astype(np.float32)
    for r in (0, 1, 2):
        np.testing.assert_allclose(_apply(mtl.cagrad(0.0, rescale=r), j), j.mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rescale"):
        mtl.cagrad(0.5, rescale=3)


def test_nash_mtl_orthogonal_gradients():
    # orthogonal rows: alpha_i = 1 / |g_i|, so d = sum_i g_i / |g_i|
    j = np.zeros((3, 6), np.float32)
    j[0, 0], j[1, 1], j[2, 4] = 3.0, -0.5, 10.0
    np.testing.assert_allclose(_run("nash_mtl", j), (j / np.linalg.norm(j, axis=1, keepdims=True)).sum(0), rtol=1e-4)


@settings(max_examples=20)
@given(jac)
def test_nash_mtl_bargaining_condition(j):
    j64 = j.astype(np.float64)
    if not _nondegenerate(j) or np.linalg.matrix_rank(j64, tol=1e-2 * np.abs(j64).max()) < len(j):
        return
    d = _run("nash_mtl", j)
    # g_i . d = 1 / alpha_i > 0 and d = sum_i alpha_i g_i  =>  d . d = sum_i alpha_i (g_i . d) = T
    proj = j64 @ d
    assert np.all(proj > 0)
    np.testing.assert_allclose(d @ d, len(j), rtol=1e-2)


@settings(max_examples=20)
@given(jac)
def test_imtl_g_equal_projections(j):
    j64 = j.astype(np.float64)
    if not _nondegenerate(j) or np.linalg.matrix_rank(j64, tol=1e-2 * np.abs(j64).max()) < len(j):
        return
    d = _run("imtl_g", j)
    u = j64 / np.linalg.norm(j64, axis=1, keepdims=True)
    proj = u @ d
    np.testing.assert_allclose(proj, proj[0], atol=2e-3 * max(1.0, np.abs(proj).max()))
    # d = J^T a with sum(a) = 1
    a = np.linalg.lstsq(j64.T, d, rcond=None)[0]
    np.testing.assert_allclose(a.sum(), 1.0, atol=2e-2)


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1e3, 1e6])
def test_imtl_g_is_scale_equivariant(scale):
    """The IMTL-G weights depend only on the gradient directions: d(c J) = c d(J) at any gradient scale."""
    j = np.random.default_rng(13).normal(size=(3, 6))
    ref = _run("imtl_g", j.astype(np.float32))
    out = _run("imtl_g", (scale * j).astype(np.float32)) / scale
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    u = j / np.linalg.norm(j, axis=1, keepdims=True)
    np.testing.assert_allclose(u @ out, (u @ out)[0], rtol=1e-3)


def test_imtl_g_and_nash_mtl_keep_small_gradient_tasks():
    """A task whose gradient is 1e-3 (or 1e-5) of the others is not a zero gradient: it keeps its share.

    Orthogonal gradients: IMTL-G's equal projections give ``d_i = c`` for every task; Nash-MTL's exact system gives
    ``alpha_i = 1 / |g_i|`` (``d = sum_i u_i``), and its default ridge scales every task's share alike.
    """
    for small in (1e-3, 1e-5):
        j = np.zeros((3, 6), np.float32)
        j[0, 0], j[1, 1], j[2, 4] = 1.0, small, 2.0
        d = _run("imtl_g", j)
        np.testing.assert_allclose(d[[0, 1, 4]], d[0], rtol=1e-3, err_msg=str(small))
        exact = mtl.nash_mtl(reg_eps=0.0)
        np.testing.assert_allclose(_apply(exact, j)[[0, 1, 4]], 1.0, rtol=1e-4, err_msg=str(small))
    # the default ridge (1e-6 on the cosine matrix, after the per-task rescaling) is the same for every task whatever
    # its scale: b_i = 1 / sqrt(1 + 1e-6) for orthogonal gradients, so each unit contribution is that, however small
    for small in (1e-2, 1e-3, 1e-5):
        j = np.zeros((3, 6), np.float32)
        j[0, 0], j[1, 1], j[2, 4] = 1.0, small, 1.0
        np.testing.assert_allclose(_run("nash_mtl", j)[[0, 1, 4]], 1.0 / np.sqrt(1.0 + 1e-6), rtol=1e-6)


@settings(max_examples=12)
@given(jac)
def test_upgrad_and_dualproj_do_not_conflict(j):
    j64 = j.astype(np.float64)
    tr = np.trace(j64 @ j64.T)
    for name in ("upgrad", "dualproj"):
        d = _run(name, j)
        # J d >= 0 up to the ridge 1e-4 trace(G) |v| on the normalised Gramian (TorchJD's default)
        assert np.all(j64 @ d >= -2e-4 * tr * (1 + np.abs(d).max() / max(np.sqrt(tr), 1e-6))), name


def test_upgrad_dualproj_mean_on_aligned_gradients():
    rng = np.random.default_rng(5)
    j = np.abs(rng.normal(size=(4, 6))).astype(np.float32)  # pairwise non-conflicting
    for name in ("upgrad", "dualproj"):
        np.testing.assert_allclose(_run(name, j), j.mean(0), rtol=2e-3, atol=1e-4)


def _aligned_ref(j):
    g = j @ j.T
    lam, v = np.linalg.eigh(g)
    keep = lam > lam.max() * len(g) * np.finfo(np.float32).eps
    b = np.sqrt(lam[keep].min()) * (v[:, keep] / np.sqrt(lam[keep])) @ v[:, keep].T
    return j.T @ (b @ np.full(len(g), 1 / len(g)))


@settings(max_examples=15)
@given(jac)
def test_aligned_mtl_reference(j):
    j64 = j.astype(np.float64)
    if np.linalg.matrix_rank(j64, tol=1e-2 * max(np.abs(j64).max(), 1e-3)) < len(j):
        return  # the eigenvalue cut is ill-conditioned near rank deficiency
    np.testing.assert_allclose(_run("aligned_mtl", j), _aligned_ref(j64), rtol=5e-3, atol=5e-3 * np.abs(j64).max())


# ----------------------------------------------------------------------------- against TorchJD (same formulas)


def test_against_torchjd():
    torch = pytest.importorskip("torch")
    agg_mod = pytest.importorskip("torchjd.aggregation")
    rng = np.random.default_rng(6)
    j = rng.normal(size=(4, 6)).astype(np.float32)
    jt = torch.from_numpy(j.astype(np.float64))
    pairs = {
        "mgda": agg_mod.MGDA(epsilon=1e-9, max_iters=10000),
        "imtl_g": agg_mod.IMTLG(),
        "aligned_mtl": agg_mod.AlignedMTL(),
    }
    try:
        agg_mod.UPGrad()(jt)
        pairs.update(upgrad=agg_mod.UPGrad(), dualproj=agg_mod.DualProj())
    except ImportError:
        pass  # quadprog not installed
    for name, ref in pairs.items():
        np.testing.assert_allclose(_run(name, j), ref(jt).numpy(), rtol=2e-3, atol=2e-4, err_msg=name)


# ----------------------------------------------------------------------------- degenerate inputs

ALL = [n for n in _AGGS if n not in ("rlw", "graddrop")]
EXACT_T1 = [n for n in ALL if n != "nash_mtl"]


def test_single_task_returns_the_gradient():
    g = np.array([[1.0, -2.0, 0.5, 3.0, 0.0, 1.0]], np.float32)
    for name in [*EXACT_T1, "rlw"]:
        np.testing.assert_allclose(_run(name, g), g[0], rtol=1e-4, atol=1e-5, err_msg=name)
    # Nash-MTL keeps its bargaining scale: alpha = 1 / |g|
    np.testing.assert_allclose(_run("nash_mtl", g), g[0] / np.linalg.norm(g), rtol=1e-4)


def test_identical_gradients():
    g = np.tile(np.array([[1.0, -2.0, 0.5, 3.0, 0.0, 1.0]], np.float32), (3, 1))
    scale = {"sum": 3.0, "pcgrad": 3.0, "gradvac": 3.0, "nash_mtl": np.sqrt(3) / np.linalg.norm(g[0])}
    for name in ALL:
        np.testing.assert_allclose(_run(name, g), scale.get(name, 1.0) * g[0], rtol=2e-3, atol=1e-4, err_msg=name)


def test_zero_gradient_task_is_finite():
    rng = np.random.default_rng(7)
    j = rng.normal(size=(3, 6)).astype(np.float32)
    j[1] = 0.0
    for name in ALL:
        out = _run(name, j)
        assert np.all(np.isfinite(out)), name
    np.testing.assert_allclose(_run("mgda", j), 0.0, atol=1e-4)  # 0 is in the convex hull


def test_nonfinite_gradients_propagate_nan():
    j = np.ones((3, 6), np.float32)
    j[2, 1] = np.nan
    for name in [*ALL, "rlw", "graddrop"]:
        assert np.isnan(_run(name, j)).any(), name
    j[2, 1] = np.inf
    for name in ("mgda", "upgrad", "nash_mtl", "imtl_g", "cagrad", "aligned_mtl", "pcgrad"):
        assert not np.all(np.isfinite(_run(name, j))), name


PERM_EQUIVARIANT = ["mean", "sum", "mgda", "upgrad", "dualproj", "imtl_g", "nash_mtl", "cagrad", "aligned_mtl"]


@settings(max_examples=10)
@given(hnp.arrays(np.float32, (3, 6), elements=FLOATS), st.permutations(range(3)))
def test_permutation_equivariance(j, perm):
    if not _nondegenerate(j):
        return
    scale = np.abs(j).max()
    for name in PERM_EQUIVARIANT:
        np.testing.assert_allclose(_run(name, j[list(perm)]), _run(name, j), atol=2e-3 * scale, rtol=2e-3, err_msg=name)


# ----------------------------------------------------------------------------- Optax plumbing


def test_chain_inject_hyperparams_task_losses_and_abstract_init():
    j = np.random.default_rng(8).normal(size=(3, 6)).astype(np.float32)
    params = jax.tree.map(lambda x: x[0], _stack(j))  # shapes without the task axis
    tx = optax.chain(mtl.pcgrad(), optax.adam(1e-2))
    state = tx.init(params)
    upd, state = jax.jit(tx.update)(_stack(j), state, params, task_losses=jnp.ones(3))
    assert jax.tree.map(jnp.shape, upd) == jax.tree.map(jnp.shape, params)
    # hyperparameters as arrays: CAGrad's c under inject_hyperparams
    tx = optax.inject_hyperparams(mtl.cagrad)(c=0.0, rescale=1)
    out, _ = jax.jit(tx.update)(_stack(j), tx.init(params))
    np.testing.assert_allclose(_flat(out), j.mean(0), rtol=1e-5, atol=1e-6)
    # abstract init
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    for agg in (mtl.gradvac(0.5, num_tasks=3), mtl.pcgrad(), mtl.upgrad()):
        jax.eval_shape(agg.init, abstract)


def test_multisteps_accumulates_aggregated_updates():
    rng = np.random.default_rng(9)
    js = rng.normal(size=(2, 3, 6)).astype(np.float32)
    params = jax.tree.map(lambda x: x[0], _stack(js[0]))
    tx = optax.chain(mtl.mgda(), optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2).gradient_transformation())
    state = tx.init(params)
    update = jax.jit(tx.update)
    upd1, state = update(_stack(js[0]), state, params)
    np.testing.assert_array_equal(_flat(upd1), 0.0)  # accumulating
    upd2, state = update(_stack(js[1]), state, params)
    expected = -(_run("mgda", js[0]) + _run("mgda", js[1])) / 2
    np.testing.assert_allclose(_flat(upd2), expected, rtol=1e-4, atol=1e-6)


def test_explicit_sharding_mesh(mesh8):
    """Task axis replicated, parameter axes sharded as the params: same numbers, output sharded like the params."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(10)
    g = {
        "w": jnp.asarray(rng.normal(size=(3, 16, 4)), jnp.float32),
        "v": jnp.asarray(rng.normal(size=(3, 2, 8)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
    }
    spec = {
        "w": NamedSharding(mesh8, P(None, "data", None)),
        "v": NamedSharding(mesh8, P(None, None, "data")),
        "b": NamedSharding(mesh8, P()),
    }
    gs = jax.device_put(g, spec)
    for name in ("upgrad",):
        agg = _AGGS[name]
        out, _ = jax.jit(agg.update)(gs, agg.init(None))
        ref, _ = jax.jit(agg.update)(g, agg.init(None))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), out, ref)
        assert out["w"].sharding.is_equivalent_to(NamedSharding(mesh8, P("data", None)), 2), name
        assert out["v"].sharding.is_equivalent_to(NamedSharding(mesh8, P(None, "data")), 2), name


@pytest.mark.parametrize("name", ["pcgrad", "gradvac", "rlw", "graddrop"])
def test_randomised_aggregators_under_inject_hyperparams(name):
    """inject_hyperparams turns the default int seed ``key=0`` into a scalar array; it must still seed the PRNG."""
    j = np.random.default_rng(11).normal(size=(3, 6)).astype(np.float32)
    params = jax.tree.map(lambda x: x[0], _stack(j))
    kwargs = {"num_tasks": 3} if name == "gradvac" else {}
    static = ("num_tasks",) if name == "gradvac" else ()
    tx = optax.inject_hyperparams(getattr(mtl, name), static_args=static)(**kwargs)
    out, _ = jax.jit(tx.update)(_stack(j), tx.init(params))
    ref = getattr(mtl, name)(**kwargs)
    expected, _ = ref.update(_stack(j), ref.init(params))
    np.testing.assert_allclose(_flat(out), _flat(expected), rtol=1e-6, atol=1e-6)
    # numpy integer seeds are seeds too
    agg = getattr(mtl, name)(key=np.int64(0), **kwargs)
    np.testing.assert_allclose(_flat(agg.update(_stack(j), agg.init(params))[0]), _flat(expected), rtol=1e-6)


# ----------------------------------------------------------------------------- behaviours pinned by mutation testing


def _orders_of(state, t):
    """The orders the next update draws from ``state.key`` (as in the sequential references above)."""
    _, sub = jax.random.split(state.key)
    return np.asarray(jax.vmap(lambda k: jax.random.permutation(k, t))(jax.random.split(sub, t)))


def test_pcgrad_draws_fresh_orders_at_every_step():
    """The key in the state advances: successive steps on the same gradients use new random orders (each matching
    the sequential reference), so an order-dependent result changes from step to step."""
    rng = np.random.default_rng(14)
    j = rng.normal(size=(4, 6)).astype(np.float32)
    agg = mtl.pcgrad(3)
    state = agg.init(None)
    upd = jax.jit(agg.update)
    outs = []
    for _ in range(8):
        ref = _pcgrad_ref(j.astype(np.float64), _orders_of(state, 4))
        out, state = upd(_stack(j), state)
        np.testing.assert_allclose(_flat(out), ref, rtol=1e-4, atol=1e-5)
        outs.append(np.round(_flat(out), 4))
    assert len({o.tobytes() for o in outs}) > 1


@pytest.mark.parametrize("beta", [0.1, 0.9])
def test_gradvac_ema_rate(beta):
    """phi_hat <- (1 - beta) phi_hat + beta phi: at beta != 0.5 the two weights are not interchangeable."""
    rng = np.random.default_rng(15)
    agg = mtl.gradvac(beta, num_tasks=3, key=4)
    state = agg.init(None)
    ema = np.zeros((3, 3))
    upd = jax.jit(agg.update)
    for _ in range(3):
        j = rng.normal(size=(3, 6)).astype(np.float32)
        ref, ema = _gradvac_ref(j.astype(np.float64), _orders_of(state, 3), ema, beta)
        out, state = upd(_stack(j), state)
        np.testing.assert_allclose(_flat(out), ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(state.ema, ema, rtol=1e-4, atol=1e-5)


def test_graddrop_keeps_the_positive_sign_with_probability_purity():
    """P = (1 + sum g / sum |g|) / 2 is the probability of keeping the positive components: with task values (3, -1)
    on every coordinate P = 3/4, with (1, -3) P = 1/4; the draws are fresh at every step."""
    n = 4000
    j = np.zeros((2, 4 + 2 * n), np.float32)
    j[:, 4 : 4 + n] = np.array([[3.0], [-1.0]])
    j[:, 4 + n :] = np.array([[1.0], [-3.0]])
    agg = mtl.graddrop(5)
    state = agg.init(None)
    upd = jax.jit(agg.update)
    firsts = []
    for _ in range(2):
        out, state = upd(_stack(j), state)
        b = np.asarray(out["b"])
        hi, lo = b[:n], b[n:]
        assert set(np.unique(hi)) <= {3.0, -1.0} and set(np.unique(lo)) <= {1.0, -3.0}
        # binomial standard deviation ~0.007: 0.04 is more than five of them
        np.testing.assert_allclose(np.mean(hi > 0), 0.75, atol=0.04)
        np.testing.assert_allclose(np.mean(lo > 0), 0.25, atol=0.04)
        firsts.append(hi.copy())
    assert not np.array_equal(firsts[0], firsts[1])  # a new draw per step
    # leak: leak * sum + (1 - leak) * kept
    half = _flat(mtl.graddrop(5, leak=0.5).update(_stack(j), mtl.graddrop(5).init(None))[0])
    kept = _flat(mtl.graddrop(5).update(_stack(j), mtl.graddrop(5).init(None))[0])
    np.testing.assert_allclose(half, 0.5 * j.sum(0) + 0.5 * kept, rtol=1e-6)


def test_rlw_weights_are_softmax_of_standard_normals():
    """log w_s - log w_t = z_s - z_t ~ N(0, 2) for z ~ N(0, I): checked over 4000 draws."""
    agg = mtl.rlw(0)
    base = agg.init(None)
    keys = jax.random.split(jax.random.key(16), 4000)
    eye = _stack(np.eye(3, 6, dtype=np.float32))
    w = np.asarray(jax.jit(jax.vmap(lambda k: agg.update(eye, base._replace(key=k))[0]["w"].reshape(-1)[:3]))(keys))
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-5)
    diff = np.log(w[:, 0].astype(np.float64)) - np.log(w[:, 1].astype(np.float64))
    assert abs(diff.mean()) < 0.1  # standard error ~0.022
    np.testing.assert_allclose(diff.var(), 2.0, rtol=0.1)  # standard error ~2.2%


def test_cagrad_rescale_variants():
    """The three output scales of the same direction d = g_0 + (c |g_0| / |g_w|) g_w: d (0), d / (1 + c^2) (1) and
    d / (1 + c) (2, checked against scipy above)."""
    j = np.random.default_rng(17).normal(size=(3, 6)).astype(np.float32)
    c = 0.8
    d2 = _apply(mtl.cagrad(c, rescale=2), j).astype(np.float64)
    np.testing.assert_allclose(_apply(mtl.cagrad(c, rescale=0), j), (1 + c) * d2, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_apply(mtl.cagrad(c, rescale=1), j), (1 + c) / (1 + c**2) * d2, rtol=1e-4, atol=1e-6)


_PREF = np.array([0.6, 0.1, 0.3])


def _dual_cone_weights(g, u, ridge):
    """SLSQP on the documented problem: min v^T (G / trace(G) + ridge I) v subject to v >= u."""
    q = g / np.trace(g) + ridge * np.eye(len(g))
    cons = [{"type": "ineq", "fun": lambda x: x - u, "jac": lambda x: np.eye(len(u))}]
    r = minimize(
        lambda x: x @ q @ x,
        u + 1.0,
        jac=lambda x: 2 * q @ x,
        constraints=cons,
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return r.x


def test_preference_vectors():
    """pref_vector p weights the combination: upgrad d = sum_t p_t pi_J(g_t), dualproj d = pi_J(J^T p), aligned_mtl
    d = J^T B p; on non-conflicting gradients the dual-cone methods give J^T p exactly."""
    rng = np.random.default_rng(18)
    aligned = np.abs(rng.normal(size=(3, 6))).astype(np.float32)
    for agg in (mtl.upgrad(pref_vector=_PREF), mtl.dualproj(pref_vector=_PREF)):
        np.testing.assert_allclose(_apply(agg, aligned), _PREF @ aligned, rtol=2e-3, atol=1e-4)
    j = rng.normal(size=(3, 6))
    j64 = j.astype(np.float32).astype(np.float64)
    g = j64 @ j64.T
    assert (g[np.triu_indices(3, 1)] < 0).any()  # some conflict, so the projections act
    up = sum(p * (j64.T @ _dual_cone_weights(g, np.eye(3)[t], 1e-4)) for t, p in enumerate(_PREF))
    dp = j64.T @ _dual_cone_weights(g, _PREF, 1e-4)
    scale = np.abs(j64).max()
    np.testing.assert_allclose(_apply(mtl.upgrad(pref_vector=_PREF), j), up, atol=2e-4 * scale)
    np.testing.assert_allclose(_apply(mtl.dualproj(pref_vector=_PREF), j), dp, atol=2e-4 * scale)
    lam, v = np.linalg.eigh(g)
    b = np.sqrt(lam.min()) * (v / np.sqrt(lam)) @ v.T
    np.testing.assert_allclose(_apply(mtl.aligned_mtl(pref_vector=_PREF), j), j64.T @ b @ _PREF, rtol=1e-3, atol=1e-4)
    for make in (mtl.upgrad, mtl.dualproj, mtl.aligned_mtl):
        with pytest.raises(ValueError, match="pref_vector"):
            _apply(make(pref_vector=np.ones(2)), j)
