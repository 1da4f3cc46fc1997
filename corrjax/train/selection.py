"""Model selection on the validation split: the monitored metric, the best checkpoint and early stopping.

Pure functions over evaluation records plus one small JSON-able state (:class:`SelectionState`) that the loop keeps
in every checkpoint, so a resumed run selects and stops exactly as the uninterrupted run does.

**The monitor** (``trainer.monitor``; the value compared at every evaluation of ``trainer.eval_split``):

- ``auto`` (the default): ``delta_m`` when ``trainer.monitor_reference`` is given, else ``mean_score``.
- ``mean_score``: the mean over the run's tasks of a score in which higher is better and 1 is perfect:
  ``accuracy`` for classification and binary tasks, the coefficient of determination
  ``r2 = 1 - sum (y_hat - y)^2 / sum (y - mean y)^2`` for regression tasks (per output column, averaged; 0 for
  predicting the split's mean). Mode ``max``.
- ``delta_m``: Delta_m% (Maninis et al. 2019; LibMTL, Lin & Zhang 2023) against the per-task reference metrics of
  ``trainer.monitor_reference`` (``{task: {metric: value}}``, e.g. single-task results):
  ``100 / T * sum_t mean_{k in ref_t} s_k (M_tk - B_tk) / |B_tk|`` with ``s_k = +1`` where higher is better
  (accuracy, pearson, r2) and ``-1`` where lower is better (loss, rmse); positive means better than the reference
  (LibMTL divides by ``B_tk``; the two agree for positive references; ``scripts/compare.py`` computes the same).
  Every task of the run needs a reference. Mode ``max``.
- any scalar evaluation metric by its name under ``eval/``: ``loss`` (the summed task losses) or
  ``<task>/<metric>`` (``task0/rmse``, ``left/accuracy``, ...). Mode inferred from the metric: ``loss`` and
  ``rmse`` ``min``; ``accuracy``, ``pearson`` and ``r2`` ``max``.

``trainer.monitor_mode`` (``min`` | ``max``) overrides the inferred mode. A non-finite value never counts as an
improvement.

**Best checkpoint** (``trainer.keep_best``): an evaluation that improves on the best value so far (strictly) is saved
as a checkpoint with the value as its Orbax metric (``best_fn``/``best_mode``), and the checkpoint manager keeps the
best one besides the last ``trainer.keep_checkpoints`` (:class:`corrjax.train.checkpoint.Checkpointer`), so resuming
still starts from the latest. **Early stopping** (``trainer.early_stopping.patience``, ``min_delta``): training
stops after ``patience`` evaluations in a row that did not improve on the early-stopping reference by more than
``min_delta`` (the reference is the value of the last evaluation that did; ``patience`` 0 and 1 both stop at the
first evaluation that does not improve; null never stops), as Lightning's ``EarlyStopping`` and Keras count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from corrjax.data import TaskSpec

# Per task kind, the metrics evaluation reports (besides `loss`), and the direction of every metric.
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("loss", "accuracy"),
    "binary": ("loss", "accuracy"),
    "regression": ("loss", "rmse", "pearson", "r2"),
}
HIGHER_IS_BETTER: dict[str, bool] = {"accuracy": True, "pearson": True, "r2": True, "loss": False, "rmse": False}
# The normalised score of each kind that `mean_score` averages.
SCORE_METRIC: dict[str, str] = {"classification": "accuracy", "binary": "accuracy", "regression": "r2"}
DERIVED = ("mean_score", "delta_m")
MODES = ("min", "max")


@dataclass(frozen=True)
class Monitor:
    """The resolved monitor: its ``name`` (the key under ``eval/``, ``test/`` and ``best/``), ``mode``, and the
    Delta_m% reference (``{task: {metric: value}}``) when there is one."""

    name: str
    mode: str
    reference: Mapping[str, Mapping[str, float]] | None = None


def _container(node: Any) -> Any:
    if node is None:
        return None
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(node, (DictConfig, ListConfig)):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return node


def _check_reference(reference: Any, tasks: Sequence[TaskSpec]) -> dict[str, dict[str, float]]:
    key = "trainer.monitor_reference"
    if not isinstance(reference, Mapping) or not reference:
        raise ValueError(f"`{key}` must map task names to {{metric: value}}, got {reference!r}")
    kinds = {t.name: t.kind for t in tasks}
    unknown = sorted(set(reference) - set(kinds))
    missing = sorted(set(kinds) - set(reference))
    if unknown or missing:
        raise ValueError(
            f"`{key}` must give reference metrics for exactly the run's tasks {sorted(kinds)}"
            + (f"; unknown: {unknown}" if unknown else "")
            + (f"; missing: {missing}" if missing else "")
        )
    out: dict[str, dict[str, float]] = {}
    for task, metrics in reference.items():
        if not isinstance(metrics, Mapping) or not metrics:
            raise ValueError(f"`{key}.{task}` must map metric names to reference values, got {metrics!r}")
        for metric, value in metrics.items():
            if metric not in KIND_METRICS[kinds[task]]:
                raise ValueError(
                    f"`{key}.{task}.{metric}`: {kinds[task]} task {task!r} reports {KIND_METRICS[kinds[task]]}"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not value:
                raise ValueError(f"`{key}.{task}.{metric}`={value!r} must be a finite non-zero number")
        out[str(task)] = {str(m): float(v) for m, v in metrics.items()}
    return out


def metric_names(tasks: Sequence[TaskSpec]) -> list[str]:
    """Every name ``trainer.monitor`` may take for these tasks."""
    return ["auto", *DERIVED, "loss", *(f"{t.name}/{m}" for t in tasks for m in KIND_METRICS[t.kind])]


def resolve_monitor(trainer: Any, tasks: Sequence[TaskSpec]) -> Monitor:
    """The :class:`Monitor` of a ``trainer`` config (``monitor``, ``monitor_mode``, ``monitor_reference``) for the
    run's ``tasks``. Raises ``ValueError`` naming the key for an unknown monitor, a bad mode, or a reference that
    does not cover the tasks (or is given without Delta_m% being monitored)."""
    name = str(trainer.get("monitor", "auto") or "auto")
    mode = trainer.get("monitor_mode")
    reference = _container(trainer.get("monitor_reference"))
    if mode is not None and mode not in MODES:
        raise ValueError(f"`trainer.monitor_mode`={mode!r}; expected min, max or null (inferred from the monitor)")
    if name == "auto":
        name = "delta_m" if reference else "mean_score"
    valid = metric_names(tasks)
    if name not in valid:
        raise ValueError(f"unknown `trainer.monitor`={name!r}; expected one of {', '.join(valid)}")
    if name == "delta_m":
        if not reference:
            raise ValueError(
                "`trainer.monitor`=delta_m needs `trainer.monitor_reference` ({task: {metric: value}}, e.g. the "
                "single-task runs' validation metrics)"
            )
        reference = _check_reference(reference, tasks)
    elif reference:
        reference = _check_reference(reference, tasks)  # still reported as eval/delta_m
    inferred = "max" if name in DERIVED else ("max" if HIGHER_IS_BETTER[name.rsplit("/", 1)[-1]] else "min")
    return Monitor(name, mode or inferred, reference or None)


def _finite(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def mean_score(record: Mapping[str, Any], tasks: Sequence[TaskSpec], prefix: str = "eval/") -> float:
    """The mean over ``tasks`` of each task's score in ``record`` (accuracy, or r2 for regression); NaN when one is
    missing or not finite."""
    values = [_finite(record.get(f"{prefix}{t.name}/{SCORE_METRIC[t.kind]}")) for t in tasks]
    return float(sum(values) / len(values)) if values else math.nan


def delta_m(record: Mapping[str, Any], reference: Mapping[str, Mapping[str, float]], prefix: str = "eval/") -> float:
    """Delta_m% of ``record``'s metrics against ``reference`` (``{task: {metric: value}}``; see the module
    docstring); NaN when a referenced metric is missing or not finite."""
    per_task = []
    for task, metrics in reference.items():
        terms = []
        for metric, base in metrics.items():
            sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
            terms.append(sign * (_finite(record.get(f"{prefix}{task}/{metric}")) - base) / abs(base))
        per_task.append(sum(terms) / len(terms))
    return 100.0 * sum(per_task) / len(per_task) if per_task else math.nan


def derived_metrics(
    record: Mapping[str, Any], tasks: Sequence[TaskSpec], monitor: Monitor, prefix: str = "eval/"
) -> dict[str, float]:
    """``{prefix + "mean_score": ..., prefix + "delta_m": ...}`` (the latter with a reference) for ``record``."""
    out = {f"{prefix}mean_score": mean_score(record, tasks, prefix)}
    if monitor.reference:
        out[f"{prefix}delta_m"] = delta_m(record, monitor.reference, prefix)
    return out


def monitor_value(record: Mapping[str, Any], monitor: Monitor, prefix: str = "eval/") -> float:
    """The monitored value in ``record`` (with :func:`derived_metrics` added), NaN when absent or not finite."""
    return _finite(record.get(prefix + monitor.name))


def better(value: float, reference: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` improves on ``reference`` by more than ``min_delta`` (strictly) in ``mode``; a non-finite
    value never does, any finite one improves on None."""
    if not math.isfinite(value):
        return False
    if reference is None:
        return True
    return value > reference + min_delta if mode == "max" else value < reference - min_delta


