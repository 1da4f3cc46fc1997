"""Tests of corrjax.mtl.weighting against NumPy reference loops and autodiff of the scalarised objectives."""

from __future__ import annotations

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from corrjax.mtl import weighting as W

T = 3
SHAPES = {"a": (4,), "b": (2, 3)}


def _stacked(rng: np.random.Generator, t: int = T, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: (scale * rng.standard_normal((t, *s))).astype(np.float32) for k, s in SHAPES.items()}


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(tree[k], np.float64).reshape(tree[k].shape[0], -1) for k in sorted(tree)], 1)


def _combine_ref(w: np.ndarray, g: dict) -> dict:
    return {k: np.tensordot(w, np.asarray(v, np.float64), axes=1) for k, v in g.items()}


def _params():
    return {k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()}


@functools.cache
def _jitted(name: str, **kw):
    tx = getattr(W, name)(T, **kw)
    return tx, jax.jit(tx.update)


losses_seq = hnp.arrays(np.float64, (5, T), elements=st.floats(0.05, 20.0))


def _run(name, losses, seed=0, **kw):
    """Runs the jitted transform over a sequence of losses; returns outputs, weights, grads and the final state."""
    tx, upd = _jitted(name, **kw)
    state = tx.init(_params())
    rng = np.random.default_rng(seed)
    outs, weights, grads = [], [], []
    for loss in losses:
        g = _stacked(rng)
        out, state = upd(g, state, None, task_losses=jnp.asarray(loss, jnp.float32))
        outs.append(out)
        weights.append(np.asarray(state.weights, np.float64))
        grads.append(g)
    return outs, weights, grads, state


def _check_outputs(outs, weights, grads):
    for out, w, g in zip(outs, weights, grads, strict=True):
        ref = _combine_ref(w, g)
        for k in SHAPES:
            np.testing.assert_allclose(np.asarray(out[k]), ref[k], rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Reference loops (NumPy, float64).


def _uw_ref(losses, lr):
    s = np.zeros(T)
    ws = []
    for loss in losses:
        w = 0.5 * np.exp(-s)
        ws.append(w)
        s = s - lr * (0.5 - w * loss)
    return ws, s


def _dwa_ref(losses, temp, period):
    windows, acc, ws = [], [], []
    for loss in losses:
        if len(windows) >= 2:
            r = windows[-1] / windows[-2]
            e = np.exp(r / temp - np.max(r / temp))
            ws.append(T * e / e.sum())
        else:
            ws.append(np.ones(T))
        acc.append(loss)
        if len(acc) == period:
            windows.append(np.mean(acc, axis=0))
            acc = []
    return ws


def _gradnorm_ref(losses, grads, alpha, lr):
    w = np.ones(T)
    l0 = None
    ws = []
    for loss, g in zip(losses, grads, strict=True):
        l0 = loss if l0 is None else l0
        n = np.linalg.norm(_flat(g), axis=1)
        ws.append(w.copy())
        gw = w * n
        r = (loss / l0) / np.mean(loss / l0)
        target = gw.mean() * r**alpha
        w = w - lr * np.sign(gw - target) * n
        w = np.maximum(w, np.finfo(np.float32).eps)
        w = T * w / w.sum()
    return ws


def _famo_ref(losses, lr, gamma, eps=1e-8):
    xi = np.zeros(T)
    m = np.zeros(T)
    v = np.zeros(T)
    k = 0
    prev = None
    ws = []
    for loss in losses:
        if prev is not None:
            delta = np.log(prev + eps) - np.log(loss + eps)
            z = np.exp(xi - xi.max())
            z /= z.sum()
            grad = z * (delta - z @ delta) + gamma * xi
            k += 1
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad**2
            xi = xi - lr * (m / (1 - 0.9**k)) / (np.sqrt(v / (1 - 0.999**k)) + 1e-8)
        z = np.exp(xi - xi.max())
        z /= z.sum()
        r = z / (loss + eps)
        ws.append(r / r.sum())
        prev = loss
    return ws


# ----------------------------------------------------------------------------------------------------------------------
# Each method against its reference.


@given(losses=losses_seq)
def test_uncertainty_weighting_matches_reference(losses):
    outs, weights, grads, state = _run("uncertainty_weighting", losses, learning_rate=0.1)
    ref_w, ref_s = _uw_ref(losses, 0.1)
    np.testing.assert_allclose(np.stack(weights), np.stack(ref_w), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state.log_vars), ref_s, rtol=1e-5, atol=1e-6)
    _check_outputs(outs, weights, grads)


