"""value_and_task_grad / value_and_rep_grad against jax.jacrev, the shared-mask glue, jit and the 8-device mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import corrjax.mtl as mtl


def _model(p, x, y):
    """A two-layer trunk with T=3 linear heads; per-task squared losses."""
    h = jnp.tanh(x @ p["trunk"]["w"] + p["trunk"]["b"])
    out = jnp.einsum("nd,tdo->tno", h, p["heads"])[..., 0]  # (T, n)
    return jnp.mean((out - y.T) ** 2, axis=1)


def _params(key, d=4, h=5, t=3):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "trunk": {"w": jax.random.normal(k1, (d, h)), "b": jax.random.normal(k2, (h,))},
        "heads": jax.random.normal(k3, (t, h, 1)),
    }


_vtg = jax.jit(mtl.value_and_task_grad(_model))
_jac = jax.jit(jax.jacrev(_model))


@settings(max_examples=8)
@given(st.integers(0, 2**31 - 1), st.sampled_from([None, 1, 2, 3, 7]))
def test_matches_jacrev(seed, task_batch_size):
    """Every grouping of the T = 3 pullbacks (one at a time, 2 + 1, all at once) equals jax.jacrev."""
    key = jax.random.key(seed)
    p = _params(key)
    x = jax.random.normal(jax.random.fold_in(key, 1), (6, 4))
    y = jax.random.normal(jax.random.fold_in(key, 2), (6, 3))
    vtg = _vtg if task_batch_size is None else jax.jit(mtl.value_and_task_grad(_model, task_batch_size=task_batch_size))
    losses, grads = vtg(p, x, y)
    np.testing.assert_allclose(losses, _model(p, x, y), rtol=1e-5, atol=1e-6)
    ref = _jac(p, x, y)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, ref)
    assert [g.shape for g in jax.tree.leaves(grads)] == [(3, *a.shape) for a in jax.tree.leaves(p)]


def test_argnums_tuple_has_aux_and_integer_cast():
    f = lambda a, b: (jnp.stack([jnp.sum(a * b), jnp.sum(a**2)]), {"aux": a.sum()})
    a, b = jnp.arange(3.0), jnp.ones(3)
    (losses, aux), (ga, gb) = mtl.value_and_task_grad(f, argnums=(0, 1), has_aux=True)(a, b)
    np.testing.assert_allclose(ga, np.stack([np.ones(3), 2 * np.arange(3.0)]))
    np.testing.assert_allclose(gb, np.stack([np.arange(3.0), np.zeros(3)]))
    assert float(aux["aux"]) == 3.0
    np.testing.assert_allclose(losses, [3.0, 5.0])


def test_single_task_equals_grad():
    f = lambda p: jnp.sum(jnp.sin(p))[None]
    p = jnp.linspace(0, 1, 5)
    _, g = mtl.value_and_task_grad(f)(p)
    assert g.shape == (1, 5)
    np.testing.assert_allclose(g[0], jax.grad(lambda q: f(q)[0])(p), rtol=1e-6)


def test_bad_outputs_raise():
    with pytest.raises(ValueError, match="1-D vector"):
        mtl.value_and_task_grad(lambda p: jnp.sum(p))(jnp.ones(3))
    with pytest.raises(ValueError, match="1-D vector"):
        mtl.value_and_task_grad(lambda p: jnp.outer(p, p))(jnp.ones(3))
    with pytest.raises(ValueError, match="argnums"):
        mtl.value_and_task_grad(lambda p: p, argnums=2)(jnp.ones(3))
    with pytest.raises(ValueError, match="shared"):
        mtl.value_and_task_grad(lambda p: p, shared={"nope": True})({"a": jnp.ones(2)})
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="task_batch_size"):
            mtl.value_and_task_grad(lambda p: p, task_batch_size=bad)
    with pytest.raises(ValueError, match="leading task axis"):
        mtl.mean().update({"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))}, mtl.mean().init(None))


MASK = {"trunk": True, "heads": False}


@pytest.mark.parametrize("task_batch_size", [None, 2, 3])
def test_shared_mask_heads_get_summed_gradient(task_batch_size):
    p = _params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, 4))
    y = jax.random.normal(jax.random.key(2), (6, 3))
    _, grads = jax.jit(mtl.value_and_task_grad(_model, shared=MASK, task_batch_size=task_batch_size))(p, x, y)
    ref = _jac(p, x, y)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads["trunk"], ref["trunk"])
    assert grads["heads"].shape == p["heads"].shape  # no task axis
    np.testing.assert_allclose(grads["heads"], ref["heads"].sum(0), rtol=1e-4, atol=1e-5)
    # head t only receives task t's gradient
    for t in range(3):
        np.testing.assert_allclose(grads["heads"][t], ref["heads"][t, t], rtol=1e-4, atol=1e-5)


def test_shared_only_without_a_shared_leaf_passes_the_gradients_through():
    # Nothing reached by two tasks (e.g. PLE without shared experts): the aggregator would see an empty pytree.
    grads = {"a": jnp.arange(3.0), "b": jnp.ones((2, 2))}
    for agg in (mtl.pcgrad(), mtl.upgrad(), mtl.uncertainty_weighting(num_tasks=2)):
        tx = optax.chain(mtl.shared_only(agg, {"a": False, "b": False}), optax.sgd(1.0))
        upd, _ = jax.jit(lambda g, s, tx=tx: tx.update(g, s, g, task_losses=jnp.ones(2)))(grads, tx.init(grads))
        jax.tree.map(lambda u, g: np.testing.assert_array_equal(u, -g), upd, grads)


def test_shared_only_glue_in_chain_with_adam():
    p = _params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, 4))
    y = jax.random.normal(jax.random.key(2), (6, 3))
    tx = optax.chain(mtl.shared_only(mtl.pcgrad(), MASK), optax.sgd(1.0))
    state = tx.init(p)

    @jax.jit
    def step_and_reference(p, x, y, state):
        _, grads = mtl.value_and_task_grad(_model, shared=MASK)(p, x, y)
        upd, _ = tx.update(grads, state, p)
        full = jax.jacrev(_model)(p, x, y)
        ref_trunk, _ = mtl.pcgrad().update(full["trunk"], state[0].inner_state)
        return upd, ref_trunk, full

    upd, ref_trunk, full = step_and_reference(p, x, y, state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, -b, rtol=1e-4, atol=1e-5), upd["trunk"], ref_trunk)
    np.testing.assert_allclose(upd["heads"], -full["heads"].sum(0), rtol=1e-4, atol=1e-5)


def test_rep_grad_matches_manual():
    p = _params(jax.random.key(3))
    x = jax.random.normal(jax.random.key(4), (6, 4))
    y = jax.random.normal(jax.random.key(5), (6, 3))
    trunk = lambda tp, x, y: jnp.tanh(x @ tp["w"] + tp["b"])
    heads = lambda hp, z, x, y: jnp.mean((jnp.einsum("nd,tdo->tno", z, hp)[..., 0] - y.T) ** 2, axis=1)

    @jax.jit
    def step(p, x, y):
        losses, rg = mtl.value_and_rep_grad(trunk, heads)(p["trunk"], p["heads"], x, y)
        dz, _ = mtl.mean().update(rg.rep, optax.EmptyState())
        return losses, rg.rep, rg.pullback(dz), rg.heads

    losses, rep, trunk_g, head_g = step(p, x, y)
    z = trunk(p["trunk"], x, y)
    ref_rep = jax.jacrev(heads, argnums=1)(p["heads"], z, x, y)
    np.testing.assert_allclose(rep, ref_rep, rtol=1e-4, atol=1e-6)
    # mean of rep grads pulled back == gradient of the mean loss w.r.t. the trunk
    ref = jax.grad(lambda q: jnp.mean(_model(q, x, y)))(p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), trunk_g, ref["trunk"])
    np.testing.assert_allclose(head_g, 3 * ref["heads"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(losses, _model(p, x, y), rtol=1e-5)


def test_sharded_batch_on_mesh(mesh8):
    """Batch sharded over the 8-device mesh, params replicated: task grads equal the unsharded ones."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    p = _params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, 4))
    y = jax.random.normal(jax.random.key(2), (16, 3))
    xs = jax.device_put(x, NamedSharding(mesh8, P("data", None)))
    ys = jax.device_put(y, NamedSharding(mesh8, P("data", None)))
    pr = jax.device_put(p, NamedSharding(mesh8, P()))
    _, g = _vtg(pr, xs, ys)
    _, g_ref = _vtg(p, x, y)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g, g_ref)


