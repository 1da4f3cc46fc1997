"""Accelerator readiness of the train step: mixed precision (bf16/f16 compute, float32 parameters and optimiser
state, dynamic loss scaling), gradient accumulation exact against the whole-batch step, ``mtl.task_batch_size`` and
its memory estimate, and the task Gramian computed once for the diagnostics and the aggregator."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf

import corrjax.mtl
from corrjax.data import TaskSpec
from corrjax.models import shared_mask
from corrjax.train import accumulate, builders, config, optimizer, precision, state, step, tasks

from .test_steps import CONFIGS, REG, _batch

T3 = tuple(TaskSpec(f"t{i}", "regression", 1) for i in range(3))


def _build(mtl="mean", specs=REG, dtype=None, lr=0.05, opt="adam", hidden=16, **step_kw):
    model_cfg = OmegaConf.merge(OmegaConf.load(CONFIGS / "model" / "hps.yaml"), {"backbone": {"hidden": [hidden]}})
    model = builders.build_model(model_cfg, specs, (6,), seed=0, dtype=dtype, param_dtype=jnp.float32)
    mask = shared_mask(model)
    graphdef, params, rest = state.split_model(model)
    mtl_cfg = OmegaConf.create({"_target_": f"corrjax.mtl.{mtl}"})
    opt_cfg = OmegaConf.create({"_target_": f"optax.{opt}", "learning_rate": lr})
    tx = optimizer.build_optimizer(mtl_cfg, opt_cfg, mask, len(specs))
    fn = step.make_train_step(graphdef, specs, tasks.task_loss_fns(specs), tx, mask, **step_kw)
    scale = step_kw.get("loss_scale")
    st0 = state.create_state(params, rest, tx, seed=0, loss_scale=None if scale is None else scale.init())
    return fn, st0, model


def _num_shared(params, mask):
    return sum(int(np.size(p)) for p, f in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True) if f)


def _dtypes(tree):
    return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


# --- precision policy -------------------------------------------------------------------------------------------


def test_resolve_precision_auto_and_bad_key():
    auto = OmegaConf.create({"compute_dtype": "auto", "param_dtype": "auto"})
    assert precision.resolve_precision(auto, backend="cpu") == (jnp.float32, jnp.float32)
    assert precision.resolve_precision(auto, backend="gpu") == (jnp.bfloat16, jnp.float32)
    f16 = precision.resolve_precision(OmegaConf.create({"compute_dtype": "float16"}), backend="tpu")
    assert f16 == (jnp.float16, jnp.float32) and f16.loss_scaling
    assert not precision.resolve_precision(auto, backend="gpu").loss_scaling
    with pytest.raises(ValueError, match=r"`parallel.compute_dtype`='fp8'"):
        precision.resolve_precision(OmegaConf.create({"compute_dtype": "fp8"}))


def test_loss_scale_schedule():
    ls = precision.DynamicLossScale(initial_scale=8.0, growth_interval=2, min_scale=2.0)
    s = ls.init()
    seq = []
    for finite in (True, True, True, False, False, False, True):
        s = ls.adjust(s, jnp.asarray(finite))
        seq.append((float(s.scale), int(s.good_steps)))
    assert seq == [(8, 1), (16, 0), (16, 1), (8, 0), (4, 0), (2, 0), (2, 1)]
    with pytest.raises(ValueError, match="growth_interval"):
        precision.DynamicLossScale(growth_interval=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_trains_with_float32_params_and_state(dtype):
    dt = jnp.dtype(dtype)
    scale = precision.DynamicLossScale(initial_scale=2.0**8, growth_interval=2) if dt == jnp.float16 else None
    fn, st0, model = _build(mtl="pcgrad", dtype=dt, loss_scale=scale)
    z = model.features(_batch()["x"])
    assert z.dtype == dt  # the layers compute in the half dtype
    train = jax.jit(fn)
    s, seen = st0, []
    for _ in range(6):
        s, m = train(s, _batch())
        seen.append(float(m["train/loss"]))
        assert m["train/loss"].dtype == jnp.float32 and m["train/grad_cosine"].dtype == jnp.float32
    assert np.isfinite(seen).all() and seen[-1] < 0.9 * seen[0], seen
    assert _dtypes(s.params) == {"float32"} and _dtypes(s.opt_state) <= {"float32"}
    if scale is not None:
        assert int(s.nonfinite_total) == 0 and float(s.loss_scale.scale) == 2.0**11  # grew every 2 finite steps
        assert float(m["train/loss_scale"]) == 2.0**10  # the scale the last step used


def test_float16_overflow_is_skipped_and_the_scale_halves():
    scale = precision.DynamicLossScale(initial_scale=2.0**40, growth_interval=100)
    fn, st0, _ = _build(dtype=jnp.float16, loss_scale=scale)
    train = jax.jit(fn)
    s, m = train(st0, _batch())
    assert not bool(m["train/finite"]) and float(s.loss_scale.scale) == 2.0**39
    jax.tree.map(np.testing.assert_array_equal, s.params, st0.params)  # skipped: parameters unchanged
    for _ in range(40):
        s, m = train(s, _batch())
        if bool(m["train/finite"]):
            break
    assert bool(m["train/finite"]) and float(s.loss_scale.scale) < 2.0**20
    assert int(s.nonfinite_total) >= 20


def test_config_precision_reaches_every_model_layer(compose_fn):
    from corrjax.train.setup import build

    cfg = compose_fn(["trainer=tiny", "data.num_examples=64", "model=mmoe", "parallel.compute_dtype=bfloat16"])
    setup = build(cfg)
    model = state.merge_model(setup.graphdef, setup.params, setup.rest)
    layers = [m for _, m in nnx_iter(model) if hasattr(m, "param_dtype")]
    # Stacked experts, gates and heads (corrjax.models.Stacked): one Linear module per stack, each bfloat16.
    assert len(layers) >= 4 and all(layer.dtype == jnp.bfloat16 for layer in layers)
    assert _dtypes(setup.params) == {"float32"} and setup.loss_scale is None


def nnx_iter(model):
    from flax import nnx

    return nnx.iter_graph(model)


# --- gradient accumulation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mtl", ["mean", "pcgrad", "mgda"])
def test_grad_accumulation_equals_the_whole_batch_step(mtl):
    """k micro-batches of b examples == one step on the k*b examples, for a linear (mean) and nonlinear (PCGrad,
    MGDA) aggregator: the task-stacked gradients are averaged before the aggregator runs."""
    whole, st0, _ = _build(mtl=mtl, specs=T3, opt="sgd", lr=0.1)
    accum, _, _ = _build(mtl=mtl, specs=T3, opt="sgd", lr=0.1, grad_accum_steps=4)
    batch = _batch(n=32, specs=T3, seed=3)
    s1, m1 = jax.jit(whole)(st0, batch)
    s4, m4 = jax.jit(accum)(st0, batch)
    for k in m1:
        np.testing.assert_allclose(m4[k], m1[k], rtol=2e-5, atol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), s4.params, s1.params)
    assert not np.allclose(jax.tree.leaves(s1.params)[0], jax.tree.leaves(st0.params)[0])


def test_micro_batches_are_strided_and_sizes_must_divide():
    b = {"x": jnp.arange(12).reshape(6, 2), "y": jnp.arange(6)}
    mb = accumulate.split_micro_batches(b, 3)
    np.testing.assert_array_equal(mb["y"], [[0, 3], [1, 4], [2, 5]])
    np.testing.assert_array_equal(mb["x"][1], [[2, 3], [8, 9]])
    with pytest.raises(ValueError, match=r"`trainer.grad_accum_steps`=4 must divide"):
        accumulate.split_micro_batches(b, 4)
    with pytest.raises(ValueError, match=r"`trainer.grad_accum_steps`=3 must divide `trainer.batch_size`=16"):
        config.check_trainer(config.TrainerConfig(batch_size=16, grad_accum_steps=3))
    with pytest.raises(ValueError, match=r"`trainer.grad_accum_steps`=0 must be >= 1"):
        config.check_trainer(config.TrainerConfig(grad_accum_steps=0))


# --- mtl.task_batch_size and the memory estimate ----------------------------------------------------------------


def test_task_batch_size_validation_and_estimate(compose_fn, caplog):
    from corrjax.train.setup import build

    for bad in (0, 3, 1.5, True):
        with pytest.raises(ValueError, match=r"`mtl.task_batch_size`=.* must be null or an int in \[1, T=2\]"):
            optimizer.task_batch_size(OmegaConf.create({"task_batch_size": bad}), 2)
    cfg = compose_fn(["trainer=tiny", "data.num_examples=64", "mtl=pcgrad", "mtl.task_batch_size=1"])
    with caplog.at_level(logging.INFO, logger="corrjax.train.setup"):
        setup = build(cfg)
    shared = _num_shared(setup.params, setup.mask)
    msg = [r.getMessage() for r in caplog.records if "task Jacobian" in r.getMessage()]
    assert (
        msg == [optimizer.task_jacobian_estimate(setup.params, setup.mask, 2, 1)]
        and "mtl.task_batch_size=1 pulls back 1 at a time" in msg[0]
    )
    assert f"T=2 x {optimizer._human(shared)} shared params x 4 B" in msg[0]
    big = optimizer.task_jacobian_estimate({"w": jnp.zeros((1000, 11_200))}, None, 40, 8)
    assert big.startswith("task Jacobian: T=40 x 11.2M shared params x 4 B = 1.79GB per device;"), big


# --- the task Gramian, once -------------------------------------------------------------------------------------


def test_from_weighting_reuses_only_the_gramian_of_its_own_updates():
    rng = np.random.default_rng(0)
    g = {"a": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32), "b": jnp.asarray(rng.normal(size=(3, 2)))}
    tx = corrjax.mtl.mgda()
    s0 = tx.init(jax.tree.map(lambda x: x[0], g))
    plain, _ = tx.update(g, s0)
    fake = corrjax.mtl.TaskGramian(jnp.eye(3), tuple(jax.tree.leaves(g)))  # claims to be g's Gramian
    reused, _ = tx.update(g, s0, task_gramian=fake)
    # MGDA on G = I weights every task 1/3: the update is the mean, not MGDA's min-norm point of the real G.
    # (float32 entries of magnitude ~2: the solver's weights and the mean round at a few 1e-7 absolute)
    jax.tree.map(lambda u, x: np.testing.assert_allclose(u, x.mean(0), rtol=1e-5, atol=1e-6), reused, g)
    assert not np.allclose(plain["a"], reused["a"])
    copy = jax.tree.map(lambda x: x + 0, g)  # equal values, other arrays: not reused
    ignored, _ = tx.update(copy, s0, task_gramian=fake)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ignored, plain)
    real = corrjax.mtl.TaskGramian.of(g)
    np.testing.assert_allclose(real.value, corrjax.mtl.task_gramian(g), rtol=1e-6)
    np.testing.assert_allclose(
        corrjax.mtl.cosine_from_gramian(real.value), corrjax.mtl.task_gradient_cosine(g), rtol=1e-6
    )


def _flops(fn, st0, batch):
    return jax.jit(fn).lower(st0, batch).cost_analysis()["flops"]


def test_train_step_computes_the_task_gramian_once():
    """The step's traced flops with MGDA exceed those with the mean aggregator (whose Gramian is the diagnostics')
    by MGDA's small T x T solve only, not by a second Gramian (2 T^2 P flops)."""
    batch = _batch(specs=T3)
    mean_fn, st0, model = _build(mtl="mean", specs=T3, opt="sgd", hidden=256)
    mgda_fn, st_m, _ = _build(mtl="mgda", specs=T3, opt="sgd", hidden=256)
    mask = shared_mask(model)
    shared = _num_shared(st0.params, mask)
    gram_flops = 2 * 3 * 3 * shared
    extra = _flops(mgda_fn, st_m, batch) - _flops(mean_fn, st0, batch)
    assert 0 < extra < 0.25 * gram_flops, (extra, gram_flops)


