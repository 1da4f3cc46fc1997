"""The pure pieces of the loop: losses/metrics against NumPy, the train step per model and per aggregator,
the non-finite guard, writers and small helpers."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hydra.utils import instantiate
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from corrjax.data import TaskSpec
from corrjax.models import shared_mask
from corrjax.train import builders, optimizer, sharding, state, step, tasks, writers

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
REG = (TaskSpec("a", "regression", 1), TaskSpec("b", "regression", 1))
MIXED = (TaskSpec("c", "classification", 3), TaskSpec("y", "binary", 1), TaskSpec("r", "regression", 1))


@functools.cache
def _metrics_fn(specs):
    return jax.jit(lambda out, lab, m: {t.name: tasks.task_metrics(t, out[t.name], lab[t.name], m) for t in specs})


@given(st.integers(4, 12), st.integers(0, 2**31 - 1))
def test_task_metrics_against_numpy(n, seed):
    rng = np.random.default_rng(seed)
    out = {"c": rng.normal(size=(n, 3)), "y": rng.normal(size=n), "r": rng.normal(size=n) + 1e3}
    lab = {"c": rng.integers(0, 3, n), "y": rng.integers(0, 2, n).astype(float), "r": rng.normal(size=n) + 1e3}
    mask = rng.random(n) < 0.8
    mask[:3] = True
    got = _metrics_fn(MIXED)(
        {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}, {k: jnp.asarray(v) for k, v in lab.items()}, mask
    )
    m = mask
    logp = out["c"] - np.log(np.exp(out["c"]).sum(1, keepdims=True))
    np.testing.assert_allclose(got["c"]["loss"], -logp[m, lab["c"][m]].mean(), rtol=1e-4)
    np.testing.assert_allclose(got["c"]["accuracy"], (out["c"].argmax(1) == lab["c"])[m].mean(), rtol=1e-6)
    np.testing.assert_allclose(got["y"]["accuracy"], ((out["y"] > 0) == (lab["y"] > 0.5))[m].mean(), rtol=1e-6)
    both = len(np.unique(lab["y"][m])) == 2
    auc = roc_auc_score(lab["y"][m], out["y"].astype(np.float32)[m]) if both else np.nan
    np.testing.assert_allclose(got["y"]["auc"], auc, rtol=1e-6, equal_nan=True)
    p = 1 / (1 + np.exp(-out["y"]))
    bce = -(lab["y"] * np.log(p) + (1 - lab["y"]) * np.log(1 - p))
    np.testing.assert_allclose(got["y"]["loss"], bce[m].mean(), rtol=1e-4)
    np.testing.assert_allclose(got["r"]["rmse"], np.sqrt(((out["r"] - lab["r"]) ** 2)[m].mean()), rtol=1e-3)
    np.testing.assert_allclose(got["r"]["pearson"], np.corrcoef(out["r"][m], lab["r"][m])[0, 1], atol=2e-3)


def test_pearson_metric_undefined_is_nan():
    t = REG[0]
    got = tasks.task_metrics(t, jnp.ones(4), jnp.arange(4.0), jnp.ones(4, bool))
    assert np.isnan(got["pearson"])


def test_task_loss_fns_validation():
    with pytest.raises(ValueError, match="unknown tasks"):
        tasks.task_loss_fns(REG, {"zzz": "pearson"})
    with pytest.raises(ValueError, match=r"task_losses\.a"):
        tasks.task_loss_fns(REG, {"a": "huber"})
    with pytest.raises(ValueError, match="regression"):
        tasks.task_loss_fns(MIXED, {"c": "pearson"})


def test_shared_gradient_cosine_against_numpy():
    rng = np.random.default_rng(0)
    g = {"w": rng.normal(size=(3, 4, 2)), "b": rng.normal(size=(3, 2)), "h": rng.normal(size=(3, 5))}
    got = step.shared_gradient_cosine(jax.tree.map(jnp.asarray, g), {"w": True, "b": True, "h": False}, 3)
    flat = np.concatenate([g["w"].reshape(3, -1), g["b"]], 1)
    want = flat @ flat.T / np.outer(np.linalg.norm(flat, axis=1), np.linalg.norm(flat, axis=1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    zero = step.shared_gradient_cosine({"w": jnp.zeros((2, 3)).at[0].set(1.0)}, None, 2)
    assert np.isnan(zero[1, 1]) and np.isnan(zero[0, 1])
    none_shared = step.shared_gradient_cosine(jax.tree.map(jnp.asarray, g), {"w": False, "b": False, "h": False}, 3)
    assert none_shared.shape == (3, 3) and np.isnan(none_shared).all()


def test_fill_input_sizes():
    node = {"_target_": "m", "gate_in_features": None, "expert": {"in_features": None, "hidden": [4]}, "in_shape": None}
    got = builders.fill_input_sizes(node, (12, 12, 1))
    assert got["gate_in_features"] == 144 and got["expert"]["in_features"] == 144 and got["in_shape"] == [12, 12, 1]
    assert builders.fill_input_sizes({"in_features": 7}, (3,)) == {"in_features": 7}
    assert builders.fill_input_sizes({"in_channels": None}, (32, 32, 3)) == {"in_channels": 3}
    assert builders.fill_input_sizes({"in_channels": None}, (12, 12)) == {"in_channels": 1}


def test_writers_roundtrip(tmp_path):
    w = writers.MetricsWriter(tmp_path, tensorboard=True)
    w.write(1, {"train/loss": np.float32(0.5), "m": np.eye(2), "n": np.float32("nan"), "k": np.int32(3)})
    w.write(2, {"train/loss": 0.25})
    w.close()
    recs = writers.read_jsonl(tmp_path / "metrics.jsonl")
    assert recs[0] == {"step": 1, "train/loss": 0.5, "m": [[1.0, 0.0], [0.0, 1.0]], "n": None, "k": 3}
    writers.truncate_jsonl(tmp_path / "metrics.jsonl", 1)
    assert [r["step"] for r in writers.read_jsonl(tmp_path / "metrics.jsonl")] == [1]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    writers.write_summary(tmp_path, {"eval/loss": np.float64(1.0), "x": float("inf")})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"eval/loss": 1.0, "x": None}


def _tb_events(path):
    """The Event protos of a TensorBoard event file (TFRecord framing: length, its CRC, data, the data's CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        out.append(Event.FromString(data[i + 12 : i + 12 + n]))
        i += 12 + n + 4
    return out


def test_resumed_writer_purges_tensorboard_events_past_the_checkpoint(tmp_path):
    # TensorBoard hides events at steps >= a START session log's step written by a later file.
    writers.MetricsWriter(tmp_path / "a", jsonl=False).close()
    writers.MetricsWriter(tmp_path / "b", jsonl=False, purge_step=5).close()
    (fresh,), (resumed,) = (list((tmp_path / d / "tb").glob("events.out.tfevents.*")) for d in "ab")
    assert not any(e.HasField("session_log") for e in _tb_events(fresh))
    starts = [e.step for e in _tb_events(resumed) if e.HasField("session_log") and e.session_log.status == 1]
    assert starts == [5]


def test_snapshots_roundtrip(tmp_path):
    history = [(k, np.full((3, 2), k, np.float32)) for k in (2, 4, 6)]
    for k, a in history:
        writers.save_snapshot(tmp_path / "s", k, a)
    back = writers.load_snapshots(tmp_path / "s", last_step=4)
    assert [k for k, _ in back] == [2, 4]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(back, history[:2], strict=True))
    assert writers.load_snapshots(tmp_path / "missing", last_step=4) == []


