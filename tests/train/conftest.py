"""Helpers for the training tests: composing configs in-process and a persistent compilation cache.

The cache lets the several tiny runs of these tests (which build the same jitted steps again and again) reuse XLA
executables instead of recompiling; it is switched on only while tests of this folder run.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import jax
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from corrjax.train.config import register_configs

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
# Small and fast: few steps, small batches, no progress bar; multidigits/synthetic with few examples.
TINY = ["trainer=tiny", "logger=minimal", "data.num_examples=256"]


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
    """The cache in a temporary folder, in this process and (through JAX's environment variables) in the
    subprocesses the tests start: runs keep it (``trainer.compilation_cache_dir=auto`` honours JAX's own setting),
    so no test writes to the user's cache (~/.cache/corrjax/jax)."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {n: getattr(jax.config, n) for n in names}
    folder = str(tmp_path_factory.mktemp("xla_cache"))
    env = {"JAX_COMPILATION_CACHE_DIR": folder, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    for n, v in old.items():
        jax.config.update(n, v)
    for k, v in old_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def hydra_ctx():
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3", job_name="test"):
        yield
    GlobalHydra.instance().clear()


def compose_cfg(overrides=(), return_hydra_config=False):
    with hydra_ctx():
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=return_hydra_config)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


@pytest.fixture
def compose_fn():
    return compose_cfg