def test_uncertainty_weighting_is_the_gradient_of_kendalls_objective():
    """Output = d/dtheta and the log-variance step = -lr d/ds of sum_t exp(-s_t) L_t / 2 + s_t / 2."""
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((T, 5)), jnp.float32)
    theta = jnp.asarray(rng.standard_normal(5), jnp.float32)
    s0 = jnp.asarray([0.3, -0.2, 0.1], jnp.float32)

    def task_losses(th):
        return jnp.sum((th[None, :] - a) ** 2, axis=1) + 0.1

    def objective(th, s):
        return jnp.sum(0.5 * jnp.exp(-s) * task_losses(th) + 0.5 * s)

    tx = W.uncertainty_weighting(T, learning_rate=0.5, init_log_vars=s0)

    @jax.jit
    def both(theta):
        out, state = tx.update(jax.jacrev(task_losses)(theta), tx.init(theta), theta, task_losses=task_losses(theta))
        return out, state.log_vars, jax.grad(objective, argnums=(0, 1))(theta, s0)

    out, log_vars, (g_th, g_s) = both(theta)
    np.testing.assert_allclose(out, g_th, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(log_vars, s0 - 0.5 * g_s, rtol=1e-5, atol=1e-6)


@given(losses=losses_seq, period=st.sampled_from([1, 2]))
def test_dwa_matches_reference(losses, period):
    outs, weights, grads, _ = _run("dwa", losses, temperature=2.0, period=period)
    ref = _dwa_ref(losses, 2.0, period)
    np.testing.assert_allclose(np.stack(weights), np.stack(ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.stack(weights).sum(1), T, rtol=1e-5)
    _check_outputs(outs, weights, grads)


@given(losses=losses_seq, alpha=st.sampled_from([0.0, 1.5]))
def test_gradnorm_matches_reference(losses, alpha):
    outs, weights, grads, state = _run("gradnorm", losses, alpha=alpha, learning_rate=0.01)
    ref = _gradnorm_ref(losses, grads, alpha, 0.01)
    np.testing.assert_allclose(np.stack(weights), np.stack(ref), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.initial_losses), losses[0], rtol=1e-6)
    _check_outputs(outs, weights, grads)


def test_gradnorm_weight_step_is_the_gradient_of_l_grad():
    rng = np.random.default_rng(2)
    g = _stacked(rng)
    w0 = jnp.ones(T)
    norms = jnp.asarray(np.linalg.norm(_flat(g), axis=1), jnp.float32)
    losses0 = jnp.asarray([1.0, 2.0, 3.0])
    losses1 = jnp.asarray([0.5, 1.9, 1.0])

    def l_grad(w, losses):
        gw = w * norms
        rel = losses / losses0
        target = jax.lax.stop_gradient(jnp.mean(gw) * (rel / rel.mean()) ** 1.5)
        return jnp.sum(jnp.abs(gw - target))

    tx = W.gradnorm(T, alpha=1.5, optimizer=optax.sgd(0.1))

    def renorm(w):
        w = jnp.maximum(w, 2**-23)
        return T * w / w.sum()

    @jax.jit
    def run():
        state = tx.init(_params())
        _, state1 = tx.update(g, state, task_losses=losses0)
        _, state2 = tx.update(g, state1, task_losses=losses1)
        w1 = renorm(w0 - 0.1 * jax.grad(l_grad)(w0, losses0))
        w2 = renorm(w1 - 0.1 * jax.grad(l_grad)(w1, losses1))
        return state1.task_weights, state2.task_weights, w1, w2

    got1, got2, w1, w2 = run()
    np.testing.assert_allclose(got1, w1, rtol=1e-5)
    np.testing.assert_allclose(got2, w2, rtol=1e-5)
    assert not np.allclose(w2, 1.0)  # the step did something
    assert np.all(np.asarray(got2) > 0)


@given(losses=losses_seq)
def test_famo_matches_reference(losses):
    outs, weights, grads, _ = _run("famo", losses, learning_rate=0.3, gamma=0.01)
    ref = _famo_ref(losses, 0.3, 0.01)
    np.testing.assert_allclose(np.stack(weights), np.stack(ref), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.stack(weights).sum(1), 1.0, rtol=1e-5)
    _check_outputs(outs, weights, grads)


def test_famo_update_is_the_gradient_of_its_log_objective():
    """sum_t w_t g_t = grad of sum_t z_t log(L_t) / c with c = sum z/L held constant (FAMO Alg. 1)."""
    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.standard_normal((T, 4)), jnp.float32)
    theta = jnp.asarray(rng.standard_normal(4), jnp.float32)
    losses_fn = lambda th: jnp.sum((th[None] - a) ** 2, axis=1) + 0.5
    tx = W.famo(T)

    @jax.jit
    def both(theta):
        out, state = tx.update(jax.jacrev(losses_fn)(theta), tx.init(theta), task_losses=losses_fn(theta))
        z = jax.nn.softmax(state.logits)
        c = jax.lax.stop_gradient(jnp.sum(z / losses_fn(theta)))
        return out, jax.grad(lambda th: jnp.sum(z * jnp.log(losses_fn(th))) / c)(theta)

    out, ref = both(theta)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_famo_raises_the_weight_of_the_slowest_task():
    tx = W.famo(2, learning_rate=0.1, gamma=0.0)
    upd = jax.jit(tx.update)
    state = tx.init(_params())
    g = _stacked(np.random.default_rng(0), t=2)
    loss = np.array([1.0, 1.0])
    for _ in range(20):
        _, state = upd(g, state, task_losses=jnp.asarray(loss))
        loss = loss * np.array([0.8, 0.99])  # task 0 decreases fast, task 1 slowly
    assert state.logits[1] > state.logits[0]


