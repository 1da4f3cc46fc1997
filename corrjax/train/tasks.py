"""The task table: for each :class:`~corrjax.data.TaskSpec` kind, its loss, evaluation metrics and score.

One row per kind (:data:`KINDS`): ``classification`` (softmax cross-entropy, accuracy, the log-probability of the
true class as the score), ``binary`` (sigmoid cross-entropy, accuracy, the logit) and ``regression`` (squared error,
RMSE, Pearson r and R^2, the prediction). Training losses are means over the (global) batch; a binary label below 0
is missing (e.g. a post-click conversion label on an impression that was not clicked): it adds nothing to the loss,
which averages over the labelled examples, nor to the metrics. A regression task may train
on one of the correlation losses of :mod:`corrjax.stats` instead (``task_losses.<task>=pearson|concordance|
spearman``), which train a regressor to correlate or rank rather than to match scale. Every function works on global
arrays inside ``jit``; under GSPMD the batch reductions span the whole data-parallel mesh, so no ``axis_name`` is
needed. :func:`select_tasks` picks the run's tasks from the dataset's; :func:`stacked_losses` computes the task losses
vectorised per (kind, loss, shape) group. Binary tasks also report the exact ROC AUC (:func:`corrjax.stats.roc_auc`),
and :mod:`corrjax.train.evaluate` adds their GAUC where the dataset names a user feature.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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


def _labelled_mean(values: Array, labelled: Array) -> Array:
    return values.sum() / jnp.maximum(labelled.sum(), 1).astype(values.dtype)


def _accuracy(correct: Array, mask: Array) -> dict[str, Array]:
    return {"accuracy": _masked_mean(_per_example(correct.astype(jnp.float32)), mask)}


def _regression_metrics(output: Array, label: Array, mask: Array) -> dict[str, Array]:
    """RMSE, the Pearson r of prediction and target and the coefficient of determination
    ``r2 = 1 - sum (pred - y)^2 / sum (y - mean y)^2`` (each per output column, averaged; NaN when undefined: a
    constant target), the masked-out rows given zero weight."""
    pred = output.reshape(output.shape[0], -1)
    y = label.reshape(label.shape[0], -1).astype(pred.dtype)
    weights = mask.astype(pred.dtype)
    rmse = jnp.sqrt(_masked_mean(jnp.square(pred - y).mean(-1), mask))
    r = jax.vmap(lambda p, t: corrjax.stats.corrcoef(p, t, fweights=weights), in_axes=1)(pred, y)
    w = weights[:, None]
    y_mean = (y * w).sum(0) / w.sum()
    sse, sst = (jnp.square(pred - y) * w).sum(0), (jnp.square(y - y_mean) * w).sum(0)
    r2 = jnp.where(sst > 0, 1.0 - sse / jnp.where(sst > 0, sst, 1.0), jnp.nan)
    return {"rmse": rmse, "pearson": r.mean(), "r2": r2.mean()}


def _binary_metrics(output: Array, label: Array, mask: Array) -> dict[str, Array]:
    """Accuracy and the exact ROC AUC (:func:`corrjax.stats.roc_auc`, masked rows given zero weight; per output
    column, averaged; NaN when the rows hold one class only)."""
    pred = output.reshape(output.shape[0], -1)
    y = label.reshape(label.shape[0], -1)
    auc = jax.vmap(corrjax.stats.roc_auc, in_axes=(1, 1, None))(pred, y, mask)
    return {**_accuracy((output > 0) == (label > 0.5), mask), "auc": auc.mean()}


def _true_class_log_prob(output: Array, label: Array) -> Array:
    logp = jax.nn.log_softmax(output, axis=-1)
    return jnp.take_along_axis(logp, label.astype(jnp.int32)[:, None], axis=-1)[:, 0]


def _binary_labelled(label: Array) -> Array:
    present = label >= 0
    return present if present.ndim == 1 else present.any(axis=tuple(range(1, present.ndim)))


def _binary_loss(out: Array, y: Array) -> Array:
    """Sigmoid cross-entropy per example; missing labels (< 0) contribute zero."""
    y = y.astype(out.dtype)
    loss = optax.sigmoid_binary_cross_entropy(out, jnp.maximum(y, 0)) * (y >= 0)
    return _per_example(loss)


@dataclass(frozen=True)
class TaskKind:
    """One row of the task table.

    Attributes:
      per_example_loss: ``(output, label) -> (n,)``, the kind's natural likelihood (the training loss's terms, the
        evaluation ``loss`` and the error correlation).
      metrics: ``(output, label, mask) -> {name: scalar}``, masked evaluation metrics besides ``loss``.
      score: ``(output, label) -> (n,)``, one scalar prediction per example for the correlation of task predictions.
      labelled: ``label -> (n,)`` bool, the examples whose label is present (None: all); the others get zero loss
        and are left out of the training loss's mean and of the metrics.
    """

    per_example_loss: Callable[[Array, Array], Array]
    metrics: Callable[[Array, Array, Array], dict[str, Array]]
    score: Callable[[Array, Array], Array]
    labelled: Callable[[Array], Array] | None = None


KINDS: dict[str, TaskKind] = {
    "classification": TaskKind(
        per_example_loss=lambda out, y: _per_example(
            optax.softmax_cross_entropy_with_integer_labels(out, y.astype(jnp.int32))
        ),
        metrics=lambda out, y, mask: _accuracy(out.argmax(-1) == y, mask),
        score=_true_class_log_prob,
    ),
    "binary": TaskKind(
        per_example_loss=_binary_loss,
        metrics=_binary_metrics,
        score=lambda out, y: _per_example(out),
        labelled=_binary_labelled,
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
    """Masked evaluation metrics of one task: ``loss`` always; ``accuracy`` for classification/binary, ``auc`` for
    binary; ``rmse``, ``pearson`` and ``r2`` for regression."""
    row = kind(task)
    if row.labelled is not None:
        mask = mask & row.labelled(label)
    return {"loss": _masked_mean(row.per_example_loss(output, label), mask), **row.metrics(output, label, mask)}


def _correlation_loss(name: str) -> LossFn:
    fn = getattr(corrjax.stats, f"{name}_loss")
    return lambda out, y: fn(out.reshape(out.shape[0], -1), y.reshape(y.shape[0], -1))


@dataclass(frozen=True)
class TaskLoss:
    """A task's training loss ``(output, label) -> scalar``, tagged with its ``group`` ``(kind, loss name)``:
    tasks of one group share ``fn``, so :func:`stacked_losses` computes those of one output shape together under
    one ``jax.vmap`` instead of tracing the loss once per task."""

    fn: LossFn
    group: tuple[str, str]

    def __call__(self, output: Array, label: Array) -> Array:
        return self.fn(output, label)


# One function object per (kind, loss): the group's shared loss.
def _kind_loss(row: Any) -> LossFn:
    """A kind's own loss: the mean over the batch, or over its labelled examples (0 for a batch without any)."""
    if row.labelled is None:
        return lambda out, y: row.per_example_loss(out, y).mean()
    return lambda out, y: _labelled_mean(row.per_example_loss(out, y), row.labelled(y))


