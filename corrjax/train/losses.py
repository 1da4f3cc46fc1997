"""Per-task losses and evaluation metrics chosen from each task's :class:`~corrjax.data.TaskSpec`.

Training losses are means over the (global) batch: softmax cross-entropy for ``classification``, sigmoid
cross-entropy for ``binary`` and, for ``regression``, one of ``mse`` (default), ``pearson``, ``concordance`` or
``spearman`` (the correlation losses of :mod:`corrjax.stats`, which train a regressor to correlate or rank rather than
to match scale). Every function works on global arrays inside ``jit``; under GSPMD the batch reductions span the
whole data-parallel mesh, so no ``axis_name`` is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from corrjax.data import TaskSpec

Array = jax.Array
REGRESSION_LOSSES = ("mse", "pearson", "concordance", "spearman")


def per_example_loss(task: TaskSpec, output: Array, label: Array) -> Array:
    """Per-example loss ``(n,)`` of the task's natural likelihood (used for metrics and the error correlation)."""
    if task.kind == "classification":
        return optax.softmax_cross_entropy_with_integer_labels(output, label.astype(jnp.int32))
    if task.kind == "binary":
        loss = optax.sigmoid_binary_cross_entropy(output, label.astype(output.dtype))
    else:
        loss = jnp.square(output - label.astype(output.dtype))
    return loss if loss.ndim == 1 else loss.mean(axis=tuple(range(1, loss.ndim)))


def _correlation_loss(name: str) -> Callable[[Array, Array], Array]:
    import corrjax.stats as cs

    fn = {"pearson": "pearson_loss", "concordance": "concordance_loss", "spearman": "spearman_loss"}[name]
    return getattr(cs, fn)


def task_loss_fns(
    tasks: Sequence[TaskSpec], regression_losses: Mapping[str, str] | None = None
) -> dict[str, Callable[[Array, Array], Array]]:
    """``{task: loss(output, label) -> scalar}``; ``regression_losses`` maps regression task names to a loss name."""
    regression_losses = dict(regression_losses or {})
    names = {t.name for t in tasks}
    unknown = sorted(set(regression_losses) - names)
    if unknown:
        raise ValueError(f"`task_losses` names unknown tasks {unknown}; tasks are {sorted(names)}")
    fns = {}
    for task in tasks:
        choice = regression_losses.get(task.name, "mse")
        if choice not in REGRESSION_LOSSES:
            raise ValueError(f"`task_losses.{task.name}`={choice!r}; expected one of {REGRESSION_LOSSES}")
        if choice != "mse" and task.kind != "regression":
            raise ValueError(f"`task_losses.{task.name}`={choice!r} needs a regression task, got kind {task.kind!r}")
        if choice == "mse":
            fns[task.name] = lambda out, y, task=task: per_example_loss(task, out, y).mean()
        else:
            corr = _correlation_loss(choice)
            fns[task.name] = lambda out, y, corr=corr: corr(out.reshape(out.shape[0], -1), y.reshape(y.shape[0], -1))
    return fns


def score(task: TaskSpec, output: Array, label: Array) -> Array:
    """One scalar prediction per example ``(n,)`` for the correlation of task predictions: the regression output,
    the binary logit, or the log-probability a classifier gives the true class (averaged over multiple outputs)."""
    if task.kind == "classification":
        logp = jax.nn.log_softmax(output, axis=-1)
        return jnp.take_along_axis(logp, label.astype(jnp.int32)[:, None], axis=-1)[:, 0]
    return output if output.ndim == 1 else output.mean(axis=tuple(range(1, output.ndim)))


def task_metrics(task: TaskSpec, output: Array, label: Array, mask: Array) -> dict[str, Array]:
    """Masked evaluation metrics of one task: ``loss`` always; ``accuracy`` for classification/binary; ``rmse``
    and ``pearson`` (Pearson r of prediction and target, NaN when undefined) for regression."""
    m = mask.astype(jnp.float32)
    count = m.sum()
    out = {"loss": (per_example_loss(task, output, label) * m).sum() / count}
    if task.kind == "classification":
        out["accuracy"] = ((output.argmax(-1) == label) * m).sum() / count
    elif task.kind == "binary":
        correct = ((output > 0) == (label > 0.5)).astype(jnp.float32)
        correct = correct if correct.ndim == 1 else correct.mean(axis=tuple(range(1, correct.ndim)))
        out["accuracy"] = (correct * m).sum() / count
    else:
        pred = output.reshape(output.shape[0], -1)
        y = label.reshape(label.shape[0], -1).astype(pred.dtype)
        out["rmse"] = jnp.sqrt((jnp.square(pred - y).mean(-1) * m).sum() / count)
        pm = (pred * m[:, None]).sum(0) / count
        ym = (y * m[:, None]).sum(0) / count
        dp, dy = (pred - pm) * m[:, None], (y - ym) * m[:, None]
        r = (dp * dy).sum(0) / jnp.sqrt((dp * dp).sum(0) * (dy * dy).sum(0))
        out["pearson"] = jnp.clip(r, -1.0, 1.0).mean()
    return out