class SelectionState(NamedTuple):
    """What model selection remembers between evaluations (and across a resume, in every checkpoint).

    Attributes:
      monitor, mode: what is monitored (a resumed run must monitor the same).
      best_value, best_step: the best value so far and its evaluation step (None before any finite value).
      wait_value: the early-stopping reference: the value of the last evaluation that improved by more than
        ``min_delta``.
      bad_evals: evaluations since then.
      last_step: the step of the last evaluation observed (a finished run re-evaluated is not counted twice).
      stopped: whether early stopping has stopped the run.
    """

    monitor: str
    mode: str
    best_value: float | None = None
    best_step: int | None = None
    wait_value: float | None = None
    bad_evals: int = 0
    last_step: int | None = None
    stopped: bool = False

    def to_json(self) -> dict[str, Any]:
        return self._asdict()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SelectionState:
        return cls(**{k: data[k] for k in cls._fields if k in data})


def init(monitor: Monitor) -> SelectionState:
    """The state before any evaluation."""
    return SelectionState(monitor.name, monitor.mode)


def update(
    state: SelectionState, value: float, step: int, *, patience: int | None = None, min_delta: float = 0.0
) -> tuple[SelectionState, bool]:
    """``(new state, improved)`` after observing the monitored ``value`` at ``step``: ``improved`` when it is the
    best so far (strictly); the early-stopping count restarts when it beats ``wait_value`` by more than
    ``min_delta`` and otherwise grows, and ``stopped`` turns true once it reaches ``patience``. Observing a step
    at or before ``last_step`` changes nothing."""
    if state.last_step is not None and step <= state.last_step:
        return state, False
    improved = better(value, state.best_value, state.mode)
    best_value, best_step = (value, step) if improved else (state.best_value, state.best_step)
    if better(value, state.wait_value, state.mode, min_delta):
        wait_value, bad = value, 0
    else:
        wait_value, bad = state.wait_value, state.bad_evals + 1
    stopped = state.stopped or (patience is not None and bad >= max(patience, 1))
    new = state._replace(
        best_value=best_value,
        best_step=best_step,
        wait_value=wait_value,
        bad_evals=bad,
        last_step=int(step),
        stopped=stopped,
    )
    return new, improved


