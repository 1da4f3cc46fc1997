"""The 2-D (data, fsdp) mesh of ``parallel=fsdp``: mesh shapes and their errors, FSDP shardings of the parameters and
the optimiser state, the same numbers as the replicated data-parallel run, and sharded checkpoints."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from omegaconf import OmegaConf

from corrjax.train import checkpoint, setup, sharding

TINY = ["trainer=tiny", "logger=minimal", "data.num_examples=256"]
# Small enough that the tiny HPS trunk's kernel (100 x 113) is split, large enough that the heads are not.
MIN_SIZE = 256


def _parallel(**kw):
    return OmegaConf.create({"data": -1, "axis_name": "data", "mesh": None, **kw})


def test_mesh_shapes_and_errors():
    assert sharding._mesh_shape(_parallel(), 8) == {"data": 8}
    assert sharding._mesh_shape(_parallel(mesh={"data": -1, "fsdp": 2}), 8) == {"data": 4, "fsdp": 2}
    assert sharding._mesh_shape(_parallel(mesh={"data": 2, "fsdp": -1}), 8) == {"data": 2, "fsdp": 4}
    assert sharding._mesh_shape(_parallel(mesh={"data": 1, "fsdp": 4}), 8) == {"data": 1, "fsdp": 4}
    with pytest.raises(ValueError, match=r"`parallel.mesh.fsdp`=3"):
        sharding._mesh_shape(_parallel(mesh={"data": -1, "fsdp": 3}), 8)
    with pytest.raises(ValueError, match=r"`parallel.mesh.fsdp`=16"):
        sharding._mesh_shape(_parallel(mesh={"data": 1, "fsdp": 16}), 8)
    with pytest.raises(ValueError, match=r"unknown axes \['model'\]"):
        sharding._mesh_shape(_parallel(mesh={"data": -1, "model": 2}), 8)
    with pytest.raises(ValueError, match=r"only one axis may be -1"):
        sharding._mesh_shape(_parallel(mesh={"data": -1, "fsdp": -1}), 8)
    with pytest.raises(ValueError, match=r"`parallel.mesh.fsdp`=0"):
        sharding._mesh_shape(_parallel(mesh={"data": -1, "fsdp": 0}), 8)
    mesh = sharding.make_mesh(_parallel(mesh={"data": -1, "fsdp": 2}))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))


def test_fsdp_spec_rule():
    assert sharding.fsdp_spec((100, 112), 2, 256) == P(None, "fsdp")  # the largest divisible dimension
    assert sharding.fsdp_spec((112, 100), 2, 256) == P("fsdp", None)
    assert sharding.fsdp_spec((64, 64), 2, 256) == P(None, "fsdp")  # ties: the last
    assert sharding.fsdp_spec((101, 7), 2, 256) == P()  # nothing divides
    assert sharding.fsdp_spec((8,), 2, 256) == P()  # below the threshold
    assert sharding.fsdp_spec((512,), 1, 256) == P()  # no fsdp axis
    shapes = {(100, 112)}
    assert sharding._leaf_spec((3, 100, 112), shapes, 2, 256) == P(None, None, "fsdp")  # task axis replicated


def _steps(cfg, mesh, min_size, n_steps=3):
    """``n_steps`` train steps of ``cfg`` on ``mesh`` from the same state and batches; returns (state, metrics)."""
    s = setup.build(cfg, task_grad_constraint=sharding.task_grad_constraint(mesh, min_size))
    shard = sharding.state_shardings(s.abstract_state(), mesh, min_size)
    steps = sharding.jit_setup_steps(s, mesh, "data", shard)
    st = s.init_state(shard)
    data = sharding.batch_sharding(mesh)
    rng = np.random.default_rng(0)
    metrics = []
    for _ in range(n_steps):
        idx = rng.choice(len(s.train_data), 16, replace=False)
        batch = sharding.global_batch(dict(s.train_data.get_batch(np.sort(idx))), data)
        st, m = steps.train(st, batch)
        metrics.append(jax.device_get(m))
    return s, st, metrics, shard


def _cfg(compose_fn, mtl):
    return compose_fn([*TINY, f"mtl={mtl}", "optim=adam", "model.head_hidden=[16]"])


@pytest.mark.parametrize("mtl", ["ew", "upgrad"])
def test_fsdp_equals_replicated_and_shards_the_state(compose_fn, mtl):
    cfg = _cfg(compose_fn, mtl)
    rep_mesh = sharding.make_mesh(_parallel())
    fsdp_mesh = sharding.make_mesh(_parallel(mesh={"data": -1, "fsdp": 2}))
    _, rep, rep_m, _ = _steps(cfg, rep_mesh, MIN_SIZE)
    _, got, got_m, _ = _steps(cfg, fsdp_mesh, MIN_SIZE)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), got.params, rep.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), got.opt_state, rep.opt_state)
    for a, b in zip(got_m, rep_m, strict=True):
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-5, atol=1e-6), a, b)

    # The trunk's kernel (100 x 113) splits along its only even dimension, its bias (113,) cannot, the small
    # head leaves stay replicated; Adam's moments follow the parameters; the counters are replicated.
    kernel = got.params["trunk"]["layers"][0]["kernel"][...]
    assert kernel.shape == (100, 113)
    assert kernel.sharding.is_equivalent_to(NamedSharding(fsdp_mesh, P("fsdp", None)), 2)
    assert got.params["trunk"]["layers"][0]["bias"][...].sharding.is_fully_replicated
    n_split = 0
    for leaf in jax.tree.leaves(got):
        spec = sharding.fsdp_spec(leaf.shape, 2, MIN_SIZE)
        expected = NamedSharding(fsdp_mesh, spec)
        assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), (leaf.shape, leaf.sharding)
        n_split += "fsdp" in tuple(spec)
    assert n_split >= 3  # the kernel and Adam's two moments of it
    adam_mu = [x for x in jax.tree.leaves(got.opt_state) if x.shape == (100, 113)]
    assert len(adam_mu) == 2 and all(not x.sharding.is_fully_replicated for x in adam_mu)
    assert got.step.sharding.is_fully_replicated and int(got.step) == 3


def test_task_stacked_aggregator_state_keeps_the_task_axis_replicated():
    mesh = sharding.make_mesh(_parallel(mesh={"data": -1, "fsdp": 2}))
    abstract = {"params": {"w": jax.ShapeDtypeStruct((64, 32), np.float32)}}
    state = {**abstract, "ema": jax.ShapeDtypeStruct((3, 64, 32), np.float32)}
    sh = sharding.state_shardings(state, mesh, 256)
    assert sh["ema"].spec == P(None, "fsdp", None) and sh["params"]["w"].spec == P("fsdp", None)
    constrain = sharding.task_grad_constraint(mesh, 256)
    g = {"w": np.ones((3, 64, 32), np.float32)}
    out = jax.jit(lambda g, p: constrain(g, p))(g, {"w": np.ones((64, 32), np.float32)})
    assert out["w"].sharding.is_equivalent_to(NamedSharding(mesh, P(None, "fsdp", None)), 3)
    assert sharding.task_grad_constraint(sharding.make_mesh(_parallel()), 256) is None


def test_sharded_checkpoint_restores_into_the_same_and_another_mesh(compose_fn, tmp_path):
    cfg = _cfg(compose_fn, "ew")
    fsdp_mesh = sharding.make_mesh(_parallel(mesh={"data": -1, "fsdp": 2}))
    s, st, _, _ = _steps(cfg, fsdp_mesh, MIN_SIZE, n_steps=1)
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, st, {"epoch": 0, "step": 1})
    ckpt.close()
    want = jax.device_get(st)
    other = sharding.make_mesh(_parallel(mesh={"data": 2, "fsdp": 4}))
    for mesh in (fsdp_mesh, other, sharding.make_mesh(_parallel())):
        target = jax.tree.map(
            lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
            s.abstract_state(),
            sharding.state_shardings(s.abstract_state(), mesh, MIN_SIZE),
        )
        restored = checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False).restore(target)
        assert restored.step == 1
        for got, tgt in zip(jax.tree.leaves(restored.state), jax.tree.leaves(target), strict=True):
            assert got.sharding.is_equivalent_to(tgt.sharding, got.ndim)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.state), want)


def test_fsdp_run_end_to_end(compose_fn, tmp_path):
    """``parallel=fsdp`` through the whole loop (jit, checkpoints, evaluation) with its default threshold."""
    from corrjax.train import loop

    cfg = compose_fn(
        [*TINY, "parallel=fsdp", "parallel.fsdp_min_size=1024", "trainer.max_steps=2", "trainer.noise_scale=false"]
    )
    summary = loop.run(cfg, run_dir=tmp_path / "run")
    assert summary["step"] == 2 and np.isfinite(summary["eval/loss"])
