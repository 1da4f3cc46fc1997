"""The task table: for each :class:`~corrjax.data.TaskSpec` kind, its loss, evaluation metrics and score.

One row per kind (:data:`KINDS`): ``classification`` (softmax cross-entropy, accuracy, the log-probability of the
true class as the score), ``binary`` (sigmoid cross-entropy, accuracy, the logit) and ``regression`` (squared error,
RMSE and Pearson r, the prediction). Training losses are means over the (global) batch; a regression task may train
on one of the correlation losses of :mod:`corrjax.stats` instead (``task_losses.<task>=pearson|concordance|
spearman``), which train a regressor to correlate or rank rather than to match scale. Every function works on global
arrays inside ``jit``; under GSPMD the batch reductions span the whole data-parallel mesh, so no ``axis_name`` is
needed. :func:`select_tasks` picks the run's tasks from the dataset's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

import corrjax.stats
from corrjax.data import TaskSpec

Array = jax.Array
LossFn = Callable[[Array, Array], Array]
# Regression losses by name: "mse" is the kind's own loss, the others are corrjax.stats's correlation losses.
REGRESSION_LOSSES = ("mse", "pearson", "concordance", "spearman")


def _per_example(loss: Array) -> Array:
    """``(n,)``: a loss with extra output axes averaged over them."""
    return loss if loss.ndim == 1 else loss.mean(axis=tuple(range(1, loss.ndim)))


def _masked_mean(values: Array, mask: Array) -> Array:
    m = mask.astype(values.dtype)
    return (values * m).sum() / m.sum()


def _accuracy(correct: Array, mask: Array) -> dict[str, Array]:
    return {"accuracy": _masked_mean(_per_example(correct.astype(jnp.float32)), mask)}


def _regression_metrics(output: Array, label: Array, mask: Array) -> dict[str, Array]:
    """RMSE and the Pearson r of prediction and target (per output column, averaged; NaN when undefined), the
    masked-out rows given zero weight in :func:`corrjax.stats.corrcoef`."""
    pred = output.reshape(output.shape[0], -1)
    y = label.reshape(label.shape[0], -1).astype(pred.dtype)
    weights = mask.astype(pred.dtype)
    rmse = jnp.sqrt(_masked_mean(jnp.square(pred - y).mean(-1), mask))
    r = jax.vmap(lambda p, t: corrjax.stats.corrcoef(p, t, fweights=weights), in_axes=1)(pred, y)
    return {"rmse": rmse, "pearson": r.mean()}


def _true_class_log_prob(output: Array, label: Array) -> Array:
    logp = jax.nn.log_softmax(output, axis=-1)
    return jnp.take_along_axis(logp, label.astype(jnp.int32)[:, None], axis=-1)[:, 0]


@dataclass(frozen=True)
class TaskKind:
    """One row of the task table.

    Attributes:
      per_example_loss: ``(output, label) -> (n,)``, the kind's natural likelihood (the training loss's terms, the
        evaluation ``loss`` and the error correlation).
      metrics: ``(output, label, mask) -> {name: scalar}``, masked evaluation metrics besides ``loss``.
      score: ``(output, label) -> (n,)``, one scalar prediction per example for the correlation of task predictions.
    """

    per_example_loss: Callable[[Array, Array], Array]
    metrics: Callable[[Array, Array, Array], dict[str, Array]]
    score: Callable[[Array, Array], Array]


KINDS: dict[str, TaskKind] = {
    "classification": TaskKind(
        per_example_loss=lambda out, y: _per_example(
            optax.softmax_cross_entropy_with_integer_labels(out, y.astype(jnp.int32))
        ),
        metrics=lambda out, y, mask: _accuracy(out.argmax(-1) == y, mask),
        score=_true_class_log_prob,
    ),
    "binary": TaskKind(
        per_example_loss=lambda out, y: _per_example(optax.sigmoid_binary_cross_entropy(out, y.astype(out.dtype))),
        metrics=lambda out, y, mask: _accuracy((out > 0) == (y > 0.5), mask),
        score=lambda out, y: _per_example(out),
    ),
    "regression": TaskKind(
        per_example_loss=lambda out, y: _per_example(jnp.square(out - y.astype(out.dtype))),
        metrics=_regression_metrics,
        score=lambda out, y: _per_example(out),
    ),
}


def kind(task: TaskSpec) -> TaskKind:
    """The table row of ``task.kind``."""
    try:
        return KINDS[task.kind]
    except KeyError:
        raise ValueError(f"task {task.name!r} has kind {task.kind!r}; known kinds are {sorted(KINDS)}") from None


def per_example_loss(task: TaskSpec, output: Array, label: Array) -> Array:
    """Per-example loss ``(n,)`` of the task's kind."""
    return kind(task).per_example_loss(output, label)


