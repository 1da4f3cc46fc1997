"""The remaining aggregators against exact float64 references on the hard classes of issue 16, and float32 checks.

The classes, the error bound ``|d - d_ref| <= rtol |d_ref| + atol S`` and the Nash / IMTL-G / CAGrad references are
those of ``test_exact.py`` (loaded from its file: ``--import-mode=importlib`` puts no package on ``sys.path``).
Every aggregator runs as an Optax transformation under ``jit`` on a two-leaf task-stacked pytree (the Jacobian's
columns split into a ``(T, k)`` and a ``(T, 1, d - k)`` leaf). The references are NumPy float64 from the Jacobian;
the random aggregators' references take their draws (orders, weights, uniforms) from the state's raw key data through
the same ``jax.random`` calls, and compute everything else themselves. The ``"wide"`` class is zero-padded to the
other classes' width (``_padded``) so each aggregator compiles once per ``T``; float32 runs Nash-MTL, IMTL-G and
CAGrad against the float64 references at the 1e-4 bound, skipping (with the measured error) the two Nash-MTL classes
whose ridged cosine matrix is too ill-conditioned for a float32 Gramian to reach it (see ``F32_SKIP``).
"""

import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import corrjax.mtl as mtl
from corrjax.mtl.aggregators import cagrad_weighting, imtl_g_weighting, nash_mtl_weighting

_spec = importlib.util.spec_from_file_location("_corrjax_test_exact_refs", Path(__file__).with_name("test_exact.py"))
_ex = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ex)
_jacobian, _close, TOL, KINDS = _ex._jacobian, _ex._close, _ex.TOL, _ex.KINDS
_nash_ref, _imtl_ref, _cagrad_certificate = _ex._nash_ref, _ex._imtl_ref, _ex._cagrad_certificate

TS = (2, 3, 5, 8, 16, pytest.param(32, marks=pytest.mark.slow))
SEEDS = (0, 1)

# ----------------------------------------------------------------------------- plumbing


def _tree(j, dtype):
    """The Jacobian's columns as a task-stacked pytree of two leaves of different shapes (``b`` is empty at d = 1)."""
    k = (j.shape[1] + 1) // 2
    jd = np.asarray(j, dtype)  # sliced in NumPy: eager JAX slicing would compile per shape
    return {"a": jnp.asarray(jd[:, :k]), "b": jnp.asarray(jd[:, k:].reshape(j.shape[0], 1, -1))}


def _flat(out):
    """The aggregated pytree back as one float64 vector (the leaves' order is ``a``, ``b``)."""
    assert out["a"].ndim == 1 and out["b"].ndim == 2 and out["b"].shape[0] == 1
    return np.concatenate([np.asarray(out["a"], np.float64), np.asarray(out["b"], np.float64).ravel()])


_JIT = {}


def _agg(name, t, **kw):
    """A jitted ``(updates, state) -> (updates, state)`` of an aggregator (built once per name / T / options; jit
    caches the compilation per shape and dtype) and its initial state."""
    key = (name, t, tuple(sorted(kw.items())))
    if key not in _JIT:
        tx = mtl.gradvac(kw.get("beta", 0.5), num_tasks=t) if name == "gradvac" else getattr(mtl, name)()
        _JIT[key] = (jax.jit(tx.update), tx.init)
    return _JIT[key]


def _run(name, j, dtype=np.float64, state=None, **kw):
    upd, init = _agg(name, j.shape[0], **kw)
    out, state = upd(_tree(j, dtype), init(None) if state is None else state)
    return _flat(out), state


def _graddrop(tree, state, leak):
    """GradDrop with ``leak`` traced (one compilation for every leak)."""
    f = _JIT.setdefault(("graddrop",), jax.jit(lambda u, s, leak: mtl.graddrop(leak=leak).update(u, s)))
    return f(tree, state, leak)


