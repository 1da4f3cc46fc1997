"""Hydra callbacks of the training codebase (listed under ``hydra.callbacks`` in ``configs/hydra/default.yaml``)."""

from __future__ import annotations

import copy
import logging
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

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
