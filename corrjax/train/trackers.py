"""Experiment trackers as :class:`corrjax.train.writers.Writer`: Weights & Biases and MLflow (optional extras).

Both are imported only when their writer is enabled (``logger.wandb.enabled=true``, ``logger.mlflow.enabled=true``);
a missing package raises ``ImportError`` naming the key and the extra (``pip install 'corrjax[wandb]'``,
``'corrjax[mlflow]'``). Each tracker run gets the flattened config (:func:`flat_config`), the top-level ``tags``,
every logged scalar at its step, the heatmaps of the task matrices as images, and the final summary. A resumed run
(``trainer.resume=true``) continues the same tracker run: its id is kept in ``<run_dir>/tracking.json``.

- :class:`WandbWriter`: ``wandb.init(project=logger.wandb.project, entity, group, name, mode, dir=<run_dir>,
  tags)``; the files go under ``<run_dir>/wandb/``. ``mode=offline`` (or ``WANDB_MODE=offline``) needs no network:
  ``wandb sync <run_dir>/wandb/offline-run-*`` uploads later.
- :class:`MlflowWriter`: an ``MlflowClient`` on ``logger.mlflow.tracking_uri`` (null: ``MLFLOW_TRACKING_URI`` or
  MLflow's default), experiment ``logger.mlflow.experiment``; images are logged with their step under the matrix's
  name. MLflow 3 refuses a ``file://`` store unless ``MLFLOW_ALLOW_FILE_STORE=true``; ``sqlite:///mlflow.db``
  needs SQLAlchemy (the ``sweep`` extra pins it below 2, which MLflow accepts).
"""

from __future__ import annotations

import importlib
import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from corrjax.train.writers import Writer, scalars_of, write_atomic

log = logging.getLogger(__name__)

IDS_FILE = "tracking.json"
# logger key -> (module to import, extra that installs it)
_PACKAGES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow.tracking", "mlflow")}


def require(key: str) -> Any:
    """Imports the package of the ``logger.<key>`` writer, or raises ``ImportError`` naming the key and the extra."""
    module, extra = _PACKAGES[key]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"`logger.{key}.enabled`=true needs the {module.split('.')[0]} package: pip install 'corrjax[{extra}]' "
            f"(or set logger.{key}.enabled=false)"
        ) from e


