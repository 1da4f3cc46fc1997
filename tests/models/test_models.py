"""Shapes, parameter splits, gates and functional use (split/merge, per-task VJPs, sharded jit) of every model."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from corrjax.models import CGC, HPS, MLP, PLE, LeNet, MMoE, ResNet, TaskSpec, count_params, shared_mask

TASKS = (
    TaskSpec("digit", "classification", 4),
    TaskSpec("size", "regression", 1),
    TaskSpec("flags", "binary", 2),
)
IMG = (12, 12, 1)
D = 144


def mlp(width=8):
    return partial(MLP, D, (width,))


BUILDERS = {
    "hps_mlp": lambda r: HPS(partial(MLP, D, (16, 8)), TASKS, head_hidden=(4,), rngs=r),
    "hps_lenet": lambda r: HPS(partial(LeNet, IMG, channels=(4, 6), out_features=8), TASKS, rngs=r),
    "hps_resnet": lambda r: HPS(partial(ResNet, 1, widths=(4, 8), blocks_per_stage=1), TASKS, rngs=r),
    "mmoe": lambda r: MMoE(mlp(), TASKS, num_experts=3, gate_in_features=D, tower_hidden=(4,), rngs=r),
    "cgc": lambda r: CGC(mlp(), TASKS, num_shared_experts=2, num_task_experts=1, gate_in_features=D, rngs=r),
    "ple": lambda r: PLE(
        mlp(), TASKS, num_levels=3, num_shared_experts=1, num_task_experts=2, gate_in_features=D, rngs=r
    ),
}
GATED = ("mmoe", "cgc", "ple")


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(1), (8, *IMG))


@pytest.fixture(
    scope="module",
    params=[pytest.param(k, marks=pytest.mark.slow) if "resnet" in k else k for k in sorted(BUILDERS)],
)
def built(request):
    return request.param, BUILDERS[request.param](nnx.Rngs(0))


def task_losses(graphdef, params, rest, x, w):
    """(T,) scalar per task: a random linear functional of each task's output (all outputs matter)."""
    out = nnx.merge(graphdef, params, rest)(x)
    return jnp.stack(
        [
            jnp.sum(out[t.name].reshape(x.shape[0], -1) * w[i][: out[t.name].size // x.shape[0]])
            for i, t in enumerate(TASKS)
        ]
    )


def test_output_shapes_and_identity(built, x):
    _name, model = built
    out = model(x)
    assert set(out) == {t.name for t in TASKS}
    assert out["digit"].shape == (8, 4) and out["size"].shape == (8,) and out["flags"].shape == (8, 2)
    for v in out.values():
        assert v.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(v)))
    again = model.from_features(model.features(x), x)
    for k in out:
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(again[k]))


def test_mask_matches_gradient_dependency(built, x):
    """A leaf is task-specific (False) iff exactly one task's loss has a nonzero gradient on it."""
    name, model = built
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    w = jax.random.normal(jax.random.key(2), (len(TASKS), 8))
    jac = jax.jit(jax.jacrev(partial(task_losses, graphdef), argnums=0))(params, rest, x, w)
    mask = shared_mask(model)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    flags = jax.tree.leaves(mask)
    assert all(isinstance(f, bool) for f in flags)
    deps = [int(np.sum(np.abs(np.asarray(g)).reshape(len(TASKS), -1).max(axis=1) > 0)) for g in jax.tree.leaves(jac)]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(mask)]
    for path, flag, dep in zip(paths, flags, deps, strict=True):
        if flag:
            assert dep >= 2, f"{name}: {path} marked shared but reached by {dep} task(s)"
        else:
            assert dep == 1, f"{name}: {path} marked task-specific but reached by {dep} task(s)"
    counts = count_params(model)
    assert counts["total"] == sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert counts["shared"] + counts["task_specific"] == counts["total"] and counts["task_specific"] > 0


@pytest.mark.parametrize("name", GATED)
def test_gate_weights_sum_to_one(name, x):
    model = BUILDERS[name](nnx.Rngs(3))
    gates = model.gate_weights(x)
    assert set(gates) == {t.name for t in TASKS}
    for g in gates.values():
        assert g.ndim == 2 and g.shape[0] == 8
        assert bool(jnp.all(g >= 0))
        np.testing.assert_allclose(np.asarray(g.sum(-1)), 1.0, rtol=1e-6)


def test_mmoe_mixes_experts_by_gates(x):
    """MMoE's task representation is exactly the gate-weighted sum of the expert outputs (brute force)."""
    model = BUILDERS["mmoe"](nnx.Rngs(4))
    z = model.features(x)
    assert z.shape == (8, 3, 8)
    gates = model.gate_weights(x)
    for t in TASKS:
        mixed = sum(gates[t.name][:, e : e + 1] * model.experts[e](x) for e in range(3))
        np.testing.assert_allclose(
            np.asarray(model.heads[t.name](mixed)), np.asarray(model(x)[t.name]), rtol=1e-5, atol=1e-6
        )


def test_split_merge_roundtrip_and_per_task_vjp_sharded(mesh8):
    """A pure function of the params: per-task VJPs via vmap over one-hot cotangents, jitted with shardings."""
    model = BUILDERS["mmoe"](nnx.Rngs(5))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    xb = jax.random.normal(jax.random.key(6), (16, *IMG))
    w = jax.random.normal(jax.random.key(7), (len(TASKS), 16))
    ref = nnx.merge(graphdef, params, rest)(xb)
    np.testing.assert_array_equal(np.asarray(ref["digit"]), np.asarray(model(xb)["digit"]))

    def per_task_grads(params, x):
        losses, vjp = jax.vjp(lambda p: task_losses(graphdef, p, rest, x, w), params)
        return losses, jax.vmap(vjp)(jnp.eye(len(TASKS)))[0]

    repl = NamedSharding(mesh8, P())
    xs = jax.device_put(xb, NamedSharding(mesh8, P("data")))
    ps = jax.device_put(params, repl)
    with jax.set_mesh(mesh8):
        losses, grads = jax.jit(per_task_grads, out_shardings=(repl, repl))(ps, xs)
    ref_losses, ref_grads = per_task_grads(params, xb)
    np.testing.assert_allclose(np.asarray(losses), np.asarray(ref_losses), rtol=1e-5)
    for g, r, p in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), jax.tree.leaves(params), strict=True):
        assert g.shape == (len(TASKS), *p.shape)
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)
    # Each task's VJP is the gradient of that task's loss alone.
    g0 = jax.grad(lambda p: task_losses(graphdef, p, rest, xb, w)[0])(params)
    for g, r in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(np.asarray(g[0]), np.asarray(r), rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="input features"):
        HPS(mlp(), TASKS, rngs=nnx.Rngs(0))(jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="LeNet expects"):
        LeNet(IMG, rngs=nnx.Rngs(0))(jnp.ones((2, 10, 10, 1)))
    with pytest.raises(ValueError, match="duplicate"):
        HPS(mlp(), (TASKS[0], TASKS[0]), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="out_features"):
        HPS(lambda rngs: nnx.Dropout(0.1, rngs=rngs), TASKS, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_experts"):
        MMoE(mlp(), TASKS, num_experts=0, gate_in_features=D, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_outputs"):
        TaskSpec("t", "classification", 1)
    with pytest.raises(ValueError, match="kind"):
        TaskSpec("t", "ranking", 2)


def test_resnet_64px_and_jit():
    net = ResNet(3, widths=(4, 8), blocks_per_stage=1, stem_stride=2, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(net, jnp.ones((2, 64, 64, 3)))
    assert y.shape == (2, 8)
