"""Tests of corrjax.mtl.diagnostics against brute-force NumPy/SciPy references."""

from __future__ import annotations

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy.spatial.distance import cosine as scipy_cosine_distance

from corrjax.mtl import diagnostics as D

SHAPES = {"k": (3, 2), "b": (2,)}
_diag = jax.jit(D.gradient_diagnostics)
_cosine = jax.jit(D.task_gradient_cosine)
_conflict = jax.jit(D.conflict_fraction)
_ratios = jax.jit(D.gradient_norm_ratios)


def _tree(flat: np.ndarray) -> dict[str, np.ndarray]:
    """Splits a ``(T, 8)`` matrix into the task-stacked pytree with leaves ``(T, 3, 2)`` and ``(T, 2)``."""
    t = flat.shape[0]
    return {"k": flat[:, :6].reshape(t, 3, 2).astype(np.float32), "b": flat[:, 6:].astype(np.float32)}


def _flat(tree) -> np.ndarray:
    t = tree["k"].shape[0]
    return np.concatenate([np.asarray(tree["k"], np.float64).reshape(t, -1), np.asarray(tree["b"], np.float64)], 1)


# Entries are 0 or of magnitude >= 1e-3: squares of float32 values below ~1e-19 underflow in any float32 Gramian.
_ELEMENTS = st.one_of(st.just(0.0), st.floats(2**-10, 10, width=32), st.floats(-10, -(2**-10), width=32))
_TASKS = st.sampled_from([2, 3, 5])


@st.composite
def task_grads(draw):
    t = draw(_TASKS)
    flat = draw(hnp.arrays(np.float64, (t, 8), elements=_ELEMENTS))
    zero = draw(hnp.arrays(bool, (t,)))
    flat[zero] = 0.0  # whole zero task gradients
    if draw(st.booleans()) and t > 1:
        flat[1] = flat[0] * draw(st.sampled_from([1.0, 2.0, -1.0]))  # identical / parallel / opposite gradients
    return _tree(flat)


def _reference(flat: np.ndarray) -> dict[str, np.ndarray]:
    t = flat.shape[0]
    norms = np.linalg.norm(flat, axis=1)
    cos = np.full((t, t), np.nan)
    sim = np.full((t, t), np.nan)
    for i in range(t):
        for j in range(t):
            if norms[i] > 0 and norms[j] > 0:
                cos[i, j] = 1.0 - scipy_cosine_distance(flat[i], flat[j])
            if norms[i] ** 2 + norms[j] ** 2 > 0:
                sim[i, j] = 2 * norms[i] * norms[j] / (norms[i] ** 2 + norms[j] ** 2)
    pairs = [(i, j) for i in range(t) for j in range(i + 1, t)]
    conflict = np.mean([flat[i] @ flat[j] < 0 for i, j in pairs]) if pairs else np.nan
    ratios = norms / norms.mean() if norms.mean() > 0 else np.full(t, np.nan)
    return {
        "cosine": cos,
        "conflict_fraction": conflict,
        "norms": norms,
        "norm_ratios": ratios,
        "magnitude_similarity": sim,
        "gramian": flat @ flat.T,
    }