def _tiny_setup(model_cfg_name="hps", mtl="ew", optim="adam", task_specs=REG, in_shape=(6,), model_overrides=None):
    from omegaconf import OmegaConf

    model_cfg = OmegaConf.load(CONFIGS / "model" / f"{model_cfg_name}.yaml")
    model_cfg = OmegaConf.merge(model_cfg, SHRINK.get(model_cfg_name, {}))  # smaller, same architecture
    model_cfg = OmegaConf.merge(model_cfg, model_overrides or {})
    model = builders.build_model(model_cfg, task_specs, in_shape, seed=0)
    mask = shared_mask(model)
    graphdef, params, rest = state.split_model(model)
    mtl_cfg = OmegaConf.load(CONFIGS / "mtl" / f"{mtl}.yaml")
    raw = OmegaConf.to_container(mtl_cfg, resolve=False)
    mtl_cfg = OmegaConf.create({k: (0 if v == "${seed}" else v) for k, v in raw.items()})  # outside a full config
    tx = optimizer.build_optimizer(mtl_cfg, OmegaConf.load(CONFIGS / "optim" / f"{optim}.yaml"), mask, len(task_specs))
    fns = tasks.task_loss_fns(task_specs)
    train_step = jax.jit(step.make_train_step(graphdef, task_specs, fns, tx, mask))
    st0 = state.create_state(params, rest, tx, seed=0)
    return train_step, st0