def check_resumed(state: SelectionState, monitor: Monitor) -> SelectionState:
    """``state`` (from a checkpoint) if it monitored what ``monitor`` does; ``ValueError`` naming the key otherwise."""
    if (state.monitor, state.mode) != (monitor.name, monitor.mode):
        raise ValueError(
            f"`trainer.monitor`={monitor.name!r} (mode {monitor.mode}) but the run being resumed selected on "
            f"{state.monitor!r} (mode {state.mode}): resume with the original monitor, or start a new run"
        )
    return state


def check_config(cfg: Any) -> None:
    """Refuses, naming the key, the selection and evaluation settings that are wrong whatever the data:
    ``trainer.monitor_mode`` not min/max/null, ``trainer.early_stopping.patience`` < 0, ``min_delta`` < 0,
    ``data.val_fraction`` outside (0, 1), ``trainer.mode`` not train/eval, ``trainer.mode=eval`` without
    ``ckpt_path``, and a ``ckpt_path`` that does not exist (``FileNotFoundError``)."""
    from pathlib import Path

    tc = cfg.trainer
    mode = tc.get("monitor_mode")
    if mode is not None and mode not in MODES:
        raise ValueError(f"`trainer.monitor_mode`={mode!r}; expected min, max or null (inferred from the monitor)")
    es = tc.get("early_stopping") or {}
    patience, min_delta = es.get("patience"), es.get("min_delta", 0.0)
    if patience is not None and (isinstance(patience, bool) or int(patience) != patience or patience < 0):
        raise ValueError(f"`trainer.early_stopping.patience`={patience} must be null (off) or an int >= 0")
    if min_delta is None or not math.isfinite(float(min_delta)) or float(min_delta) < 0:
        raise ValueError(f"`trainer.early_stopping.min_delta`={min_delta} must be a finite number >= 0")
    data = cfg.get("data")
    fraction = data.get("val_fraction") if data is not None and hasattr(data, "get") else None
    if fraction is not None and not (0.0 < float(fraction) < 1.0):
        raise ValueError(f"`data.val_fraction`={fraction} must be in (0, 1)")
    run_mode = tc.get("mode", "train")
    if run_mode not in ("train", "eval"):
        raise ValueError(f"`trainer.mode`={run_mode!r}; expected train or eval")
    ckpt_path = cfg.get("ckpt_path")
    if run_mode == "eval" and not ckpt_path:
        raise ValueError("`trainer.mode`=eval needs `ckpt_path` (a run directory or a checkpoint step directory)")
    if ckpt_path and not Path(str(ckpt_path)).expanduser().exists():
        raise FileNotFoundError(f"`ckpt_path`={ckpt_path}: no such file or directory")