def score(task: TaskSpec, output: Array, label: Array) -> Array:
    """One scalar prediction per example ``(n,)``: the regression output, the binary logit, or the log-probability
    a classifier gives the true class (averaged over multiple outputs)."""
    return kind(task).score(output, label)


def task_metrics(task: TaskSpec, output: Array, label: Array, mask: Array) -> dict[str, Array]:
    """Masked evaluation metrics of one task: ``loss`` always; ``accuracy`` for classification/binary; ``rmse``
    and ``pearson`` for regression."""
    row = kind(task)
    return {"loss": _masked_mean(row.per_example_loss(output, label), mask), **row.metrics(output, label, mask)}


def _correlation_loss(name: str) -> LossFn:
    fn = getattr(corrjax.stats, f"{name}_loss")
    return lambda out, y: fn(out.reshape(out.shape[0], -1), y.reshape(y.shape[0], -1))


def task_loss_fns(tasks: Sequence[TaskSpec], regression_losses: Mapping[str, str] | None = None) -> dict[str, LossFn]:
    """``{task: loss(output, label) -> scalar}``; ``regression_losses`` maps regression task names to a loss name
    (``task_losses`` of the config; absent tasks use their kind's loss)."""
    regression_losses = dict(regression_losses or {})
    names = {t.name for t in tasks}
    unknown = sorted(set(regression_losses) - names)
    if unknown:
        raise ValueError(f"`task_losses` names unknown tasks {unknown}; tasks are {sorted(names)}")
    fns = {}
    for task in tasks:
        row = kind(task)
        choice = regression_losses.get(task.name, "mse")
        if choice not in REGRESSION_LOSSES:
            raise ValueError(f"`task_losses.{task.name}`={choice!r}; expected one of {REGRESSION_LOSSES}")
        if choice != "mse" and task.kind != "regression":
            raise ValueError(f"`task_losses.{task.name}`={choice!r} needs a regression task, got kind {task.kind!r}")
        if choice == "mse":
            fns[task.name] = lambda out, y, row=row: row.per_example_loss(out, y).mean()
        else:
            fns[task.name] = _correlation_loss(choice)
    return fns


def per_example_means(tasks: Sequence[TaskSpec], regression_losses: Mapping[str, str] | None = None) -> bool:
    """Whether every task trains on its kind's mean per-example loss (no correlation loss in ``task_losses``): then
    a batch's loss is the mean of its halves' losses, and the train step may differentiate the halves
    (:func:`corrjax.train.step.make_train_step`'s in-step noise scale)."""
    regression_losses = dict(regression_losses or {})
    return all(regression_losses.get(t.name, "mse") == "mse" for t in tasks)


def select_tasks(available: Any, names: Any) -> tuple[TaskSpec, ...]:
    """The dataset's task specs, restricted to ``names`` (in the dataset's order) when given."""
    available = tuple(available)
    if names is None:
        return available
    known = {t.name for t in available}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"`tasks`={list(names)} must name some of the dataset's tasks {sorted(known)}")
    return tuple(t for t in available if t.name in set(names))
