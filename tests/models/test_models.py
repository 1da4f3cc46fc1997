"""Shapes, parameter splits, gates and functional use (split/merge, per-task VJPs, sharded jit) of every model."""

import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from corrjax.models import (
    CGC,
    HPS,
    MLP,
    MTAN,
    PLE,
    ConvBlock,
    CrossStitch,
    LeNet,
    MMoE,
    OMoE,
    ResNet,
    TaskSpec,
    count_params,
    shared_mask,
)

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
    "omoe": lambda r: OMoE(mlp(), TASKS, num_experts=3, gate_in_features=D, rngs=r),
    "cgc": lambda r: CGC(mlp(), TASKS, num_shared_experts=2, num_task_experts=1, gate_in_features=D, rngs=r),
    "ple": lambda r: PLE(
        mlp(), TASKS, num_levels=3, num_shared_experts=1, num_task_experts=2, gate_in_features=D, rngs=r
    ),
    "cross_stitch": lambda r: CrossStitch([partial(MLP, D, (8,)), partial(MLP, 8, (6,))], TASKS, rngs=r),
    # Seed 1: with seed 0's (stacked-head) initialisation all 4 ReLUs of the `size` tower are dead on X, so its
    # output is constant and the gradient-dependency test below has nothing to check.
    "cross_stitch_conv": lambda r: CrossStitch(
        [partial(ConvBlock, 1, 4), partial(ConvBlock, 4, 6)], TASKS, head_hidden=(4,), rngs=nnx.Rngs(1)
    ),
    "mtan": lambda r: MTAN([partial(MLP, D, (8,)), partial(MLP, 8, (6,))], TASKS, rngs=r),
    "mtan_conv": lambda r: MTAN([partial(ConvBlock, 1, 4), partial(ConvBlock, 4, 6, pool=False)], TASKS, rngs=r),
}
GATED = ("mmoe", "omoe", "cgc", "ple")


X = jax.random.normal(jax.random.key(1), (8, *IMG))
W = jax.random.normal(jax.random.key(2), (3, 8))


@pytest.fixture(scope="module")
def x():
    return X


@functools.cache
def built_outputs(name):
    """The model, its outputs, ``from_features(features)`` and per-task Jacobians, from ONE compiled function."""
    model = BUILDERS[name](nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def run(params, x):
        m = nnx.merge(graphdef, params, rest)
        jac = jax.jacrev(lambda p: task_losses(graphdef, p, rest, x, W))(params)
        return m(x), m.from_features(m.features(x), x), jac

    out, again, jac = jax.jit(run)(params, X)
    return name, model, out, again, jac


@pytest.fixture(
    scope="module",
    params=[pytest.param(k, marks=pytest.mark.slow) if "resnet" in k else k for k in sorted(BUILDERS)],
)
def built(request):
    return built_outputs(request.param)


def task_losses(graphdef, params, rest, x, w):
    """(T,) scalar per task: a random linear functional of each task's output (all outputs matter)."""
    out = nnx.merge(graphdef, params, rest)(x)
    return jnp.stack(
        [
            jnp.sum(out[t.name].reshape(x.shape[0], -1) * w[i][: out[t.name].size // x.shape[0]])
            for i, t in enumerate(TASKS)
        ]
    )


def test_output_shapes_and_identity(built):
    _name, _model, out, again, _jac = built
    assert set(out) == {t.name for t in TASKS}
    assert out["digit"].shape == (8, 4) and out["size"].shape == (8,) and out["flags"].shape == (8, 2)
    for v in out.values():
        assert v.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(v)))
    for k in out:
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(again[k]))


def _tasks_per_coordinate(g) -> tuple[int, int]:
    """``(tasks reaching the leaf, most tasks reaching one coordinate)`` from a per-task Jacobian leaf ``(T, ...)``."""
    reached = np.abs(np.asarray(g)).reshape(len(TASKS), -1) > 0
    return int(reached.any(axis=1).sum()), int(reached.sum(axis=0).max(initial=0))


def test_mask_matches_gradient_dependency(built):
    """A leaf is shared (True) iff two or more tasks' losses reach it, and task-specific (False) iff every coordinate
    is reached by exactly one task (a stacked head or gate holds one slice per task, an unstacked one is reached by
    one task), so the gradient of the summed loss is each slice's own task gradient."""
    name, model, _out, _again, jac = built
    params = nnx.state(model, nnx.Param)
    mask = shared_mask(model)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    flags = jax.tree.leaves(mask)
    assert all(isinstance(f, bool) for f in flags)
    deps = [_tasks_per_coordinate(g) for g in jax.tree.leaves(jac)]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(mask)]
    for path, flag, (dep, most) in zip(paths, flags, deps, strict=True):
        if flag:
            assert dep >= 2, f"{name}: {path} marked shared but reached by {dep} task(s)"
        else:
            assert dep >= 1 and most == 1, f"{name}: {path} marked task-specific but a coordinate has {most} tasks"
    counts = count_params(model)
    assert counts["total"] == sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert counts["shared"] + counts["task_specific"] == counts["total"] and counts["task_specific"] > 0