def flat_config(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim.learning_rate": 0.001, "trainer.max_steps": 600, ...}``: the config's leaves by dotted key, lists
    as strings; a value whose interpolation cannot be resolved here (``${hydra:...}`` outside a Hydra app) is kept
    as written."""
    out: dict[str, Any] = {}
    for key in cfg:
        name = f"{prefix}{key}"
        try:
            value = cfg[key]
            if isinstance(value, ListConfig):
                value = str(OmegaConf.to_container(value, resolve=True))
        except Exception:  # an interpolation that needs Hydra's runtime
            node = cfg._get_node(key)
            value = str(node._value()) if node is not None else None
        if isinstance(value, DictConfig):
            out.update(flat_config(value, f"{name}."))
        else:
            out[name] = value
    return out


def tags_of(cfg: Any) -> list[str]:
    """The run's top-level ``tags`` as strings ([] when absent)."""
    tags = cfg.get("tags") if hasattr(cfg, "get") else None
    return [str(t) for t in (tags or [])]


def run_name(cfg: Any, run_dir: Path) -> str:
    """``<cfg.name>-<run dir's name>`` (e.g. ``synthetic-hps-ew-2026-11-30_12-00-00`` or ``...-3`` in a sweep); the
    run dir's name alone when ``name`` cannot be resolved outside a Hydra app."""
    try:
        return f"{cfg.name}-{run_dir.name}"
    except Exception:
        return run_dir.name


def _ids(run_dir: Path) -> dict[str, str]:
    path = run_dir / IDS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_id(run_dir: Path, key: str, value: str) -> None:
    ids = _ids(run_dir)
    ids[key] = value
    write_atomic(run_dir / IDS_FILE, json.dumps(ids, indent=2, sort_keys=True) + "\n")


class WandbWriter(Writer):
    """A Weights & Biases run (see the module docstring). ``resume``: continue the run whose id ``run_dir`` keeps."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        project: str,
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        mode: str | None = None,
        tags: Sequence[str] = (),
        resume: bool = False,
    ) -> None:
        wandb = require("wandb")
        self.run_dir = Path(run_dir)
        run_id = _ids(self.run_dir).get("wandb") if resume else None
        kwargs = {"mode": mode} if mode else {}
        self.run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            name=name,
            dir=str(self.run_dir),
            tags=list(tags),
            id=run_id or uuid.uuid4().hex[:12],
            resume="allow",
            reinit="create_new",
            **kwargs,
        )
        _save_id(self.run_dir, "wandb", self.run.id)
        self._wandb, self._closed = wandb, False

    def write_scalars(self, step: int, scalars: Mapping[str, float | int]) -> None:
        self.run.log(dict(scalars), step=int(step))

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        self.run.log({name: self._wandb.Image(np.asarray(image))}, step=int(step))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self.run.config.update(dict(hparams), allow_val_change=True)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        for key, value in scalars_of(summary).items():
            self.run.summary[key] = value

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.run.finish()


class MlflowWriter(Writer):
    """An MLflow run (see the module docstring). ``resume``: continue the run whose id ``run_dir`` keeps."""

    _MAX_PARAM_LENGTH = 6000

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tracking_uri: str | None = None,
        experiment: str = "corrjax",
        run_name: str | None = None,
        tags: Sequence[str] = (),
        resume: bool = False,
    ) -> None:
        tracking = require("mlflow")
        from mlflow.entities import RunStatus, RunTag

        self.run_dir = Path(run_dir)
        self.client = tracking.MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        run_id = _ids(self.run_dir).get("mlflow") if resume else None
        run_tags = {str(t): "true" for t in tags} | {"corrjax.tags": ",".join(tags), "corrjax.run_dir": str(run_dir)}
        if run_id is not None:
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in run_tags.items()])
        else:
            run_id = self.client.create_run(experiment_id, run_name=run_name, tags=run_tags).info.run_id
        self.run_id = run_id
        _save_id(self.run_dir, "mlflow", run_id)
        self._closed = False

    def write_scalars(self, step: int, scalars: Mapping[str, float | int]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(step)) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        self.client.log_image(self.run_id, np.asarray(image), key=name, step=int(step))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[: self._MAX_PARAM_LENGTH]) for k, v in hparams.items()]
        for i in range(0, len(params), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        step = int(summary.get("step", 0) or 0)
        self.write_scalars(step, {f"summary/{k}": v for k, v in scalars_of(summary).items()})
        self.client.log_batch(self.run_id, tags=[RunTag("corrjax.completed", str(bool(summary.get("completed"))))])

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.client.set_terminated(self.run_id)


def open_tracker(key: str, run_dir: str | Path, cfg: Any, *, resume: bool = False) -> Writer:
    """The ``logger.<key>`` tracker (``wandb`` or ``mlflow``) of the run in ``run_dir``, from ``cfg``."""
    run_dir, node, tags = Path(run_dir), cfg.logger[key], tags_of(cfg)
    name = node.get("name") or run_name(cfg, run_dir)
    if key == "wandb":
        return WandbWriter(
            run_dir,
            project=node.project,
            entity=node.get("entity"),
            group=node.get("group"),
            name=name,
            mode=node.get("mode"),
            tags=tags,
            resume=resume,
        )
    if key == "mlflow":
        return MlflowWriter(
            run_dir,
            tracking_uri=node.get("tracking_uri"),
            experiment=node.experiment,
            run_name=name,
            tags=tags,
            resume=resume,
        )
    raise ValueError(f"unknown tracker `logger.{key}` (known: wandb, mlflow)")