def _weighted(j, w):
    f = _JIT.setdefault(("weighted",), jax.jit(lambda u, w: mtl.weighted(w).update(u, optax.EmptyState())[0]))
    return _flat(f(_tree(j, np.float64), jnp.asarray(w)))


@jax.jit
def _sub(key_data):
    """The typed subkey an update draws from (``split_key`` of the state's raw ``uint32`` key data)."""
    return jax.random.split(jax.random.wrap_key_data(key_data))[1]


@functools.partial(jax.jit, static_argnums=1)
def _permutations(key_data, t):
    return jax.vmap(lambda k: jax.random.permutation(k, t))(jax.random.split(_sub(key_data), t))


@functools.partial(jax.jit, static_argnums=1)
def _uniform(key, shape):
    return jax.random.uniform(key, shape, dtype=jnp.float32)


@functools.partial(jax.jit, static_argnums=1)
def _normal(key_data, t):
    """RLW's float32 draw ``z`` from the state's key."""
    return jax.random.normal(_sub(key_data), (t,), jnp.float32)


def _orders(key_data, t):
    """PCGrad's / GradVac's ``(T, T)`` orders: row ``i`` is a permutation of the tasks, from the state's key (split
    ``T`` ways, one ``jax.random.permutation`` each; batched, which draws the same as T unbatched calls)."""
    return np.asarray(_permutations(jnp.asarray(key_data), t))


def _padded(seed, t, kind):
    """``_jacobian`` with the ``"wide"`` class (``d = T // 2``) zero-padded to ``d = T + 3`` columns (the others'
    width), so every class shares one compilation per ``T``. ``G = J J^T`` (rank ``<= T // 2 < T``), hence a Gramian
    aggregator's weights, are the unpadded Jacobian's, and the extra coordinates stay 0 (GradDrop: coordinates with
    every component 0 stay 0). Mean / sum run the unpadded shapes."""
    j = _jacobian(seed, t, kind)
    return np.pad(j, ((0, 0), (0, t + 3 - j.shape[1])))


def _key(seed):
    return jax.random.key_data(jax.random.key(seed))


def _scale(w, j):
    return np.abs(w) @ np.linalg.norm(j, axis=1)


# ----------------------------------------------------------------------------- float64 references


def _pcgrad_ref(j, orders):
    """PCGrad in vectors (Algorithm 1): ``g_i' -= (g_i' . g_j / |g_j|^2) g_j`` when negative, in the given orders."""
    out = np.zeros(j.shape[1])
    for i in range(len(j)):
        gi = j[i].copy()
        for k in orders[i]:
            nk = j[k] @ j[k]
            dot = gi @ j[k]
            if nk > 0 and dot < 0:
                gi = gi - dot / nk * j[k]
        out += gi
    return out


def _gradvac_ref(j, orders, ema, beta):
    """GradVac in vectors: raise ``cos(g_i', g_k)`` to the target ``ema[i, k]`` when below; EMA-update the target."""
    out, ema = np.zeros(j.shape[1]), ema.copy()
    norms = np.linalg.norm(j, axis=1)
    for i in range(len(j)):
        gi = j[i].copy()
        for k in orders[i]:
            if k == i:
                continue
            ni = np.linalg.norm(gi)
            phi = gi @ j[k] / (ni * norms[k]) if ni * norms[k] > 0 else 0.0
            tgt = ema[i, k]
            s_phi, s_tgt = np.sqrt(max(1 - phi**2, 0.0)), np.sqrt(max(1 - tgt**2, 0.0))
            if phi < tgt and norms[k] * s_tgt > 0:
                gi = gi + ni * (tgt * s_phi - phi * s_tgt) / (norms[k] * s_tgt) * j[k]
            ema[i, k] = (1 - beta) * tgt + beta * phi
        out += gi
    return out, ema