def _batch(n=16, in_shape=(6,), seed=0, specs=REG):
    rng = np.random.default_rng(seed)
    b = {"x": jnp.asarray(rng.normal(size=(n, *in_shape)), jnp.float32)}
    for t in specs:
        b[t.name] = jnp.asarray(rng.normal(size=n), jnp.float32)
    return b


def _descends(train_step, st0, steps=3, in_shape=(6,)):
    batch = _batch(in_shape=in_shape)
    losses_seen = []
    s = st0
    for _ in range(steps):
        s, m = train_step(s, batch)
        losses_seen.append(float(m["train/loss"]))
    assert all(np.isfinite(losses_seen)), losses_seen
    assert int(s.step) == steps and int(s.nonfinite_total) == 0
    return losses_seen


# ESMM trains a CTR and a CTCVR task of a funnel dataset (not these generic tasks): tests/train/test_funnel_esmm.py.
MODELS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml") if p.stem != "esmm")
IMAGE_SHAPES = {"hps_lenet": (12, 12, 1), "hps_resnet": (8, 8, 3)}
SHRINK = {
    "hps_lenet": {"backbone": {"channels": [2, 4], "out_features": 8}, "head_hidden": [4]},
    "hps_resnet": {"backbone": {"widths": [4, 8], "blocks_per_stage": 1}},
}


@pytest.mark.parametrize("model", [pytest.param(m, marks=pytest.mark.slow) if m in IMAGE_SHAPES else m for m in MODELS])
def test_tiny_train_step_per_model(model):
    shape = IMAGE_SHAPES.get(model, (6,))
    train_step, st0 = _tiny_setup(model_cfg_name=model, in_shape=shape)
    seen = _descends(train_step, st0, steps=4, in_shape=shape)
    assert seen[-1] < seen[0]  # a few Adam steps on one fixed batch lower its loss


@pytest.mark.slow
@pytest.mark.parametrize("mtl", sorted(p.stem for p in (CONFIGS / "mtl").glob("*.yaml")))
def test_tiny_train_step_per_aggregator(mtl):
    train_step, st0 = _tiny_setup(mtl=mtl)
    _descends(train_step, st0, steps=1)