def summary_entries(state: SelectionState | None, monitor: Monitor) -> dict[str, Any]:
    """The summary's selection entries: ``monitor``, ``monitor_mode``, ``best/step``, ``best/<monitor>`` and
    ``early_stopped``."""
    state = state or init(monitor)
    return {
        "monitor": monitor.name,
        "monitor_mode": monitor.mode,
        "best/step": state.best_step,
        f"best/{monitor.name}": math.nan if state.best_value is None else float(state.best_value),
        "early_stopped": bool(state.stopped),
    }


def objective(summary: Mapping[str, Any]) -> float:
    """The value a Hydra sweeper gets from ``scripts/train.py``: the best monitored validation value
    (``best/<monitor>``), as is: maximise it when ``monitor_mode`` is max (the default monitors), minimise it when
    min. NaN when nothing was evaluated."""
    name = summary.get("monitor")
    return _finite(summary.get(f"best/{name}")) if name else math.nan


def with_prefix(record: Mapping[str, Any], old: str, new: str) -> dict[str, Any]:
    """``record``'s ``old``-prefixed entries renamed to the ``new`` prefix (others dropped)."""
    return {new + k[len(old) :]: v for k, v in record.items() if k.startswith(old)}


class Selector:
    """The loop's model selection: a :class:`Monitor`, the run's tasks, the early-stopping settings and the current
    :class:`SelectionState` (the pure :func:`update` applied at every evaluation)."""

    def __init__(self, monitor: Monitor, tasks: Sequence[TaskSpec], trainer: Any) -> None:
        es = trainer.get("early_stopping") or {}
        self.monitor, self.tasks = monitor, tuple(tasks)
        self.patience = None if es.get("patience") is None else int(es.get("patience"))
        self.min_delta = float(es.get("min_delta", 0.0) or 0.0)
        self.state = init(monitor)
        self.last_value: float = math.nan

    @classmethod
    def from_config(cls, trainer: Any, tasks: Sequence[TaskSpec]) -> Selector:
        return cls(resolve_monitor(trainer, tasks), tasks, trainer)

    @property
    def stopped(self) -> bool:
        return self.state.stopped

    def load(self, saved: Mapping[str, Any] | None) -> None:
        """Continues from the state saved with a restored checkpoint (None: a checkpoint without one)."""
        if saved:
            self.state = check_resumed(SelectionState.from_json(saved), self.monitor)

    def observe(self, record: Mapping[str, Any], step: int) -> tuple[dict[str, Any], bool]:
        """``(record with the derived metrics added, improved)`` for an evaluation of ``step``."""
        record = {**record, **derived_metrics(record, self.tasks, self.monitor)}
        self.last_value = monitor_value(record, self.monitor)
        self.state, improved = update(
            self.state, self.last_value, step, patience=self.patience, min_delta=self.min_delta
        )
        return record, improved

    def metric_at(self, step: int) -> float | None:
        """The monitored value of an evaluation at ``step`` (for the checkpoint's Orbax metric), else None."""
        return self.last_value if self.state.last_step == step and math.isfinite(self.last_value) else None

    def summary(self) -> dict[str, Any]:
        return summary_entries(self.state, self.monitor)