def test_flax_nnx_state_with_shared_mask():
    """nnx.split params + a bool mask of the same State structure (as corrjax.models.shared_mask returns)."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.trunk = nnx.Linear(4, 8, rngs=rngs)
            self.heads = nnx.List([nnx.Linear(8, 1, rngs=rngs) for _ in range(3)])

        def __call__(self, x):
            z = jnp.tanh(self.trunk(x))
            return jnp.concatenate([h(z) for h in self.heads], axis=1)

    graphdef, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
    mask = jax.tree_util.tree_map_with_path(lambda path, _: "trunk" in str(path[0]), params)
    x = jax.random.normal(jax.random.key(0), (5, 4))
    y = jax.random.normal(jax.random.key(1), (5, 3))

    def losses(p, x, y):
        return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2, axis=0)

    _, g = jax.jit(mtl.value_and_task_grad(losses, shared=mask))(params, x, y)
    ref = jax.jit(jax.jacrev(losses))(params, x, y)
    np.testing.assert_allclose(g["trunk"]["kernel"][...], ref["trunk"]["kernel"][...], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g["heads"][1]["kernel"][...], ref["heads"][1]["kernel"][...][1], rtol=1e-4, atol=1e-6)
    tx = optax.chain(mtl.shared_only(mtl.upgrad(), mask), optax.sgd(1.0))
    upd, _ = jax.jit(tx.update)(g, tx.init(params), params)
    assert upd["trunk"]["kernel"][...].shape == (4, 8) and upd["heads"][0]["kernel"][...].shape == (8, 1)


def test_conv_trunk_groupings_agree():
    """A convolutional trunk (whose T-batched backward pass XLA's CPU runtime runs slowly, hence the per-task
    default there): per-task, grouped and all-at-once pullbacks give jax.jacrev's task gradients."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    params = {"conv": jax.random.normal(k1, (3, 3, 2, 4)) * 0.3, "head": jax.random.normal(k2, (4 * 4 * 4, 5)) * 0.1}
    x = jax.random.normal(k3, (3, 8, 8, 2))
    y = jax.random.normal(k4, (3, 5))

    def losses(p, x, y):
        h = jax.lax.conv_general_dilated(x, p["conv"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        z = jnp.tanh(h).reshape(x.shape[0], -1) @ p["head"]
        return jnp.mean((z - y) ** 2, axis=0)

    ref = jax.jacrev(losses)(params, x, y)
    for tbs in (None, 1, 2, 5):
        _, grads = jax.jit(mtl.value_and_task_grad(losses, task_batch_size=tbs))(params, x, y)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref)