@pytest.mark.parametrize("mtl", ["ew", "pcgrad", "uw"])
def test_model_without_shared_parameters_trains(mtl):
    """PLE without shared experts is one network per task: no parameter is shared, so the aggregator has nothing to
    act on. The step trains every task on its own gradient (it used to fail inside the aggregator on an empty
    pytree) and reports the undefined task-gradient cosines as NaN."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.load(CONFIGS / "model" / "ple.yaml"), {"num_shared_experts": 0})
    assert not any(jax.tree.leaves(shared_mask(builders.build_model(cfg, REG, (6,), seed=0))))
    train_step, st0 = _tiny_setup("ple", mtl=mtl, model_overrides={"num_shared_experts": 0})
    _, m = train_step(st0, _batch())
    cos = np.asarray(m["train/grad_cosine"])
    assert cos.shape == (2, 2) and np.isnan(cos).all()
    seen = _descends(train_step, st0, steps=4)
    assert seen[-1] < seen[0]


def test_nonfinite_step_is_skipped_and_counted():
    train_step, st0 = _tiny_setup()
    before = jax.tree.map(np.asarray, st0.params)
    bad = _batch()
    bad["a"] = bad["a"].at[0].set(jnp.nan)
    s, m = train_step(st0, bad)
    assert not bool(m["train/finite"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, s.params), before)
    s, _ = train_step(s, bad)
    assert (int(s.nonfinite_streak), int(s.nonfinite_max_streak), int(s.nonfinite_total)) == (2, 2, 2)
    s, m = train_step(s, _batch())
    assert bool(m["train/finite"]) and int(s.nonfinite_streak) == 0 and int(s.nonfinite_max_streak) == 2
    assert int(s.step) == 3


def test_sharded_step_equals_unsharded(mesh8):
    """The jitted step with explicit shardings on the 8-device data axis gives the single-device result (with the
    in-step noise scale, whose two halves of the batch span four devices each)."""
    from omegaconf import OmegaConf

    model = builders.build_model(OmegaConf.load(CONFIGS / "model" / "hps.yaml"), REG, (6,), seed=0)
    mask = shared_mask(model)
    graphdef, params, rest = state.split_model(model)
    tx = optax.chain(optax.masked(instantiate({"_target_": "corrjax.mtl.pcgrad"}), mask), optax.sgd(0.1))
    fn = step.make_train_step(graphdef, REG, tasks.task_loss_fns(REG), tx, mask, noise_scale_decay=0.9)
    eval_fn = step.make_eval_step(graphdef)
    st0 = state.create_state(params, rest, tx, seed=0)
    plain, plain_metrics = jax.jit(fn)(st0, _batch())
    sharded_step, sharded_eval = sharding.jit_steps(fn, eval_fn, mesh8)
    rep = sharding.replicated(mesh8)
    data = sharding.batch_sharding(mesh8)
    st_sh = jax.device_put(state.create_state(params, rest, tx, seed=0), rep)
    out, metrics = sharded_step(st_sh, jax.device_put(_batch(), data))
    assert metrics["train/loss"].sharding.is_fully_replicated
    assert out.params["trunk"]["layers"][0]["kernel"][...].sharding.is_fully_replicated
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), out.params, plain.params)
    np.testing.assert_allclose(metrics["train/noise_scale"], plain_metrics["train/noise_scale"], rtol=1e-4)
    preds = sharded_eval(out, jax.device_put({"x": _batch()["x"]}, data))
    assert preds["a"].shape == (16,)


@pytest.mark.parametrize("name", ["pearson", "concordance", "spearman"])
def test_correlation_losses_per_regression_task(name):
    import corrjax.stats

    fns = tasks.task_loss_fns(REG, {"b": name})
    rng = np.random.default_rng(1)
    pred, y = jnp.asarray(rng.normal(size=8), jnp.float32), jnp.asarray(rng.normal(size=8), jnp.float32)
    want = getattr(corrjax.stats, f"{name}_loss")(pred[:, None], y[:, None])
    np.testing.assert_allclose(fns["b"](pred, y), want, rtol=1e-6)
    np.testing.assert_allclose(fns["a"](pred, y), np.mean((np.asarray(pred) - np.asarray(y)) ** 2), rtol=1e-5)


def test_representation_regularizers():
    import corrjax.stats
    from corrjax.train import regularizers

    z = jnp.asarray(np.random.default_rng(2).normal(size=(16, 5)), jnp.float32)
    np.testing.assert_allclose(regularizers.single_view(corrjax.stats.decov_loss)(z), corrjax.stats.decov_loss(z))
    bt = regularizers.same_view(functools.partial(corrjax.stats.barlow_twins_loss, eps=1e-5))
    np.testing.assert_allclose(bt(z), corrjax.stats.barlow_twins_loss(z, z, eps=1e-5))
    tree = {"a": jnp.ones((4, 2, 3)), "b": jnp.zeros((4, 5))}
    assert regularizers.flatten_representation(tree).shape == (4, 11)


def _hps_step(loss_fns=None, **kwargs):
    """The HPS train step with the equal-weight aggregator and Adam, its initial state and its graphdef."""
    from omegaconf import OmegaConf

    model = builders.build_model(OmegaConf.load(CONFIGS / "model" / "hps.yaml"), REG, (6,), seed=0)
    mask = shared_mask(model)
    graphdef, params, rest = state.split_model(model)
    mtl_cfg = OmegaConf.load(CONFIGS / "mtl" / "ew.yaml")
    tx = optimizer.build_optimizer(mtl_cfg, OmegaConf.load(CONFIGS / "optim" / "adam.yaml"), mask, len(REG))
    fns = tasks.task_loss_fns(REG) if loss_fns is None else loss_fns
    train_step = jax.jit(step.make_train_step(graphdef, REG, fns, tx, mask, **kwargs))
    return train_step, state.create_state(params, rest, tx, seed=0), graphdef


def test_step_metrics_are_the_task_losses_their_sum_and_the_weighted_regularizer():
    """``train/<task>/loss`` is the task's own loss at the step's input parameters (without the regulariser),
    ``train/loss`` the objective (their sum plus ``weight`` times the regulariser of the shared representation) and
    ``train/regularizer`` the regulariser."""
    import corrjax.stats
    from corrjax.train import regularizers

    reg_fn, weight = regularizers.single_view(corrjax.stats.decov_loss), 0.3
    batch = _batch()
    for kwargs in ({}, {"regularizer": reg_fn, "regularizer_weight": weight}):
        train_step, st0, graphdef = _hps_step(**kwargs)
        model = state.merge_model(graphdef, st0.params, st0.rest)
        out = model(batch["x"])
        reg = float(reg_fn(regularizers.flatten_representation(model.features(batch["x"])))) if kwargs else 0.0
        _, m = train_step(st0, batch)
        want = {t.name: float(jnp.mean((out[t.name] - batch[t.name]) ** 2)) for t in REG}
        for name, value in want.items():
            np.testing.assert_allclose(m[f"train/{name}/loss"], value, rtol=1e-5)
        np.testing.assert_allclose(m["train/loss"], sum(want.values()) + weight * reg, rtol=1e-5)
        if kwargs:
            assert reg > 0
            np.testing.assert_allclose(m["train/regularizer"], reg, rtol=1e-5)
        else:
            assert "train/regularizer" not in m


def _noise_reference(graphdef, st, batch, decay, previous=None):
    """McCandlish's two-batch estimates from ``jax.grad`` of the summed loss on each half separately, and their
    bias-corrected EMA after ``previous`` (a list of earlier (g2, trace) estimates)."""
    fns = tasks.task_loss_fns(REG)
    model = lambda p, b: state.merge_model(graphdef, p, st.rest)(b["x"])
    summed = lambda p, b: sum(fns[t.name](model(p, b)[t.name], b[t.name]) for t in REG)
    n = batch["x"].shape[0]
    g = [jax.grad(summed)(st.params, {k: v[i::2] for k, v in batch.items()}) for i in (0, 1)]  # even, odd examples
    flat = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(gi)]).astype(np.float64) for gi in g]
    small, big = 0.5 * (flat[0] @ flat[0] + flat[1] @ flat[1]), 0.25 * (flat[0] + flat[1]) @ (flat[0] + flat[1])
    g2, trace = (n * big - n / 2 * small) / (n / 2), (small - big) / (2 / n - 1 / n)
    seq = [*(previous or []), (g2, trace)]
    w = np.array([(1 - decay) * decay ** (len(seq) - 1 - i) for i in range(len(seq))]) / (1 - decay ** len(seq))
    return (g2, trace), w @ np.array([e[0] for e in seq]), w @ np.array([e[1] for e in seq])


def test_noise_scale_in_the_step_from_the_two_halves():
    """With ``noise_scale_decay`` the step differentiates the two halves of the batch: its update is the whole
    batch's (per-example-mean losses), and ``train/noise_scale`` is the ratio of the EMAs of McCandlish's two
    unbiased estimates, computed here from ``jax.grad`` on each half. The separate noise step (runs whose losses
    do not allow it) gives the same estimates."""
    decay, batches = 0.5, [_batch(seed=0), _batch(seed=1)]
    plain, st0, graphdef = _hps_step()
    halves, _, _ = _hps_step(noise_scale_decay=decay)
    noise_step = jax.jit(step.make_noise_scale_step(graphdef, REG, tasks.task_loss_fns(REG), decay=decay))
    s_plain, s_half, s_sep, seen = st0, st0, st0, []
    for batch in batches:
        first, g2, trace = _noise_reference(graphdef, s_half, batch, decay, seen)
        seen.append(first)
        s_plain, m_plain = plain(s_plain, batch)
        s_half, m = halves(s_half, batch)
        s_sep, m_sep = noise_step(s_sep, batch)
        s_sep = s_sep.replace(params=s_half.params)  # the noise step leaves the parameters alone
        assert "train/noise_scale" not in m_plain
        for key in ("train/loss", "train/a/loss", "train/b/loss"):
            np.testing.assert_allclose(m[key], m_plain[key], rtol=1e-5)
        for got in (m, m_sep):
            np.testing.assert_allclose([got["train/grad_sq_norm"], got["train/trace_cov"]], [g2, trace], rtol=1e-3)
            np.testing.assert_allclose(got["train/noise_scale"], trace / g2, rtol=2e-3)
    assert int(s_half.noise_scale.count) == 2 and int(s_plain.noise_scale.count) == 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), s_half.params, s_plain.params)


def test_nonfinite_gradient_with_finite_losses_is_skipped():
    """The guard looks at the update as well as the losses: a finite loss with a NaN gradient (sqrt at 0) drops
    the step and counts it."""
    fns = tasks.task_loss_fns(REG)
    bad = {**fns, "b": lambda out, y: fns["b"](out, y) + jnp.sqrt(jnp.abs(out - out)).mean()}
    train_step, st0, _ = _hps_step(loss_fns=bad)
    before = jax.tree.map(np.asarray, st0.params)
    s, m = train_step(st0, _batch())
    assert np.isfinite(float(m["train/loss"])) and not bool(m["train/finite"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, s.params), before)
    assert (int(s.nonfinite_streak), int(s.nonfinite_total), int(s.step)) == (1, 1, 1)


def test_evaluate_against_numpy(mesh8):
    """evaluate() over a split that does not fill its last batch (padding masked out): per-task metrics, the
    summed loss, and the correlations of the per-example scores (true-class log-probability, logit, prediction)
    and of the per-example losses, against NumPy."""
    from corrjax.data import ArrayDataset
    from corrjax.train import evaluate

    rng = np.random.default_rng(0)
    n = 21  # 3 batches of 8: the last holds 5 examples and 3 padded rows
    x = rng.normal(size=(n, 4)).astype(np.float32)
    lab = {"c": rng.integers(0, 3, n), "y": rng.integers(0, 2, n).astype(np.float32), "r": rng.normal(size=n)}
    lab["r"] = lab["r"].astype(np.float32)
    w = {"c": rng.normal(size=(4, 3)), "y": rng.normal(size=4), "r": rng.normal(size=4)}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    eval_step = jax.jit(lambda st, b: {k: b["x"] @ v for k, v in st.items()})
    data = ArrayDataset({"x": x, **lab}, MIXED)
    got = evaluate.evaluate(eval_step, w, data, MIXED, sharding.batch_sharding(mesh8), 8)

    out = {k: (x @ v).astype(np.float64) for k, v in w.items()}
    logp = out["c"] - np.log(np.exp(out["c"]).sum(1, keepdims=True))
    p = 1 / (1 + np.exp(-out["y"]))
    per_example = {
        "c": -logp[np.arange(n), lab["c"]],
        "y": -(lab["y"] * np.log(p) + (1 - lab["y"]) * np.log(1 - p)),
        "r": (out["r"] - lab["r"]) ** 2,
    }
    want = {f"eval/{k}/loss": v.mean() for k, v in per_example.items()}
    want["eval/c/accuracy"] = (out["c"].argmax(1) == lab["c"]).mean()
    want["eval/y/accuracy"] = ((out["y"] > 0) == (lab["y"] > 0.5)).mean()
    want["eval/y/auc"] = roc_auc_score(lab["y"], out["y"])
    want["eval/r/rmse"] = np.sqrt(per_example["r"].mean())
    want["eval/r/pearson"] = np.corrcoef(out["r"], lab["r"])[0, 1]
    want["eval/r/r2"] = 1 - per_example["r"].sum() / np.sum((lab["r"] - lab["r"].mean()) ** 2)
    want["eval/loss"] = sum(v.mean() for v in per_example.values())
    scores = np.stack([-per_example["c"], out["y"], out["r"]], 1)
    want["eval/pred_corr"] = np.corrcoef(scores, rowvar=False)
    want["eval/error_corr"] = np.corrcoef(np.stack(list(per_example.values()), 1), rowvar=False)
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
