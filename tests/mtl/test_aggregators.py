"""Aggregators against closed forms, brute-force NumPy references and scipy QPs; degenerate inputs; Optax plumbing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

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
        out, _ = agg.update(g, agg.init(None))
        assert out["w"].dtype == jnp.bfloat16 and out["b"].dtype == jnp.float32


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