_LOSSES: dict[tuple[str, str], LossFn] = {
    **{(k, "mse"): _kind_loss(row) for k, row in KINDS.items()},
    **{("regression", name): _correlation_loss(name) for name in REGRESSION_LOSSES if name != "mse"},
}


def task_loss_fns(tasks: Sequence[TaskSpec], regression_losses: Mapping[str, str] | None = None) -> dict[str, LossFn]:
    """``{task: loss(output, label) -> scalar}`` (:class:`TaskLoss` objects); ``regression_losses`` maps regression
    task names to a loss name (``task_losses`` of the config; absent tasks use their kind's loss)."""
    regression_losses = dict(regression_losses or {})
    names = {t.name for t in tasks}
    unknown = sorted(set(regression_losses) - names)
    if unknown:
        raise ValueError(f"`task_losses` names unknown tasks {unknown}; tasks are {sorted(names)}")
    fns = {}
    for task in tasks:
        kind(task)  # an unknown kind fails here, naming the task
        choice = regression_losses.get(task.name, "mse")
        if choice not in REGRESSION_LOSSES:
            raise ValueError(f"`task_losses.{task.name}`={choice!r}; expected one of {REGRESSION_LOSSES}")
        if choice != "mse" and task.kind != "regression":
            raise ValueError(f"`task_losses.{task.name}`={choice!r} needs a regression task, got kind {task.kind!r}")
        fns[task.name] = TaskLoss(_LOSSES[task.kind, choice], (task.kind, choice))
    return fns


def stacked_losses(
    loss_fns: Mapping[str, LossFn], names: Sequence[str], outputs: Mapping[str, Array], labels: Mapping[str, Array]
) -> Array:
    """``(T,)`` the task losses in ``names`` order, vectorised: the tasks whose losses share a :class:`TaskLoss`
    group and whose outputs and labels share shapes and dtypes are stacked and computed by one ``jax.vmap`` of the
    group's loss (one trace for the group, whatever its size); other loss functions are called one by one."""
    groups: dict[Any, list[int]] = {}
    for i, n in enumerate(names):
        fn, out, y = loss_fns[n], outputs[n], labels[n]
        group = getattr(fn, "group", None)
        key = (group, out.shape, out.dtype, y.shape, y.dtype) if group is not None else ("alone", i)
        groups.setdefault(key, []).append(i)
    parts, order = [], []
    for idx in groups.values():
        first = loss_fns[names[idx[0]]]
        if len(idx) == 1:
            parts.append(jnp.reshape(first(outputs[names[idx[0]]], labels[names[idx[0]]]), (1,)))
        else:
            outs = jnp.stack([outputs[names[i]] for i in idx])
            ys = jnp.stack([labels[names[i]] for i in idx])
            parts.append(jax.vmap(first.fn)(outs, ys))
        order += idx
    losses = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
    if order != list(range(len(names))):
        losses = losses[np.argsort(np.asarray(order))]
    return losses


def per_example_means(tasks: Sequence[TaskSpec], regression_losses: Mapping[str, str] | None = None) -> bool:
    """Whether every task trains on its kind's mean per-example loss (no correlation loss in ``task_losses``): then
    a batch's loss is the mean of its halves' losses, and the train step may differentiate the halves
    (:func:`corrjax.train.step.make_train_step`'s in-step noise scale)."""
    regression_losses = dict(regression_losses or {})
    # A kind with missing labels (binary: label < 0) averages over the labelled examples, whose count differs
    # between the halves: not a per-example mean over the batch.
    return all(regression_losses.get(t.name, "mse") == "mse" and KINDS[t.kind].labelled is None for t in tasks)


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
