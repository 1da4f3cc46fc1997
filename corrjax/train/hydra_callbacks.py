"""Hydra callbacks of the training codebase (listed under ``hydra.callbacks`` in ``configs/hydra/default.yaml``)."""

from __future__ import annotations

import copy
import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)


class SweepDir(Callback):
    """Resolves a multirun's ``hydra.sweep.dir`` once, before any job, and pins it for every job.

    The default sweep folder, ``multirun/${name}/<time>``, names the run by its config group choices through the
    ``${hydra:runtime.choices.*}`` resolver, which fails in a multirun's launcher ("HydraConfig was not set": Hydra
    sets it per job) and would differ between jobs that sweep a group. Here it is resolved from the sweep's base
    config, with each swept group shown as its values joined by ``+`` (``-m mtl=ew,pcgrad`` ->
    ``multirun/synthetic-hps-ew+pcgrad/<time>``), and passed to every job as a ``hydra.sweep.dir`` override.
    A ``name=`` or ``hydra.sweep.dir=`` override is honoured as given.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        shown = copy.deepcopy(config)
        with read_write(shown), open_dict(shown):
            choices = shown.hydra.runtime.choices
            for override in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task)):
                group = override.key_or_group
                if override.is_sweep_override() and group in choices:
                    try:
                        choices[group] = "+".join(str(v) for v in override.sweep_string_iterator())
                    except Exception:  # a glob(...) sweep lists its options only when expanded
                        choices[group] = "sweep"
        HydraConfig.instance().set_config(shown)
        sweep_dir = str(shown.hydra.sweep.dir)
        with read_write(config), open_dict(config):
            config.hydra.sweep.dir = sweep_dir
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir={_quoted(sweep_dir)}")
        log.debug("sweep folder: %s", sweep_dir)


def _quoted(value: str) -> str:
    """``value`` as a Hydra override value (quoted, with the quote character escaped)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class RunDirGuard(Callback):
    """Refuses a single run before Hydra writes into its directory (``.hydra/config.yaml``, ``overrides.yaml``, the
    job log): when another run holds the directory, or a fresh run (``trainer.resume=false``, no
    ``trainer.overwrite``) would start over a previous run's results. Otherwise a refused run would already have
    replaced the recorded config of the run that is there (``scripts/compare.py`` groups runs by it). Exits with
    status 1 and the message of :func:`corrjax.train.rundir.check_free`; the loop's own lock
    (:func:`corrjax.train.rundir.claim`) is what holds the directory during the run."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from corrjax.train import rundir

        process_id = OmegaConf.select(config, "parallel.distributed.process_id", default=None)
        if (process_id or int(os.environ.get("SLURM_PROCID", "0") or 0)) > 0:
            return  # another process of a multi-process run: process 0 checks and holds the directory
        HydraConfig.instance().set_config(config)  # the run dir's ${hydra:...} and ${now:...} resolve as in the job
        try:
            run_dir = Path(str(config.hydra.run.dir)).absolute()
            resume = bool(OmegaConf.select(config, "trainer.resume", default=False))
            overwrite = bool(OmegaConf.select(config, "trainer.overwrite", default=False))
        except Exception as e:  # the loop checks again once Hydra has set up the job
            log.debug("run dir guard skipped: %s", e)
            return
        try:
            rundir.check_free(run_dir, resume=resume, overwrite=overwrite)
        except (rundir.RunDirInUseError, rundir.RunDirNotEmptyError, ValueError) as e:
            sys.exit(f"error: {e}")  # SystemExit: Hydra turns a callback's exceptions into warnings