@pytest.mark.parametrize("name", GATED)
def test_gate_weights_sum_to_one(name, x):
    model = built_outputs(name)[1]
    gates = nnx.jit(lambda m, x: m.gate_weights(x))(model, x)
    assert set(gates) == {t.name for t in TASKS}
    for g in gates.values():
        assert g.ndim == 2 and g.shape[0] == 8
        assert bool(jnp.all(g >= 0))
        np.testing.assert_allclose(np.asarray(g.sum(-1)), 1.0, rtol=1e-6)


def test_mmoe_mixes_experts_by_gates(x):
    """MMoE's task representation is exactly the gate-weighted sum of the expert outputs (brute force)."""
    _, model, out, _, _ = built_outputs("mmoe")
    z = model.features(x)
    assert z.shape == (8, 3, 8)
    gates = model.gate_weights(x)
    for t in TASKS:
        mixed = sum(gates[t.name][:, e : e + 1] * model.experts[e](x) for e in range(3))
        np.testing.assert_allclose(
            np.asarray(model.heads[t.name](mixed)), np.asarray(out[t.name]), rtol=1e-5, atol=1e-6
        )


def test_omoe_mixes_experts_by_one_shared_gate(x):
    """OMoE: one gate for all tasks; each head reads the same gate-weighted sum of the experts (brute force)."""
    _, model, out, _, _ = built_outputs("omoe")
    gates = model.gate_weights(x)
    np.testing.assert_array_equal(np.asarray(gates[TASKS[0].name]), np.asarray(gates[TASKS[-1].name]))
    g = gates[TASKS[0].name]
    mixed = sum(g[:, e : e + 1] * model.experts[e](x) for e in range(3))
    for t in TASKS:
        np.testing.assert_allclose(
            np.asarray(model.heads[t.name](mixed)), np.asarray(out[t.name]), rtol=1e-5, atol=1e-6
        )
    mask = jax.tree.leaves(shared_mask(model))
    assert any(mask) and not all(mask)


def test_split_merge_roundtrip_and_per_task_vjp_sharded(mesh8, x):
    """A pure function of the params: per-task VJPs via vmap over one-hot cotangents, jitted with shardings, equal
    the per-task Jacobian rows of the unsharded model."""
    model = BUILDERS["mmoe"](nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    copy = nnx.merge(graphdef, params, rest)
    g2, p2, _ = nnx.split(copy, nnx.Param, ...)
    assert g2 == graphdef
    jax.tree.map(np.testing.assert_array_equal, p2, params)
    w = W

    def per_task_grads(params, x):
        losses, vjp = jax.vjp(lambda p: task_losses(graphdef, p, rest, x, w), params)
        return losses, jax.vmap(vjp)(jnp.eye(len(TASKS)))[0]

    repl = NamedSharding(mesh8, P())
    xs = jax.device_put(x, NamedSharding(mesh8, P("data")))
    ps = jax.device_put(params, repl)
    with jax.set_mesh(mesh8):
        losses, grads = jax.jit(per_task_grads, out_shardings=(repl, repl))(ps, xs)
    assert losses.shape == (len(TASKS),)
    # Reference: the per-task Jacobian of the same model (same seed), unsharded, from the `built` fixture's function.
    _, _, out, _, jac = built_outputs("mmoe")
    np.testing.assert_allclose(np.asarray(losses)[1], np.sum(np.asarray(out["size"])) * float(W[1, 0]), rtol=1e-5)
    for g, r, p in zip(jax.tree.leaves(grads), jax.tree.leaves(jac), jax.tree.leaves(params), strict=True):
        assert g.shape == (len(TASKS), *p.shape) and g.sharding.is_fully_replicated
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="input features"):
        HPS(mlp(), TASKS, rngs=nnx.Rngs(0))(jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="LeNet expects"):
        LeNet(IMG, channels=(4, 6), out_features=8, rngs=nnx.Rngs(0))(jnp.ones((2, 10, 10, 1)))
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