def _aligned_ref(j, p):
    """Aligned-MTL from the SVD of ``J``: ``d = J^T B p = sqrt(lambda_min) V_k U_k^T p`` over the eigenvalues of
    ``G = J J^T`` above ``max(lambda) T eps``; also returns ``w = B p`` and the kept eigenvalues' distance (in factors)
    from the cut and the condition number of the kept eigenvalues."""
    t = len(j)
    u, s, vt = np.linalg.svd(j, full_matrices=False)
    lam = np.zeros(t)
    lam[: len(s)] = s**2
    cut = lam.max() * t * np.finfo(np.float64).eps
    keep = lam[: len(s)] > cut
    if not np.any(keep):
        return j.T @ p, p, np.inf, 1.0
    s_min = s[keep].min()
    d = s_min * vt[keep].T @ (u[:, keep].T @ p)
    w = s_min * u[:, keep] @ ((u[:, keep].T @ p) / s[keep])
    live = lam[lam > 0]
    margin = np.min(np.abs(np.log10(live / cut))) if live.size else np.inf
    return d, w, margin, lam.max() / s_min**2


def _graddrop_ref(tree, key_data, leak):
    """GradDrop per coordinate in float64: purity ``P`` from the leaf, uniforms from the state's key (one subkey per
    leaf, in ``jax.tree`` order), ``leak * total + (1 - leak) * ([P > U] pos + [P < U] neg)``."""
    leaves = jax.tree.leaves(tree)
    keys = jax.random.split(_sub(key_data), len(leaves))
    outs = []
    for leaf, lk in zip(leaves, keys, strict=True):
        x = np.asarray(leaf, np.float64)
        pos, neg = np.maximum(x, 0).sum(0), np.minimum(x, 0).sum(0)
        total, mass = pos + neg, pos - neg
        p = 0.5 * (1 + total / np.where(mass > 0, mass, 1.0))
        u = np.asarray(_uniform(lk, p.shape), np.float64)
        kept = np.where(p > u, pos, 0.0) + np.where(p < u, neg, 0.0)
        outs.append((leak * total + (1 - leak) * kept).ravel())
    return np.concatenate(outs)


# ----------------------------------------------------------------------------- float64: fixed scalarisations


