"""Every config option composes and instantiates; bad overrides fail naming the key or listing the options."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

import corrjax.models
from corrjax.train import builders, optimizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TFDS = {"multimnist", "celeba", "cifar10"}
FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"
TABULAR = {
    "census_income": {"data_dir": str(FIXTURES / "census_income")},
    "ali_ccp": {"data_dir": str(FIXTURES / "ali_ccp"), "cache": False, "min_count": 1, "val_fraction": 0.5},
}


def options(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_groups_are_populated():
    for group in ("data", "model", "mtl", "optim", "trainer", "logger", "parallel", "experiment", "regularizer"):
        assert options(group), group
    assert {"synthetic", "multidigits"} <= set(options("data"))
    assert {"hps", "mmoe", "cgc", "ple"} <= set(options("model"))
    assert {"ew", "pcgrad", "cagrad", "mgda", "upgrad", "uw", "dwa", "famo", "rlw"} <= set(options("mtl"))
    assert {"adam", "sgd", "msvag"} <= set(options("optim"))


def test_default_config_schema(compose_fn):
    cfg = compose_fn(return_hydra_config=True)
    assert cfg.seed == 0 and cfg.trainer.max_steps > 0 and cfg.trainer.resume is False
    assert cfg.data._target_ == "corrjax.data.synthetic"
    assert cfg.optim._target_ == "corrjax.optim.msvag"
    assert OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"].startswith("outputs/")


@pytest.mark.parametrize("name", options("data"))
def test_data_options(compose_fn, name, tmp_path):
    cfg = compose_fn([f"data={name}"])
    if name in TFDS:
        # Not prepared here: instantiation fails at once, saying how to prepare the data.
        from corrjax.data import DatasetNotPreparedError

        assert cfg.data.data_dir  # the ${oc.env:TFDS_DATA_DIR,...} default resolves
        with pytest.raises(InstantiationException, match="tfds build") as e:
            instantiate(cfg.data, split="val", data_dir=str(tmp_path))
        assert isinstance(e.value.__cause__, DatasetNotPreparedError)
        return
    if name in TABULAR:
        # Downloaded files: missing ones fail at once saying where to get them; the fixture files load.
        from corrjax.data import DatasetNotPreparedError

        with pytest.raises(InstantiationException, match="never downloads") as e:
            instantiate(cfg.data, split="val", data_dir=str(tmp_path))
        assert isinstance(e.value.__cause__, DatasetNotPreparedError)
        ds = instantiate(cfg.data, split="val", **TABULAR[name])
        assert len(ds) and ds.tasks and ds.features
        return
    ds = instantiate(cfg.data, split="val", num_examples=8)
    if getattr(ds, "features", None):  # built-in tabular data (funnel): x is {feature: array}
        assert len(ds) == 8 and ds.tasks and set(ds[0]["x"]) == {f.name for f in ds.features}
        return
    assert len(ds) == 8 and ds.tasks and ds[0]["x"].dtype == "float32"


@pytest.mark.parametrize("name", options("model"))
def test_model_options(compose_fn, name):
    # Abstract instantiation (nnx.eval_shape): the config builds a model and its outputs have the task shapes,
    # without paying for eager initialisation here (tiny real runs are in test_steps.py / test_run.py).
    cfg = compose_fn([f"model={name}", "data=multidigits"] if "lenet" in name else [f"model={name}"])
    if name == "esmm":  # ESMM trains a CTR and a CTCVR task: the funnel's click and purchase
        return _check_esmm_config(compose_fn([f"model={name}", "data=funnel"]))
    ds = instantiate(cfg.data, split="val", num_examples=4)
    shape = (32, 32, 3) if "resnet" in name else ds[0]["x"].shape  # RGB models: image-shaped inputs
    model = nnx.eval_shape(lambda: builders.build_model(cfg.model, ds.tasks, shape, seed=0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.ShapeDtypeStruct((4, *shape), jnp.float32)
    out = jax.eval_shape(lambda p, r, x: nnx.merge(graphdef, p, r)(x), params, rest, x)
    assert {n: o.shape[1:] for n, o in out.items()} == {t.name: t.output_shape for t in ds.tasks}
    flags = jax.tree.leaves(corrjax.models.shared_mask(model))
    assert len(flags) == len(jax.tree.leaves(params)) and any(flags) and not all(flags)


def _check_esmm_config(cfg):
    ds = instantiate(cfg.data, split="val", num_examples=4, num_users=10, num_items=10)
    run_tasks = tuple(t for t in ds.tasks if t.name in ("click", "purchase"))
    model = nnx.eval_shape(lambda: builders.build_model(cfg.model, run_tasks, None, seed=0, features=ds.features))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in ds.get_batch(np.arange(4))["x"].items()}
    out = jax.eval_shape(lambda p, r, x: nnx.merge(graphdef, p, r)(x), params, rest, x)
    assert {n: o.shape for n, o in out.items()} == {"click": (4,), "purchase": (4,), "cvr": (4,)}
    flags = jax.tree.leaves(corrjax.models.shared_mask(model))
    assert len(flags) == len(jax.tree.leaves(params)) and any(flags) and not all(flags)


@pytest.mark.parametrize("mtl", options("mtl"))
def test_mtl_options_build_an_optimizer(compose_fn, mtl):
    cfg = compose_fn([f"mtl={mtl}"])
    params = {"trunk": jnp.ones(3), "head": jnp.ones(2)}
    tx = optimizer.build_optimizer(cfg.mtl, cfg.optim, {"trunk": True, "head": False}, num_tasks=2)
    assert isinstance(tx, optax.GradientTransformation)
    grads = {"trunk": jnp.stack([jnp.ones(3), -0.5 * jnp.ones(3)]), "head": jnp.ones(2)}
    updates, _ = jax.eval_shape(
        lambda g, p: tx.update(g, tx.init(p), p, task_losses=jnp.array([1.0, 2.0])), grads, params
    )
    assert updates["trunk"].shape == (3,) and updates["head"].shape == (2,)


@pytest.mark.parametrize("optim", options("optim"))
def test_optim_options(compose_fn, optim):
    cfg = compose_fn([f"optim={optim}"])
    tx = instantiate(cfg.optim)
    assert isinstance(tx, optax.GradientTransformation)
    params = {"w": jnp.ones(3)}
    updates, _ = jax.eval_shape(lambda p: tx.update({"w": jnp.ones(3)}, tx.init(p), p), params)
    assert updates["w"].shape == (3,)


@pytest.mark.parametrize("group", ["trainer", "logger", "parallel", "regularizer"])
def test_other_options_compose(compose_fn, group):
    for name in options(group):
        compose_fn([f"{group}={name}"])


@pytest.mark.parametrize("name", options("experiment"))
def test_experiments_compose(compose_fn, name):
    cfg = compose_fn([f"experiment={name}"])
    assert cfg.trainer.max_steps > 0


def test_launchers_compose(compose_fn):
    for launcher in ("slurm", "local"):
        cfg = compose_fn([f"hydra/launcher={launcher}"], return_hydra_config=True)
        assert "submitit" in cfg.hydra.launcher._target_


def test_misspelt_override_names_the_key(compose_fn):
    with pytest.raises(ConfigCompositionException) as e:
        compose_fn(["trainer.max_stepz=3"])
    assert "max_stepz" in str(e.value) + str(e.value.__cause__)


def test_wrongly_typed_override_names_the_key(compose_fn):
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        compose_fn(["trainer.max_steps=abc"])
    text = str(e.value) + str(e.value.__cause__)
    assert "max_steps" in text and "abc" in text


def test_unknown_data_key_is_rejected(compose_fn):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as e:
        compose_fn(["data.corelation=0.5"])
    assert "corelation" in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize("group", ["mtl", "model"])
def test_unknown_option_lists_valid_ones(compose_fn, group):
    with pytest.raises(ConfigCompositionException) as e:
        compose_fn([f"{group}=nope"])
    text = str(e.value)
    assert "nope" in text and all(opt in text for opt in options(group)[:3])


def test_distributed_autodetect(monkeypatch):
    from types import SimpleNamespace

    from corrjax.train import distributed

    for var in ("SLURM_JOB_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert not distributed.slurm_multiprocess()
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not distributed.slurm_multiprocess()
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.slurm_multiprocess()
    # Explicitly disabled wins over SLURM's environment; nothing is initialised.
    off = SimpleNamespace(enabled=False)
    assert distributed.maybe_initialize(off) is False
    assert distributed.broadcast_str("/some/run/dir") == "/some/run/dir"  # one process: identity


# Issue 19's confusing cases: each fails at once with an error naming the key, or now does what the user asked.


def test_experiment_preset_keeps_the_trainer_preset_chosen_with_it(compose_fn):
    """``experiment=X trainer=tiny`` runs tiny's 4 steps (it used to run the preset's 400 silently); without a
    trainer choice the experiment's values hold, and its other trainer keys stay (celeba's eval split)."""
    assert compose_fn(["experiment=multidigits_mtl"]).trainer.max_steps == 400
    tiny = compose_fn(["experiment=multidigits_mtl", "trainer=tiny"]).trainer
    assert (tiny.max_steps, tiny.batch_size, tiny.log_every) == (4, 16, 1)
    celeba = compose_fn(["experiment=celeba", "trainer=tiny"]).trainer
    assert (celeba.max_steps, celeba.eval_split) == (4, "val")
    assert compose_fn(["experiment=multidigits_mtl", "trainer.max_steps=7"]).trainer.max_steps == 7


def test_adam_cosine_follows_the_run_length(compose_fn):
    """``optim=adam_cosine trainer=tiny`` used to fail with optax's "decay_steps=-46" (a fixed 50-step warmup in
    a 4-step run): the warmup is now a fraction of ``trainer.max_steps``, and a fixed one too long names its keys."""
    for overrides, steps in ((["trainer=tiny"], 4), ([], 600), (["trainer.max_steps=0"], 1)):
        cfg = compose_fn(["optim=adam_cosine", *overrides])
        schedule = instantiate(cfg.optim._args_[1].learning_rate)
        warmup = int(0.1 * steps)
        ref = optax.warmup_cosine_decay_schedule(0.0, 1e-3, warmup, steps)
        np.testing.assert_allclose([schedule(i) for i in range(steps + 1)], [ref(i) for i in range(steps + 1)])
        assert isinstance(optimizer.build_optimizer(cfg.mtl, cfg.optim, None, 2), optax.GradientTransformation)
    with pytest.raises(ValueError, match=r"`warmup_steps`=50 must be in \[0, `decay_steps`=4\].*trainer.max_steps"):
        optimizer.warmup_cosine_schedule(1e-3, 4, warmup_steps=50)
    linear = optimizer.warmup_cosine_schedule(1e-3, 4, warmup_steps=4)
    np.testing.assert_allclose([linear(i) for i in range(5)], [0, 2.5e-4, 5e-4, 7.5e-4, 1e-3], rtol=1e-6)


def test_missing_tfds_data_is_reported_as_text_naming_the_key(compose_fn, tmp_path):
    """The not-prepared error reaches the user as itself (its lines, not a repr with literal \\n) with a note naming
    the ``data`` key, not wrapped in Hydra's InstantiationException."""
    from corrjax.data import DatasetNotPreparedError
    from corrjax.train.setup import build

    cfg = compose_fn(["data=multimnist", f"data.data_dir={tmp_path}"])
    with pytest.raises(DatasetNotPreparedError) as e:
        build(cfg)
    assert "\n    tfds build mnist" in str(e.value) and "\\n" not in str(e.value)
    assert any("`data`" in note and "corrjax.data.multimnist" in note for note in e.value.__notes__)