@pytest.mark.slow
def test_resnet_64px_and_jit():
    net = ResNet(3, widths=(4, 8), blocks_per_stage=1, stem_stride=2, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(net, jnp.ones((2, 64, 64, 3)))
    assert y.shape == (2, 8)


def test_cross_stitch_mixing_and_mtan_masks(x):
    cs = built_outputs("cross_stitch")[1]
    alpha = np.asarray(cs.stitches[0].alpha[...])
    np.testing.assert_allclose(alpha.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.diag(alpha), 0.9)
    z = cs.features(x)
    assert z.shape == (8, len(TASKS), 6)
    # Brute force: run the columns by hand with the stitch as an explicit matrix product.
    hs = [x] * 3
    for level in range(2):
        outs = [cs.columns[t.name][level](h) for t, h in zip(TASKS, hs, strict=True)]
        a = np.asarray(cs.stitches[level].alpha[...])
        hs = [sum(a[i, j] * outs[j] for j in range(3)) for i in range(3)]
    np.testing.assert_allclose(np.asarray(z), np.stack([np.asarray(h) for h in hs], 1), rtol=1e-5, atol=1e-6)

    mtan = built_outputs("mtan_conv")[1]
    masks = mtan.attention_masks(x)
    us = mtan.features(x)
    assert [u.shape for u in us] == [(8, 6, 6, 4), (8, 6, 6, 6)]
    for t in TASKS:
        assert [m.shape for m in masks[t.name]] == [u.shape for u in us]
        assert all(bool(jnp.all((m > 0) & (m < 1))) for m in masks[t.name])


@pytest.mark.parametrize("num_levels", [1, 2, 3])
@pytest.mark.parametrize("shared,task", [(0, 1), (0, 2), (2, 0)])
def test_ple_without_shared_or_task_experts(num_levels, shared, task):
    """`num_shared_experts=0` / `num_task_experts=0` are valid (each gate still has an expert): the model builds,
    gives the documented shapes, and its mask matches the per-task Jacobians (without shared experts every task's
    branch is its own at every level)."""
    model = PLE(
        mlp(), TASKS, num_levels=num_levels, num_shared_experts=shared, num_task_experts=task,
        gate_in_features=D, rngs=nnx.Rngs(0),
    )  # fmt: skip
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    out = model(X)
    assert out["digit"].shape == (8, 4) and out["size"].shape == (8,) and out["flags"].shape == (8, 2)
    gates = model.gate_weights(X)
    assert all(g.shape == (8, shared + task) for g in gates.values())
    jac = jax.jit(jax.jacrev(lambda p: task_losses(graphdef, p, rest, X, W)))(params)
    mask = shared_mask(model)
    for (path, flag), g in zip(jax.tree_util.tree_leaves_with_path(mask), jax.tree.leaves(jac), strict=True):
        dep, most = _tasks_per_coordinate(g)
        if dep == 0:  # a gate over a single expert (softmax of one logit is 1) has no gradient at all
            assert shared + task == 1 and "gates" in jax.tree_util.keystr(path)
        elif flag:
            assert dep >= 2, f"{jax.tree_util.keystr(path)} marked shared but reached by {dep} task(s)"
        else:
            assert most == 1, f"{jax.tree_util.keystr(path)} marked task-specific but a coordinate has {most} tasks"


def test_cross_stitch_applies_a_learned_asymmetric_mixing(x):
    """``h'_t = sum_s alpha[t, s] h_s`` for any ``alpha``, not only the symmetric initial one."""
    cs = BUILDERS["cross_stitch"](nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for stitch in cs.stitches:
        stitch.alpha[...] = jnp.asarray(rng.uniform(0.0, 1.0, (3, 3)), jnp.float32)
    hs = [x] * 3
    for level in range(2):
        outs = [cs.columns[t.name][level](h) for t, h in zip(TASKS, hs, strict=True)]
        a = np.asarray(cs.stitches[level].alpha[...])
        hs = [sum(a[i, j] * outs[j] for j in range(3)) for i in range(3)]
    z = cs.features(x)
    np.testing.assert_allclose(np.asarray(z), np.stack([np.asarray(h) for h in hs], 1), rtol=1e-5, atol=1e-6)


def test_count_params_of_shared_bottom():
    """HPS: the heads are the task-specific parameters, the trunk the shared ones."""
    model = HPS(partial(MLP, D, (16, 8)), TASKS, head_hidden=(4,), rngs=nnx.Rngs(0))
    size = lambda tree: sum(int(np.prod(p.shape)) for p in jax.tree.leaves(tree))
    counts = count_params(model)
    assert counts["task_specific"] == size(nnx.state(model.heads, nnx.Param))
    assert counts["shared"] == size(nnx.state(model.trunk, nnx.Param)) == (D * 16 + 16) + (16 * 8 + 8)