@pytest.mark.parametrize("t", TS)
def test_mean_sum_weighted_exact(x64, t):
    tol = TOL[np.float64]
    for kind in KINDS:
        for seed in SEEDS:
            j = _jacobian(seed, t, kind)
            for name, w in (("mean", np.full(t, 1.0 / t)), ("sum", np.ones(t))):
                d, _ = _run(name, j)
                _close(d, j.T @ w, _scale(w, j), tol, f"{name} {kind}")
            w = np.random.default_rng(seed).normal(size=t) * 10.0 ** (np.arange(t) - t // 2)  # signed, spread
            _close(_weighted(j, w), j.T @ w, _scale(w, j), tol, f"weighted {kind}")


@pytest.mark.parametrize("t", TS)
def test_rlw_exact_with_the_states_key(x64, t):
    tol = TOL[np.float64]
    for kind in KINDS:
        j = _padded(3, t, kind)
        upd, init = _agg("rlw", t)
        state = init(None)._replace(key=_key(t))
        for _ in range(2):  # two steps: the state's key advances
            z = np.asarray(_normal(state.key, t), np.float64)
            w = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            out, new = upd(_tree(j, np.float64), state)
            _close(_flat(out), j.T @ w, _scale(w, j), tol, f"rlw {kind}")
            assert not np.array_equal(np.asarray(new.key), np.asarray(state.key))
            state = new


# ----------------------------------------------------------------------------- float64: gradient surgery


@pytest.mark.parametrize("t", TS)
def test_pcgrad_exact_in_the_states_orders(x64, t):
    tol = TOL[np.float64]
    for kind in KINDS:
        for seed in SEEDS:
            j = _padded(seed, t, kind)
            upd, init = _agg("pcgrad", t)
            state = init(None)._replace(key=_key(100 + seed))
            out, _ = upd(_tree(j, np.float64), state)
            d_ref = _pcgrad_ref(j, _orders(state.key, t))
            # every g_i' is no longer than g_i: S = sum_i |g_i| bounds the rounding of the sum
            _close(_flat(out), d_ref, np.linalg.norm(j, axis=1).sum(), tol, f"pcgrad {kind} seed {seed}")


def test_pcgrad_two_tasks_order_free(x64):
    """T = 2: the order does not matter; conflicting pairs give the closed form of the paper's Fig. 1."""
    for seed in range(4):
        j = _jacobian(seed, 2, "generic")
        if j[0] @ j[1] > 0:  # reflect g_1's component along g_0: a conflicting pair
            j[1] -= 2 * (j[0] @ j[1]) / (j[0] @ j[0]) * j[0]
        assert j[0] @ j[1] < 0
        g0, g1 = j
        d_ref = (g0 - (g0 @ g1) / (g1 @ g1) * g1) + (g1 - (g0 @ g1) / (g0 @ g0) * g0)
        for key in (0, 1, 2):
            upd, init = _agg("pcgrad", 2)
            out, _ = upd(_tree(j, np.float64), init(None)._replace(key=_key(key)))
            _close(_flat(out), d_ref, np.linalg.norm(j, axis=1).sum(), TOL[np.float64], f"seed {seed}")


@pytest.mark.parametrize("t", TS)
def test_gradvac_exact_in_the_states_orders_and_targets(x64, t):
    tol, beta = TOL[np.float64], 0.5
    for kind in KINDS:
        j = _padded(5, t, kind)
        upd, init = _agg("gradvac", t, beta=beta)
        state = init(None)._replace(key=_key(200 + t))
        ema = np.zeros((t, t))
        for step in range(2):  # step 0: targets 0 (PCGrad's test); step 1: the EMA targets of step 0
            d_ref, ema = _gradvac_ref(j, _orders(state.key, t), ema, beta)
            out, state = upd(_tree(j, np.float64), state)
            _close(_flat(out), d_ref, np.linalg.norm(j, axis=1).sum(), tol, f"gradvac {kind} step {step}")
            np.testing.assert_allclose(np.asarray(state.ema), ema, rtol=0, atol=1e-7, err_msg=f"{kind} {step}")


# ----------------------------------------------------------------------------- float64: Aligned-MTL, GradDrop


@pytest.mark.parametrize("t", TS)
def test_aligned_mtl_matches_svd(x64, t):
    tol, p = TOL[np.float64], np.full(t, 1.0 / t)
    checked = 0
    for kind in KINDS:
        done = 0
        for seed in range(4):  # the first two seeds of each class whose spectrum is clear of the rank cut
            j = _padded(seed, t, kind)
            d_ref, w_ref, margin, cond = _aligned_ref(j, p)
            if margin < 1.0 or done == 2:  # an eigenvalue within 10x of the cut: kept or dropped by rounding
                continue
            d, _ = _run("aligned_mtl", j)
            # d = sqrt(lambda_min) (...): the rounding of G (eps lambda_max) moves lambda_min, and its eigenvector, by
            # eps cond relative, cond = lambda_max / lambda_min (near-duplicates at 1e-6: cond ~ 1e12; measured
            # excess error up to 0.76 eps cond |d_ref|, T = 2 .. 32)
            rtol = tol + 4 * np.finfo(np.float64).eps * cond
            _close(d, d_ref, _scale(w_ref, j), rtol, f"aligned_mtl {kind} seed {seed} cond {cond:.1e}")
            done += 1
        checked += done
    assert checked >= len(KINDS)


@pytest.mark.parametrize("t", TS)
@pytest.mark.parametrize("leak", [0.0, 0.25])
def test_graddrop_exact_with_the_states_uniforms(x64, t, leak):
    tol = TOL[np.float64]
    for kind in KINDS:
        j = _padded(7, t, kind)
        tree = _tree(j, np.float64)
        state = mtl.graddrop().init(None)._replace(key=_key(300 + t))
        for _ in range(2):
            out, new = _graddrop(tree, state, leak)
            d_ref = _graddrop_ref(tree, state.key, leak)
            # elementwise: each coordinate is a sum of some of the T components
            err = np.abs(_flat(out) - d_ref)
            bound = tol * np.abs(d_ref) + tol * np.abs(j).sum(0)  # the coordinates are J's columns, in order
            assert np.all(err <= bound), f"graddrop {kind}: max err / bound {np.max(err / bound):.3e}"
            state = new


# ----------------------------------------------------------------------------- float32: Nash-MTL, IMTL-G, CAGrad

# Classes float32 cannot bring to 1e-4 (skipped from the T given). Nash-MTL's ridge 1e-6 on the cosine matrix sets
# cond(C + ridge I) to 2e6 - 5e6 in both classes, while a float32 Gramian carries C only to ~6e-8 relative, so no solver
# that sees the float32 Gramian can do better than ~6e-8 * 3e6 ~ 0.2 relative on the small-eigenvalue part of the
# answer: an exact float64 Newton solve of the float32 Gramian (the test's own Jacobians, seed 21) misses by err / bound
# 0.07, 0.75, 4.6, 1.6 (wide, T = 3, 5, 8, 16) and 1.5, 1.3, 3.3, 9.9 (stationary), and random 6e-8-relative
# perturbations of the exact cosine matrix by up to 0.3, 0.7, 26, 1.4 and 1.4, 11, 2.0, 7.0. (The same perturbation of
# the Jacobian itself moves the answer by at most 0.42 of the bound: the information is lost in forming J J^T in
# float32, the squaring of the normal equations, not in the problem.) IMTL-G near stationarity passes since it is
# solved in the paper's difference form (measured <= 5e-3 of the bound). Everything else passes, measured <= 1e-2 of
# the bound except Nash wide T = 5 (0.56), Nash stationary T = 2 (0.62) and IMTL-G near-duplicates (0.1 - 0.5, its
# bound amplified by sum|a| / |sum a| as in test_exact).
_COND = "float32 Gramian: cond(C + 1e-6 I) ~ 2e6 - 5e6 times its 6e-8 rounding exceeds 1e-4; "
F32_SKIP = {
    ("nash", "wide"): (
        8,
        _COND + "T > d, C singular (an exact float64 solve of the float32 Gramian: err / bound 4.6, 1.6 at T = 8, 16; "
        "measured float32 3.2e1, 2.4)",
    ),
    ("nash", "stationary"): (
        3,
        _COND + "0 in the hull up to 1e-6, C's smallest eigenvalue ~1e-12 (an exact float64 solve of the float32 "
        "Gramian: err / bound 1.5, 1.3, 3.3, 9.9 at T = 3, 5, 8, 16; measured float32 1.8, 9.6, 2.2, 4.2)",
    ),
}


def _f32_weights(name, g, **kw):
    """Jitted Gramian -> weights (the weighting is built outside ``jit``: CAGrad validates ``c`` in Python)."""
    key = ("f32", name, tuple(sorted(kw.items())))
    if key not in _JIT:
        wt = {
            "nash": lambda: nash_mtl_weighting(**kw),
            "imtl": imtl_g_weighting,
            "cagrad": lambda: cagrad_weighting(kw["c"], rescale=0),
        }[name]()
        _JIT[key] = jax.jit(lambda g: wt.update(g, None, g.shape[0])[0])
    return np.asarray(_JIT[key](g), np.float64)


def _f32_case(name, t, kind):
    t_min, reason = F32_SKIP.get((name, kind), (np.inf, ""))
    if t >= t_min:
        pytest.skip(reason)


F32_TS = (2, 5, 16, pytest.param(3, marks=pytest.mark.slow), pytest.param(8, marks=pytest.mark.slow))


def _f32_err(name, t, kind):
    """``(err, bound)`` of the float32 aggregator's direction against the float64 reference on the rounded Jacobian."""
    tol = TOL[np.float32]
    if name == "nash":
        j = _jacobian(21, t, kind, dup=1e-3)
        ridge = 0.0 if kind in ("generic", "scales", "near_dup", "zero") else 1e-6
        j = np.asarray(np.float32(j), np.float64)
        w = _f32_weights("nash", mtl.task_gramian(_tree(j, np.float32)), reg_eps=ridge)
        d, d_ref = j.T @ w, _nash_ref(j, ridge)
        return np.linalg.norm(d - d_ref), tol * np.linalg.norm(d_ref) + tol * np.sqrt(t)
    if name == "imtl":
        j = np.asarray(np.float32(_jacobian(31, t, kind, dup=1e-4)), np.float64)
        w = _f32_weights("imtl", mtl.task_gramian(_tree(j, np.float32)))
        d_ref, amplify = _imtl_ref(j)
        d = j.T @ w
        return np.linalg.norm(d - d_ref), tol * amplify * (
            np.linalg.norm(d_ref) + np.abs(w) @ np.linalg.norm(j, axis=1)
        )
    j = _jacobian(41, t, kind, dup=1e-4)
    if kind == "stationary":
        j = _jacobian(41, t, "generic") * 1e-3 + j  # near, not at, stationarity (as in test_exact)
    j = np.asarray(np.float32(j), np.float64)
    with jax.enable_x64(True):
        a_ref = _f32_weights("cagrad", jnp.asarray(j @ j.T), c=0.5)
    d_ref, _, primal, dual, _ = _cagrad_certificate(j, a_ref, 0.5)
    scale = np.linalg.norm(j, axis=1).max() * np.linalg.norm(j.mean(0))
    resolvable = np.linalg.norm(_ex._min_norm_ref(j)[1]) > 1e-9 * np.linalg.norm(j, axis=1).max()
    if resolvable and np.sum(a_ref - 1.0 / t) > 1e-6:  # the float64 answer is certified (test_exact's conditions)
        assert abs(dual - primal) <= 1e-9 * scale, (kind, (dual - primal) / scale)
    a = _f32_weights("cagrad", mtl.task_gramian(_tree(j, np.float32)), c=0.5)
    d = j.T @ a
    return np.linalg.norm(d - d_ref), tol * np.linalg.norm(d_ref) + tol * (np.abs(a_ref) @ np.linalg.norm(j, axis=1))


@pytest.mark.parametrize("t", F32_TS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["nash", "imtl", "cagrad"])
def test_float32_reaches_1e4_of_the_float64_reference(name, kind, t):
    _f32_case(name, t, kind)
    err, bound = _f32_err(name, t, kind)
    assert err <= bound, f"{name} {kind} T={t}: |d - d_ref| = {err:.3e} > {bound:.3e}"


# ----------------------------------------------------------------------------- property: drawn keys and Jacobians


@given(st.sampled_from((2, 3, 5, 8)), st.sampled_from(KINDS), st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1))
def test_surgery_property(t, kind, seed, key):
    """PCGrad and GradVac (two steps) on drawn Jacobians and keys: one compilation per T, shared with the tests
    above."""
    with jax.enable_x64(True):
        j = _padded(seed, t, kind)
        s_norm = np.linalg.norm(j, axis=1).sum()
        upd, init = _agg("pcgrad", t)
        state = init(None)._replace(key=_key(key))
        out, _ = upd(_tree(j, np.float64), state)
        _close(_flat(out), _pcgrad_ref(j, _orders(state.key, t)), s_norm, TOL[np.float64], f"pcgrad {kind}")
        upd, init = _agg("gradvac", t, beta=0.5)
        state, ema = init(None)._replace(key=_key(key)), np.zeros((t, t))
        for step in range(2):
            d_ref, ema = _gradvac_ref(j, _orders(state.key, t), ema, 0.5)
            out, state = upd(_tree(j, np.float64), state)
            _close(_flat(out), d_ref, s_norm, TOL[np.float64], f"gradvac {kind} step {step}")