_A = np.random.default_rng(4).standard_normal((T, 4))
_THETA = np.random.default_rng(5).standard_normal(4)


def _shifted_quadratics(th, losses):
    """Task losses equal to ``losses`` at ``_THETA``, quadratic around it: ``|th - a_t|^2 - |_THETA - a_t|^2 + l_t``."""
    return jnp.sum((th[None] - _A) ** 2, axis=1) - jnp.sum((_THETA[None] - _A) ** 2, axis=1) + losses


@jax.jit
def _gm_reference(losses):
    """Autodiff gradient and Jacobian of the geometric-mean objective at ``_THETA`` (run under x64)."""
    theta = jnp.asarray(_THETA)
    grad = jax.grad(lambda th: jnp.exp(jnp.mean(jnp.log(_shifted_quadratics(th, losses)))))(theta)
    return grad, jax.jacrev(_shifted_quadratics)(theta, losses)


@given(losses=hnp.arrays(np.float64, (T,), elements=st.floats(0.01, 100.0)))
def test_geometric_mean_is_the_gradient_of_the_geometric_mean(losses):
    with jax.enable_x64(True):
        ref, jac = _gm_reference(jnp.asarray(losses))
        ref, jac = np.asarray(ref), np.asarray(jac)
    tx, upd = _jitted("geometric_mean")
    out, state = upd({"a": jnp.asarray(jac, jnp.float32)}, tx.init(None), None, task_losses=jnp.asarray(losses))
    # float32 gradients in, float32 out: compare at float32 precision of the largest term.
    scale = float(np.max(np.abs(np.asarray(jac))) * np.max(np.asarray(state.weights)))
    np.testing.assert_allclose(out["a"], ref, rtol=1e-5, atol=1e-6 * scale)
    gm = np.exp(np.mean(np.log(losses)))
    np.testing.assert_allclose(state.weights, gm / (T * losses), rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Shared behaviour of all five.

ALL = {
    "uncertainty_weighting": {},
    "dwa": {},
    "gradnorm": {},
    "famo": {},
    "geometric_mean": {},
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_single_task_reduces_to_its_gradient_up_to_the_documented_weight(name):
    tx = getattr(W, name)(1)
    state = tx.init(_params())
    g = _stacked(np.random.default_rng(5), t=1)
    for loss in (2.0, 1.5, 1.2):
        out, state = tx.update(g, state, task_losses=jnp.asarray([loss]))
        w = float(state.weights[0])
        # Uncertainty weighting scales by its current exp(-s)/2 (documented); the others give exactly g.
        assert w == pytest.approx(1.0, rel=1e-6) if name != "uncertainty_weighting" else 0 < w < 1
        for k in SHAPES:
            np.testing.assert_allclose(out[k], w * g[k][0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(ALL))
def test_reduce_false_keeps_the_task_axis_and_chains_in_front_of_a_sum(name):
    g = _stacked(np.random.default_rng(6))
    losses = jnp.asarray([1.0, 2.0, 0.5])
    tx_r = getattr(W, name)(T)
    tx_s = optax.chain(getattr(W, name)(T, reduce=False), _sum_over_tasks())
    out_r, _ = tx_r.update(g, tx_r.init(_params()), task_losses=losses)
    out_s, _ = tx_s.update(g, tx_s.init(_params()), task_losses=losses)
    for k in SHAPES:
        np.testing.assert_allclose(out_s[k], out_r[k], rtol=1e-6, atol=1e-6)


def _sum_over_tasks() -> optax.GradientTransformationExtraArgs:
    return optax.GradientTransformationExtraArgs(
        lambda p: optax.EmptyState(), lambda u, s, p=None, **kw: (jax.tree.map(lambda x: x.sum(0), u), s)
    )


@pytest.mark.parametrize("name", sorted(ALL))
def test_errors_name_the_argument(name):
    tx = getattr(W, name)(T)
    state = tx.init(_params())
    g = _stacked(np.random.default_rng(7))
    with pytest.raises(ValueError, match="task_losses"):
        tx.update(g, state)
    with pytest.raises(ValueError, match=r"task_losses.*\(2,\)"):
        tx.update(g, state, task_losses=jnp.ones(2))
    with pytest.raises(ValueError, match="leading task axis"):
        tx.update(_stacked(np.random.default_rng(7), t=2), state, task_losses=jnp.ones(T))
    with pytest.raises(ValueError, match="leading task axis"):
        tx.update({"a": jnp.ones((T, 2)), "b": jnp.ones((2, 2))}, state, task_losses=jnp.ones(T))
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="num_tasks"):
            getattr(W, name)(bad)


@pytest.mark.parametrize("name", sorted(ALL))
def test_nan_loss_propagates(name):
    tx = getattr(W, name)(T)
    state = tx.init(_params())
    g = _stacked(np.random.default_rng(8))
    upd = jax.jit(tx.update)
    losses = jnp.asarray([1.0, 2.0, 3.0])
    for _ in range(3):  # warm up the histories (DWA, FAMO, GradNorm read earlier losses)
        _, state = upd(g, state, task_losses=losses)
    outs = []
    for loss in ([1.0, np.nan, 3.0], losses, losses):  # the NaN step, then two steps that read it from history
        out, state = upd(g, state, task_losses=jnp.asarray(loss))
        outs.append(np.asarray(out["a"]))
    assert np.isnan(np.stack(outs)).any(), name
    if name != "geometric_mean":  # stateless: recovers at the next finite step; the others carry the NaN on
        assert not np.isfinite(np.asarray(state.weights)).all(), name


@pytest.mark.parametrize("name", sorted(ALL))
def test_chain_jit_bf16_abstract_init_and_inject_hyperparams(name):
    params = {k: jax.ShapeDtypeStruct(s, jnp.bfloat16) for k, s in SHAPES.items()}
    tx = optax.chain(getattr(W, name)(T), optax.sgd(0.1))
    state = jax.eval_shape(tx.init, params)  # abstract init
    state = tx.init({k: jnp.zeros(s, jnp.bfloat16) for k, s in SHAPES.items()})
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _stacked(np.random.default_rng(9)))
    out, state = jax.jit(tx.update)(g, state, None, task_losses=jnp.asarray([1.0, 2.0, 3.0]))
    assert {k: v.dtype for k, v in out.items()} == {k: jnp.bfloat16 for k in SHAPES}
    assert {k: v.shape for k, v in out.items()} == SHAPES

    injected = optax.inject_hyperparams(getattr(W, name), static_args=("num_tasks",))(num_tasks=T)
    s_inj = injected.init(_params())
    g32 = _stacked(np.random.default_rng(9))
    out_inj, _ = jax.jit(injected.update)(g32, s_inj, None, task_losses=jnp.asarray([1.0, 2.0, 3.0]))
    plain = getattr(W, name)(T)
    out_plain, _ = plain.update(g32, plain.init(_params()), task_losses=jnp.asarray([1.0, 2.0, 3.0]))
    for k in SHAPES:
        np.testing.assert_allclose(out_inj[k], out_plain[k], rtol=1e-6)


@pytest.mark.parametrize("name", sorted(ALL))
def test_state_can_be_donated(name):
    """Every state field is its own buffer (a shared buffer cannot be donated twice to a jitted step)."""
    tx = optax.chain(getattr(W, name)(T), optax.sgd(0.1))
    state = tx.init(_params())
    leaves = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
    assert len({id(x) for x in leaves}) == len(leaves)
    step = jax.jit(lambda g, s, losses: tx.update(g, s, None, task_losses=losses), donate_argnums=1)
    g = _stacked(np.random.default_rng(12))
    for _ in range(2):
        _, state = step(g, state, jnp.asarray([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("name", ["dwa", "geometric_mean"])
def test_permutation_equivariance(name):
    perm = np.array([2, 0, 1])
    rng = np.random.default_rng(10)
    tx = getattr(W, name)(T)
    s1, s2 = tx.init(_params()), tx.init(_params())
    for _ in range(4):
        g = _stacked(rng)
        loss = rng.uniform(0.1, 3.0, T)
        o1, s1 = tx.update(g, s1, task_losses=jnp.asarray(loss))
        o2, s2 = tx.update({k: v[perm] for k, v in g.items()}, s2, task_losses=jnp.asarray(loss[perm]))
        np.testing.assert_allclose(s2.weights, np.asarray(s1.weights)[perm], rtol=1e-6)
        for k in SHAPES:
            np.testing.assert_allclose(o2[k], o1[k], rtol=1e-5, atol=1e-6)


def test_sharding_is_kept_on_the_mesh(mesh8):
    g = {"w": jnp.asarray(np.random.default_rng(11).standard_normal((T, 16, 8)), jnp.float32)}
    losses = jnp.asarray([1.0, 2.0, 3.0])
    txs = {name: getattr(W, name)(T) for name in sorted(ALL)}

    def all_updates(g):  # one compilation for the five transforms
        return {n: tx.update(g, tx.init({"w": jnp.zeros((16, 8))}), task_losses=losses)[0] for n, tx in txs.items()}

    ref = jax.jit(all_updates)(g)
    with jax.set_mesh(mesh8):
        gs = jax.device_put(g, NamedSharding(mesh8, P(None, "data", None)))
        out = jax.jit(all_updates)(gs)
    for name in txs:
        assert out[name]["w"].sharding.spec == P("data", None), (name, out[name]["w"].sharding)
        np.testing.assert_allclose(out[name]["w"], ref[name]["w"], rtol=1e-5, atol=1e-6)


def test_dwa_period_validation():
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="period"):
            W.dwa(T, period=bad)


def test_outside_multisteps_accumulates_the_weighted_gradients():
    """Documented composition: the weighting runs per mini-step, MultiSteps averages its outputs over k mini-steps."""
    tx = optax.chain(
        W.geometric_mean(T), optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2).gradient_transformation()
    )
    params = _params()
    state = tx.init(params)
    rng = np.random.default_rng(13)
    grads = [_stacked(rng) for _ in range(2)]
    losses = [np.array([1.0, 2.0, 4.0]), np.array([0.5, 0.5, 2.0])]
    upd = jax.jit(lambda g, s, lo: tx.update(g, s, params, task_losses=lo))
    out0, state = upd(grads[0], state, jnp.asarray(losses[0]))
    out1, state = upd(grads[1], state, jnp.asarray(losses[1]))
    assert all(np.all(np.asarray(v) == 0) for v in out0.values())  # nothing applied before k mini-steps
    gm = [np.exp(np.mean(np.log(lo))) / (T * lo) for lo in losses]
    for k in SHAPES:
        ref = -0.5 * (_combine_ref(gm[0], grads[0])[k] + _combine_ref(gm[1], grads[1])[k])
        np.testing.assert_allclose(out1[k], ref, rtol=1e-5, atol=1e-6)


def test_famo_min_losses_shift_the_losses():
    """With known lower bounds m, FAMO works on D_t = L_t - m_t + eps: weights z_t / D_t (normalised) and logit
    steps from log D_t(prev) - log D_t(now); the same as the plain reference run on L - m."""
    lower = np.array([0.5, 0.0, 2.0])
    rng = np.random.default_rng(14)
    losses = lower + rng.uniform(0.05, 3.0, size=(5, T))
    tx = W.famo(T, learning_rate=0.3, gamma=0.01, min_losses=jnp.asarray(lower, jnp.float32))
    upd = jax.jit(tx.update)
    state = tx.init(_params())
    weights = []
    for loss in losses:
        _, state = upd(_stacked(rng), state, None, task_losses=jnp.asarray(loss, jnp.float32))
        weights.append(np.asarray(state.weights, np.float64))
    ref = _famo_ref(losses - lower, 0.3, 0.01)
    np.testing.assert_allclose(np.stack(weights), np.stack(ref), rtol=1e-4, atol=1e-6)
    # first step (uniform z): w_t proportional to 1 / (L_t - m_t)
    first = 1.0 / (losses[0] - lower)
    np.testing.assert_allclose(weights[0], first / first.sum(), rtol=1e-5)
