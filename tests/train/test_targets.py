"""The `_target_` allow-list (corrjax.train.targets): every shipped config passes, arbitrary callables are refused
naming the key path before anything is instantiated, a package a config file adds is accepted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from corrjax.train import loop, targets
from corrjax.train.config import register_configs

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
TINY = ["trainer=tiny", "logger=minimal", "data.num_examples=256"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def every_config() -> list[list[str]]:
    """One override list per option of every group (and every experiment preset)."""
    groups = ("data", "model", "mtl", "optim", "regularizer", "trainer", "logger", "parallel", "experiment")
    return [[f"{g}={o}"] for g in groups for o in options(g)]


def test_the_default_config_is_allowed(compose_fn):
    cfg = compose_fn(return_hydra_config=True)
    targets.check_config(cfg)  # the hydra node's callback (corrjax) included
    assert targets.allowed_prefixes(cfg) == targets.DEFAULT_PREFIXES


@pytest.mark.slow
def test_every_shipped_config_is_allowed():
    """Each option of each group, with Hydra's own node too (its callbacks and launchers are instantiated by Hydra;
    ~50 compositions, 10-15 s on two busy cores)."""
    register_configs()
    GlobalHydra.instance().clear()
    seen = set()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3", job_name="test"):
        for overrides in every_config():
            cfg = compose(config_name="train", overrides=overrides)
            targets.check_config(cfg)
            seen |= {t for _, t in targets.find_targets(cfg)}
        for launcher in ("local", "slurm"):
            cfg = compose(config_name="train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
            hydra_targets = list(targets.find_targets(cfg.hydra))
            assert hydra_targets and all(targets.is_allowed(t, targets.HYDRA_PREFIXES) for _, t in hydra_targets)
    GlobalHydra.instance().clear()
    # The walk finds the nested targets too (model factories, optax chains, regulariser functions).
    assert {"corrjax.models.MLP", "optax.chain", "corrjax.stats.decov_loss", "corrjax.data.synthetic"} <= seen


@pytest.mark.parametrize(
    "override, path",
    [
        ("data._target_=os.system", "data._target_"),
        ("optim._target_=subprocess.run", "optim._target_"),
        ("data._target_=setuptools._distutils.spawn.spawn", "data._target_"),
        ("data._target_=builtins.eval", "data._target_"),
        ("model.backbone._target_=os.system", "model.backbone._target_"),
        ("data._target_=corrjaxevil.x", "data._target_"),  # a prefix matches whole module names only
    ],
)
def test_foreign_targets_are_refused_naming_the_key(compose_fn, override, path, tmp_path):
    cfg = compose_fn([*TINY, override])
    target = override.split("=", 1)[1]
    with pytest.raises(targets.TargetNotAllowedError) as e:
        targets.check_config(cfg)
    assert f"`{path}`='{target}'" in str(e.value) and "allowed_targets" in str(e.value)
    with pytest.raises(targets.TargetNotAllowedError):  # the loop refuses it before anything else
        loop.run(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_targets_made_by_interpolation_or_resolvers_are_checked(compose_fn):
    cfg = compose_fn(TINY)
    cfg.regularizer = OmegaConf.create({"fn": "${oc.create:'{_target_: os.system, _args_: [ls]}'}", "weight": 1.0})
    with pytest.raises(targets.TargetNotAllowedError, match=r"`regularizer\.fn\._target_`='os\.system'"):
        targets.check_config(cfg)
    cfg = compose_fn(TINY)
    cfg.data._target_ = "${oc.env:CORRJAX_TEST_TARGET,os.system}"
    with pytest.raises(targets.TargetNotAllowedError, match=r"os\.system"):
        targets.check_config(cfg)
    cfg.data._target_ = "corrjax.data.synthetic"
    with open_dict(cfg):
        cfg.data["_args_"] = [{"_target_": "subprocess.Popen"}]
    with pytest.raises(targets.TargetNotAllowedError, match=r"`data\._args_\[0\]\._target_`='subprocess\.Popen'"):
        targets.check_config(cfg)


def test_a_package_added_in_config_is_accepted(compose_fn):
    cfg = compose_fn([*TINY, "data._target_=mypkg.data.make"])
    with pytest.raises(targets.TargetNotAllowedError):
        targets.check_config(cfg)
    cfg.allowed_targets = ["mypkg"]
    targets.check_config(cfg)
    cfg.data._target_ = "mypkg_other.make"
    with pytest.raises(targets.TargetNotAllowedError):
        targets.check_config(cfg)
    cfg.allowed_targets = ["my pkg"]
    with pytest.raises(ValueError, match="allowed_targets"):
        targets.check_config(cfg)


def test_overrides_of_hydra_and_of_the_allow_list():
    targets.check_overrides(["seed=1", "data._target_=os.system", "hydra.run.dir=/tmp/x", "-m"])  # later check
    targets.check_overrides(["+hydra.callbacks.mine._target_=corrjax.train.hydra_callbacks.SweepDir"])
    for bad in (
        "+hydra.callbacks.evil._target_=os.system",
        "+hydra.callbacks.evil={_target_: subprocess.run, args: [ls]}",
        "allowed_targets=[os]",
        "+allowed_targets=[os]",
    ):
        with pytest.raises(targets.TargetNotAllowedError):
            targets.check_overrides([bad])


def test_train_script_refuses_before_running_anything(tmp_path):
    """End to end through scripts/train.py: a setuptools spawn helper as the data target (what the issue ran) and a
    Hydra callback both fail with the key named, and the command they carry never runs."""
    marker = tmp_path / "ran"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    script = str(ROOT / "scripts" / "train.py")
    cases = [
        (
            ["data._target_=setuptools._distutils.spawn.spawn", f"+data.cmd=[touch,{marker}]"],
            "`data._target_`='setuptools._distutils.spawn.spawn' is not an allowed target",
        ),
        (
            [f"+hydra.callbacks.evil={{_target_: os.system, _args_: ['touch {marker}']}}"],
            "`hydra.callbacks.evil._target_`='os.system' is not an allowed target",
        ),
        (["allowed_targets=[os]", "data._target_=os.system"], "cannot be set on the command line"),
    ]
    for overrides, message in cases:
        cmd = [sys.executable, script, *TINY, f"hydra.run.dir={tmp_path / 'run'}", *overrides]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]
        assert not marker.exists()