def test_image_model_on_vector_data_names_the_keys(compose_fn):
    """``model=hps_lenet`` on the synthetic data used to fail with "not enough values to unpack"."""
    cfg = compose_fn(["model=hps_lenet"])
    with pytest.raises(ValueError, match=r"`model.backbone.in_shape`.*\(H, W, C\) images.*`data`.*\(100,\)"):
        builders.build_model(cfg.model, (), (100,), seed=0)
    with pytest.raises(ValueError, match=r"`model.backbone.in_channels`.*images.*\(7,\)"):
        builders.build_model(compose_fn(["model=hps_resnet"]).model, (), (7,), seed=0)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.noise_std=-1", "`data.noise_std`=-1"),
        ("data.num_examples=-5", "`data.num_examples`=-5"),
        ("optim.learning_rate=-1e-3", "`optim.learning_rate`=-0.001"),
        ("optim=adam_cosine", None),  # nested: the schedule's peak value (set below)
        ("model.backbone.hidden=[64,-3]", "`model.backbone.hidden[1]`=-3"),
        ("model.head_hidden=[0]", "`model.head_hidden[0]`=0"),
        ("trainer.batch_size=-2", "`trainer.batch_size`=-2"),
        ("trainer.max_steps=-1", "`trainer.max_steps`=-1"),
        ("trainer.noise_scale_decay=1.5", "`trainer.noise_scale_decay`=1.5"),
    ],
)
def test_negative_rates_and_sizes_are_refused_naming_the_key(compose_fn, tmp_path, override, key):
    from corrjax.train import loop

    overrides = [override]
    if key is None:
        overrides, key = [override, "optim._args_.1.learning_rate.peak_value=-0.1"], "peak_value`=-0.1"
    cfg = compose_fn(overrides)
    with pytest.raises(ValueError, match=re.escape(key)):
        loop.run(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_synthetic_refuses_negative_noise_naming_the_argument():
    from corrjax.data import synthetic

    for kwargs, name in (
        ({"noise_std": -1.0}, "noise_std"),
        ({"scale": -0.5}, "scale"),
        ({"num_sin": -1}, "num_sin"),
    ):
        with pytest.raises(ValueError, match=f"`{name}`"):
            synthetic("val", num_examples=4, **kwargs)