def test_tiny_run_float16_accumulated_on_the_mesh(compose_fn, tmp_path):
    """End to end on the 8 fake devices: float16 compute with loss scaling (its state checkpointed with the rest),
    2 micro-batches per step split over the data axis, one task pulled back at a time."""
    from corrjax.train import loop

    overrides = ["trainer=tiny", "logger=minimal", "data.num_examples=256", "trainer.noise_scale=false"]
    cfg = compose_fn(
        [*overrides, "parallel.compute_dtype=float16", "trainer.grad_accum_steps=2", "mtl.task_batch_size=1"]
    )
    summary = loop.run(cfg, run_dir=tmp_path)
    # Steps skipped by the guard are the loss scale's overflow steps: each one halved the scale (from 2^15).
    skipped = summary["nonfinite_total"]
    assert summary["completed"] and skipped < cfg.trainer.max_steps
    assert summary["train/loss_scale"] == 2.0 ** (15 - skipped)
    assert np.isfinite(summary["eval/loss"])
    bad = compose_fn([*overrides, "trainer.grad_accum_steps=4"])  # 16 examples: 4 micro-batches of 4 over 8 devices
    with pytest.raises(ValueError, match=r"`trainer.grad_accum_steps`=4 x the 8 devices"):
        loop.run(bad, run_dir=tmp_path / "bad")