@settings(max_examples=20)
@given(g=task_grads())
def test_diagnostics_match_brute_force(g):
    flat = _flat(g)
    out = _diag(g)
    ref = _reference(flat)
    scale = max(1.0, float(np.max(np.abs(flat))) ** 2)
    np.testing.assert_allclose(out["gramian"], ref["gramian"], rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(out["norms"], ref["norms"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["norm_ratios"], ref["norm_ratios"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["magnitude_similarity"], ref["magnitude_similarity"], rtol=1e-5, atol=1e-6)
    # Cosine: float32 Gramian entries lose ~1e-7 * |g_i||g_j| absolutely, so compare with that resolution.
    np.testing.assert_allclose(out["cosine"], ref["cosine"], rtol=0, atol=2e-5)
    assert np.all(np.isnan(out["cosine"]) == np.isnan(ref["cosine"]))
    cos = np.asarray(out["cosine"])
    defined = ~np.isnan(np.diag(cos))
    assert np.all(np.diag(cos)[defined] == 1.0)
    assert np.all(np.abs(cos[~np.isnan(cos)]) <= 1.0)
    # The conflict fraction is decided by the sign of the dot product: check it away from ties at float32 resolution.
    gram = ref["gramian"]
    tie = np.abs(gram) <= 1e-5 * scale
    if not tie[np.triu_indices(gram.shape[0], 1)].any():
        np.testing.assert_allclose(out["conflict_fraction"], ref["conflict_fraction"])


def test_single_functions_agree_with_the_bundle():
    g = _tree(np.random.default_rng(0).standard_normal((4, 8)))
    out = _diag(g)
    np.testing.assert_allclose(_cosine(g), out["cosine"], rtol=1e-6)
    np.testing.assert_allclose(_conflict(g), out["conflict_fraction"])
    np.testing.assert_allclose(jax.jit(D.task_gradient_norms)(g), out["norms"], rtol=1e-6)
    np.testing.assert_allclose(_ratios(g), out["norm_ratios"], rtol=1e-6)
    np.testing.assert_allclose(jax.jit(D.gradient_magnitude_similarity)(g), out["magnitude_similarity"], rtol=1e-6)


def test_closed_forms():
    e = np.eye(8)
    # Orthogonal: cosine I, no conflict, equal norms.
    out = _diag(_tree(e[:3]))
    np.testing.assert_array_equal(out["cosine"], np.eye(3))
    assert float(out["conflict_fraction"]) == 0.0
    np.testing.assert_array_equal(out["norm_ratios"], np.ones(3))
    # Opposite pair plus an orthogonal one: one conflicting pair out of three.
    out = _diag(_tree(np.stack([e[0], -3 * e[0], e[1]])))
    assert float(out["cosine"][0, 1]) == -1.0
    np.testing.assert_allclose(out["conflict_fraction"], 1 / 3)
    np.testing.assert_allclose(out["norm_ratios"], np.array([1, 3, 1]) / (5 / 3), rtol=1e-6)
    np.testing.assert_allclose(out["magnitude_similarity"][0, 1], 2 * 3 / 10, rtol=1e-6)


def test_degenerate_inputs():
    one = _tree(np.arange(8.0)[None])
    assert np.asarray(_cosine(one)).tolist() == [[1.0]]
    assert np.isnan(_conflict(one))
    zeros = _tree(np.zeros((2, 8)))
    assert np.all(np.isnan(_cosine(zeros)))
    assert float(_conflict(zeros)) == 0.0
    assert np.all(np.isnan(_ratios(zeros)))
    flat = np.random.default_rng(1).standard_normal((3, 8))
    flat[1, 2] = np.nan
    out = _diag(_tree(flat))
    assert np.all(np.isnan(np.asarray(out["cosine"])[1]))
    assert np.isnan(out["conflict_fraction"])
    assert np.all(np.isnan(out["norm_ratios"]))
    assert np.isfinite(out["cosine"][0, 2])


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="task_grads"):
        D.task_gradient_cosine({"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))})
    with pytest.raises(ValueError, match="task_grads"):
        D.conflict_fraction({})


def test_dtypes_vmap_and_integer_input():
    flat = np.random.default_rng(2).standard_normal((3, 8))
    g16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _tree(flat))
    out = _diag(g16)
    assert out["cosine"].dtype == jnp.float32
    ref = _reference(_flat(jax.tree.map(lambda x: np.asarray(x, np.float64), g16)))
    np.testing.assert_allclose(out["cosine"], ref["cosine"], atol=1e-5)
    batch = jax.tree.map(lambda x: jnp.stack([x, -x]), _tree(flat))
    cos = jax.jit(jax.vmap(D.task_gradient_cosine))(batch)
    np.testing.assert_allclose(cos[0], cos[1], rtol=1e-6)
    gi = {"k": jnp.asarray([[1, 2], [-2, 1]])}
    np.testing.assert_allclose(_cosine(gi), np.eye(2), atol=1e-7)


def test_sharded_over_the_mesh(mesh8):
    g = {"w": jnp.asarray(np.random.default_rng(3).standard_normal((3, 16, 4)), jnp.float32), "b": jnp.ones((3, 8))}
    ref = _diag(g)
    with jax.set_mesh(mesh8):
        gs = {
            "w": jax.device_put(g["w"], NamedSharding(mesh8, P(None, "data", None))),
            "b": jax.device_put(g["b"], NamedSharding(mesh8, P(None, "data"))),
        }
        out = jax.jit(D.gradient_diagnostics)(gs)
    for k in ref:
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-6)
    assert out["cosine"].sharding.is_fully_replicated


# ----------------------------------------------------------------------------------------------------------------------
# TAG inter-task affinity.

_X = np.random.default_rng(4).standard_normal((16, 3))
_Y = np.random.default_rng(5).standard_normal((16, 3))


def _loss_fn(params, x, y):
    """Three regression tasks on a shared tanh trunk with linear heads: ``L_t = mean((tanh(x W) h_t - y_t)^2)``."""
    z = jnp.tanh(x @ params["trunk"])
    return jnp.mean((z @ params["heads"] - y) ** 2, axis=0)


_PARAMS = {
    "trunk": jnp.asarray(np.random.default_rng(6).standard_normal((3, 4)), jnp.float32),
    "heads": jnp.asarray(np.random.default_rng(7).standard_normal((4, 3)), jnp.float32),
}


@functools.cache
def _grads():
    return jax.jit(jax.jacrev(_loss_fn))(_PARAMS, _X, _Y)


def _np_losses(params) -> np.ndarray:
    """``_loss_fn`` in NumPy float64."""
    z = np.tanh(_X @ np.asarray(params["trunk"], np.float64))
    return np.mean((z @ np.asarray(params["heads"], np.float64) - _Y) ** 2, axis=0)


def _brute_tag(params, grads, lr, shared):
    base = _np_losses(params)
    t = base.shape[0]
    z = np.zeros((t, t))
    for i in range(t):
        moved = {k: np.asarray(params[k]) - lr * np.asarray(grads[k][i]) if shared[k] else params[k] for k in params}
        z[i] = 1.0 - _np_losses(moved) / base
    return z


@pytest.mark.parametrize("heads_shared", [True, False])
def test_tag_affinity_matches_brute_force(heads_shared):
    grads = _grads()
    shared = {"trunk": True, "heads": heads_shared}
    tag = jax.jit(lambda p, g: D.tag_affinity(_loss_fn, p, g, _X, _Y, learning_rate=0.01, shared=shared))
    z = tag(_PARAMS, grads)
    ref = _brute_tag(_PARAMS, grads, 0.01, shared)
    np.testing.assert_allclose(z, ref, rtol=1e-4, atol=1e-5)
    # A small step on task i lowers its own loss (positive diagonal); the shared trunk couples the tasks.
    assert np.all(np.diag(np.asarray(z)) > 0)
    assert np.all(np.abs(np.asarray(z)[~np.eye(3, dtype=bool)]) > 1e-6)


def test_tag_affinity_first_order_and_update_fn():
    """For a small SGD step, Z[i, j] ~ lr <g_i, g_j> / L_j (first-order Taylor expansion)."""
    grads = _grads()
    lr = 1e-4
    base = jax.jit(_loss_fn)(_PARAMS, _X, _Y)
    sgd = lambda g: jax.tree.map(lambda x: -lr * x, g)
    z = jax.jit(lambda p, g: D.tag_affinity(_loss_fn, p, g, _X, _Y, update_fn=sgd))(_PARAMS, grads)
    flat = np.concatenate([np.asarray(grads[k], np.float64).reshape(3, -1) for k in ("heads", "trunk")], 1)
    first_order = lr * (flat @ flat.T) / np.asarray(base, np.float64)[None, :]
    np.testing.assert_allclose(z, first_order, rtol=2e-2, atol=1e-6)
    z_given = jax.jit(lambda p, g, b: D.tag_affinity(_loss_fn, p, g, _X, _Y, learning_rate=lr, task_losses=b))(
        _PARAMS, grads, base
    )
    np.testing.assert_allclose(z_given, z, rtol=1e-5, atol=1e-7)


def test_tag_affinity_zero_loss_and_bad_input():
    grads = _grads()
    tag = jax.jit(lambda p, g, b: D.tag_affinity(_loss_fn, p, g, _X, _Y, task_losses=b))
    z = tag(_PARAMS, grads, jnp.asarray([1.0, 0.0, 1.0]))
    assert np.all(np.isnan(np.asarray(z)[:, 1])) and np.all(np.isfinite(np.asarray(z)[:, [0, 2]]))
    with pytest.raises(ValueError, match="structure"):
        D.tag_affinity(_loss_fn, _PARAMS, {"trunk": grads["trunk"]}, _X, _Y)
    with pytest.raises(ValueError, match="shared"):
        D.tag_affinity(_loss_fn, _PARAMS, grads, _X, _Y, shared={"trunk": True})
    with pytest.raises(ValueError, match=r"\(3,\)"):
        D.tag_affinity(_loss_fn, _PARAMS, grads, _X, _Y, task_losses=jnp.ones(2))
