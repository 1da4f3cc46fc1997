"""The persistent compilation cache's setting (trainer.compilation_cache_dir) and the compilations before a first
step: the synthetic generator and the model initialisation compile once each."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax import monitoring

from corrjax.train import compile_cache


@pytest.fixture
def restore_cache_settings():
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {n: getattr(jax.config, n) for n in names}
    yield
    for n, v in old.items():
        jax.config.update(n, v)
    compile_cache._jax_cache.reset_cache()


def test_configure_auto_path_and_null(tmp_path, monkeypatch, restore_cache_settings):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_dir() == tmp_path / "xdg" / "corrjax" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.default_dir() == tmp_path / "home" / ".cache" / "corrjax" / "jax"
    # auto keeps the directory JAX already has (the tests' temporary one), with JAX's settings
    before = jax.config.jax_compilation_cache_dir
    assert before and compile_cache.configure("auto") == before
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0  # the tests' setting, untouched
    # a path: that directory (created), with corrjax's thresholds
    target = tmp_path / "cache"
    assert compile_cache.configure(str(target)) == str(target) and target.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(target)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == compile_cache.MIN_COMPILE_TIME_S
    # null: off; auto with nothing set: the user cache dir (HOME is the temporary one here)
    assert compile_cache.configure(None) is None and jax.config.jax_compilation_cache_dir is None
    assert compile_cache.configure("auto") == str(tmp_path / "home" / ".cache" / "corrjax" / "jax")
    with pytest.raises(ValueError, match=r"trainer\.compilation_cache_dir"):
        compile_cache.configure(" ")


def test_cache_is_written_and_read(tmp_path, restore_cache_settings):
    """A program compiled with the cache set lands in it; a fresh process would read it from there."""
    compile_cache.configure(str(tmp_path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.jit(lambda x: jax.numpy.sin(x) * 3.0 + 17.0)(np.arange(11.0)).block_until_ready()
    assert any(tmp_path.iterdir())


def test_synthetic_and_model_init_compile_once_each():
    """Both splits of the synthetic data come from one compiled program (any size: blocks of BLOCK_SIZE), and a
    model's initialisers compile together: once for every seed."""
    from omegaconf import OmegaConf

    from corrjax.data import TaskSpec, synthetic
    from corrjax.train import builders

    compiled = []
    monitoring.register_event_duration_secs_listener(
        lambda name, *_, **__: compiled.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
    )
    kwargs = {"num_features": 13, "num_sin": 3, "num_tasks": 3, "seed": 5}
    first = synthetic("train", num_examples=1500, **kwargs)
    again = [synthetic(split, num_examples=n, **kwargs) for split, n in (("test", 7), ("val", 2100), ("train", 9))]
    model_cfg = OmegaConf.create(
        {"_target_": "corrjax.models.HPS", "backbone": {"_target_": "corrjax.models.MLP", "_partial_": True,
         "in_features": None, "hidden": [7]}, "head_hidden": [5]}
    )  # fmt: skip
    tasks = tuple(TaskSpec(f"t{i}", "regression", 1) for i in range(3))
    models = [builders.build_model(model_cfg, tasks, (13,), seed=s) for s in (0, 1, 2)]
    assert len(compiled) == 2, compiled  # one generator program, one initialisation program
    np.testing.assert_array_equal(again[2].arrays["x"], first.arrays["x"][:9])  # a prefix of the same stream
    assert not np.array_equal(again[0].arrays["x"], first.arrays["x"][:7])  # splits draw different examples
    kernels = [np.asarray(m.trunk.layers[0].kernel[...]) for m in models]
    assert not np.array_equal(kernels[0], kernels[1])
    from flax import nnx

    eager = builders.instantiate_node(builders.fill_input_sizes(model_cfg, (13,)), "model", _partial_=True)
    np.testing.assert_array_equal(
        np.asarray(eager(tasks=tasks, rngs=nnx.Rngs(1)).trunk.layers[0].kernel[...]), kernels[1]
    )
